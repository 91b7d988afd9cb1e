"""The Slack and SMS channels in a real worker, against a real local HTTP server playing
Slack's incoming webhooks and a Twilio-compatible API: every route ends sent,
skipped or dead-lettered with its history."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from pipeline.contracts import Contracts
from pipeline.settings import Settings
from tests.channels import NAMED, outcomes, publish, settled, shop, slack_url, sms_updates
from tests.endpoints import ScriptedEndpoints, by_recipient, endpoint_server
from tests.support import WorkerProcess, read_all, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def slack_server() -> Iterator[ScriptedEndpoints]:
    yield from endpoint_server(
        {
            "/services/T0/B0/busy": ["429:2", "ok"],
            "/services/T0/B0/gone": ["404"],
        }
    )


def test_every_slack_route_ends_sent_skipped_or_dead_lettered(
    isolated: Settings, slack_server: ScriptedEndpoints, tmp_path: Path
) -> None:
    settings = shop(
        isolated,
        tmp_path,
        "slack",
        slack_base_url=slack_server.url(""),
        slack_webhooks={"ops": slack_url("ops")},
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        users = {
            "s-ok": {"slack": slack_url("ok")},
            "s-busy": {"slack": slack_url("busy")},
            "s-gone": {"slack": slack_url("gone")},
            "s-evil": {"slack": "https://evil.example/services/T0/B0/x"},
            "s-none": {},
        }
        sneaky = "<!channel> <https://evil.example|click> & more"
        publish(settings, users, payloads={"s-ok": {"order_id": sneaky}})
        publish(settings, {"ops-1": {}}, kind=NAMED)
        contracts = Contracts(settings)
        events = wait_for(
            settings,
            "notification.status",
            contracts.status,
            settled([*users, "ops-1"], "slack"),
            timeout_s=90,
        )
    finally:
        worker.stop()
    assert outcomes(events, "slack") == {
        "s-ok": ("sent", None),
        "s-busy": ("sent", None),
        "s-gone": ("dead_lettered", "permanent_failure"),
        "s-evil": ("skipped", "invalid_slack_webhook"),
        "s-none": ("skipped", "no_slack_webhook"),
        "ops-1": ("sent", None),
    }
    (ok,) = slack_server.accepted("/services/T0/B0/ok")
    body = json.loads(ok.body)
    # The variable's mention and link are shown as text; the template's own link stays.
    expected = (
        "*Order &lt;!channel&gt; &lt;https://evil.example|click&gt; &amp; more* has shipped. "
        "<https://shop.example/orders|Your orders>"
    )
    assert body["text"] == expected
    assert body["blocks"] == [{"type": "section", "text": {"type": "mrkdwn", "text": expected}}]
    (deploy,) = slack_server.accepted("/services/T0/B0/ops")
    assert json.loads(deploy.body)["text"] == "Deploy o-ops-1"
    busy = [r for r in slack_server.received if r.key == "/services/T0/B0/busy"]
    assert [r.status for r in busy] == [429, 200]
    assert busy[1].at - busy[0].at >= 2.0  # Retry-After: 2, not the 1 s tier
    (letter,) = read_all(settings, "notification.slack.dlq", contracts.dead_letter)
    assert (letter.user_id, letter.last_reason, letter.last_code) == (
        "s-gone",
        "http_rejected",
        404,
    )
    # The named webhook's URL (its credential) is in no route: only its name is.
    requests = read_all(settings, "notification.slack.requested", contracts.channel_request)
    assert {r.address for r in requests if r.user_id == "ops-1"} == {"named:ops"}


@pytest.fixture
def sms_server() -> Iterator[ScriptedEndpoints]:
    yield from endpoint_server(
        {"+4915123456702": ["500", "ok"], "+4915123456703": ["400"]}, key=by_recipient
    )


def test_every_sms_route_ends_sent_skipped_or_dead_lettered(
    isolated: Settings, sms_server: ScriptedEndpoints, tmp_path: Path
) -> None:
    settings = shop(isolated, tmp_path, "sms", **sms_updates(sms_server))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        users = {
            "t-ok": {"sms": "+49 151 2345 6701"},
            "t-flaky": {"sms": "+4915123456702"},
            "t-bad": {"sms": "+4915123456703"},
            "t-long": {"sms": "+4915123456704"},
            "t-none": {},
        }
        long_note = "Ünïcode makes this UCS-2. " * 12  # > 3 segments of 67
        publish(settings, users, payloads={"t-long": {"order_id": "o-long", "note": long_note}})
        contracts = Contracts(settings)
        events = wait_for(
            settings,
            "notification.status",
            contracts.status,
            settled(list(users), "sms"),
            timeout_s=90,
        )
    finally:
        worker.stop()
    assert outcomes(events, "sms") == {
        "t-ok": ("sent", None),
        "t-flaky": ("sent", None),
        "t-bad": ("dead_lettered", "permanent_failure"),
        "t-long": ("dead_lettered", "permanent_failure"),
        "t-none": ("skipped", "no_phone_number"),
    }
    (ok,) = sms_server.accepted("+4915123456701")
    assert ok.path == "/2010-04-01/Accounts/AC0123/Messages.json"
    assert ok.headers["Authorization"].startswith("Basic ")
    assert parse_qs(ok.body.decode()) == {
        "To": ["+4915123456701"],
        "From": ["+15005550006"],
        "Body": ["Order o-t-ok has shipped."],
    }
    letters = {
        letter.user_id: letter
        for letter in read_all(settings, "notification.sms.dlq", contracts.dead_letter)
    }
    assert letters["t-long"].last_reason == "sms_too_long"
    assert "segments" in letters["t-long"].last_error
    assert (letters["t-bad"].last_reason, letters["t-bad"].last_code) == ("http_rejected", 400)
    assert sms_server.attempts["+4915123456704"] == 0
