"""Fallback between channels in a real worker: a type whose webhook route cannot reach
the user (no endpoint, or the endpoint refuses it for good) gets an SMS route instead,
linked to the one it stands in for."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.contracts import Contracts
from pipeline.settings import Settings
from tests.channels import new_secret, outcomes, publish, settled, sms_updates
from tests.endpoints import ScriptedEndpoints, by_path
from tests.support import WorkerProcess, fast_retries, wait_for, with_types

pytestmark = pytest.mark.integration

ORDER = "shop.order.delayed"


def test_a_route_that_cannot_reach_the_user_falls_back_to_the_next_channel(
    isolated: Settings, tmp_path: Path
) -> None:
    with (
        ScriptedEndpoints({"/refuses": ["400"]}, key=by_path) as hooks,
        ScriptedEndpoints(key=lambda path, body: "sms") as sms,
    ):
        fast = fast_retries(isolated, tmp_path / "topologies", "webhook", http_timeout_s=2.0)
        settings = with_types(
            fast,
            tmp_path,
            {
                ORDER: {
                    "category": "shop",
                    "channels": {"user": ["webhook", "sms"]},
                    "required": {"order_id": "string"},
                    "fallback": {"when": ["skipped", "dead_lettered"]},
                }
            },
            {ORDER: {"sms": "Order {{ order_id }} is delayed."}},
            webhook_secret=new_secret(),
            webhook_require_https=False,
            **sms_updates(sms),
        )
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        worker.start()
        try:
            users = {
                "f-hook": {"webhook": hooks.url("/ok"), "sms": "+4915123400001"},
                "f-refused": {"webhook": hooks.url("/refuses"), "sms": "+4915123400002"},
                "f-nohook": {"sms": "+4915123400003"},
                "f-nothing": {},
            }
            publish(settings, users, kind=ORDER)
            contracts = Contracts(settings)
            events = wait_for(
                settings,
                "notification.status",
                contracts.status,
                lambda got: (
                    settled(["f-refused", "f-nohook", "f-nothing"], "sms")(got)
                    and settled(["f-hook"], "webhook")(got)
                ),
                timeout_s=90,
            )
        finally:
            worker.stop()
    assert outcomes(events, "webhook") == {
        "f-hook": ("sent", None),
        "f-refused": ("dead_lettered", "permanent_failure"),
        "f-nohook": ("skipped", "no_webhook_endpoint"),
        "f-nothing": ("skipped", "no_webhook_endpoint"),
    }
    assert outcomes(events, "sms") == {
        "f-refused": ("sent", None),
        "f-nohook": ("sent", None),
        "f-nothing": ("skipped", "no_phone_number"),
    }
    # The SMS after the refused webhook is a route of its own, linked to the webhook's.
    hook_route = {e.route_id for e in events if e.user_id == "f-refused" and e.channel == "webhook"}
    (routed,) = [
        e
        for e in events
        if e.user_id == "f-refused" and e.channel == "sms" and e.status == "routed"
    ]
    assert routed.reason == "fallback"
    assert routed.detail == f"after webhook route {hook_route.pop()}"
    assert sorted(r.body.decode().split("To=")[1][:16] for r in sms.accepted()) == [
        "%2B4915123400002",
        "%2B4915123400003",
    ]
