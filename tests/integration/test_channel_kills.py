"""Each HTTP channel (webhook, Slack, SMS) under a worker killed again and again
mid-send: every message is delivered, exactly once (Slack, SMS: routes in doubt held
for the operator) or once per webhook-id (webhook)."""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline.contracts import Contracts
from pipeline.ops.dlq import LetterFilter, read_letters, replay
from pipeline.settings import Settings
from tests.channels import new_secret, publish, settled, shop, slack_url, sms_updates
from tests.endpoints import ScriptedEndpoints, by_path, by_recipient
from tests.support import WorkerProcess, kill_mid_send, wait_for

pytestmark = pytest.mark.integration

COUNT = 600
#: SIGKILLs per channel: ten for the webhook (as issue 18 asks of email), five for each
#: of the others, which share its delivery path (pipeline.stages.channel).
KILLS = {"webhook": 10, "slack": 5, "sms": 5}


def channel_settings(
    channel: str, isolated: Settings, server: ScriptedEndpoints, tmp_path: Path
) -> tuple[Settings, dict[str, dict[str, str]]]:
    """Settings for ``channel`` against ``server``, and COUNT users with contacts on it."""
    updates: dict[str, Any]
    if channel == "webhook":
        updates = {
            "webhook_secret": new_secret(),
            "webhook_endpoints": {"ops": server.url("/ops")},
            "webhook_require_https": False,
        }
        contacts = [server.url(f"/h{i % 30}") for i in range(COUNT)]
    elif channel == "slack":
        updates = {"slack_base_url": server.url(""), "slack_webhooks": {"ops": slack_url("ops")}}
        contacts = [f"https://hooks.slack.com/services/T0/B0/h{i % 30}" for i in range(COUNT)]
    else:
        updates = sms_updates(server)
        contacts = [f"+4915123{i:06d}" for i in range(COUNT)]
    users = {f"k{i}": {channel: contact} for i, contact in enumerate(contacts)}
    in_doubt = "resend" if channel == "webhook" else "hold"
    return shop(isolated, tmp_path, channel, in_doubt, **updates), users


@pytest.mark.parametrize("channel", ["webhook", "slack", "sms"])
def test_a_worker_killed_again_and_again_delivers_each_message_once(
    channel: str, isolated: Settings, tmp_path: Path
) -> None:
    """One worker, SIGKILLed again and again (KILLS) while 600 routes are being sent
    (each request takes 250 ms, a few at once), each time 0.2-1.5 s after its first
    delivery, and restarted at once. Some routes are then in doubt: the provider had
    them when the sender died, before their outcome was recorded.

    webhook (``in_doubt: resend``): every route is sent, and a webhook-id reaches the
    receiver more than once only for a route reported ``in_doubt`` (a Standard Webhooks
    receiver drops the copy by its id). Slack and SMS (``in_doubt: hold``; neither API
    takes an idempotency key): no message ever reaches the provider twice; the routes
    in doubt are dead-lettered (``in_doubt``), and the operator replays those the
    provider never got, after which each message has been delivered exactly once."""
    key = by_recipient if channel == "sms" else by_path
    rng = random.Random(uuid.uuid4().int)
    with ScriptedEndpoints(key=key, default=("slow:0.25",)) as server:
        settings, users = channel_settings(channel, isolated, server, tmp_path)
        contracts = Contracts(settings)
        publish(settings, users)
        lives = kill_mid_send(settings, tmp_path, KILLS[channel], lambda: len(server.received), rng)
        progress = [life.delivered for life in lives]
        worker = WorkerProcess(settings, tmp_path / "worker-last.log")
        worker.start()
        try:
            events = wait_for(
                settings,
                "notification.status",
                contracts.status,
                settled(list(users), channel),
                timeout_s=180,
                what="every route settled",
            )
            in_doubt = {f"o-{e.user_id}" for e in events if e.status == "in_doubt"}
            got = orders(server)
            if channel != "webhook":
                assert max(got.values()) == 1, got.most_common(3)  # never a copy
                held = read_letters(
                    settings, contracts, LetterFilter(channel=channel, reason="in_doubt")
                )
                assert {f"o-{letter.user_id}" for letter in held} == in_doubt
                # The operator replays the held routes the provider never got.
                unsent = [letter for letter in held if f"o-{letter.user_id}" not in got]
                replay(settings, contracts, unsent, per_second=100)
                events = wait_for(
                    settings,
                    "notification.status",
                    contracts.status,
                    lambda found: len(orders(server)) == COUNT,
                    timeout_s=120,
                    what="the replayed routes sent",
                )
        finally:
            worker.stop()
        got = orders(server)
    # Every kill struck while messages were being sent, and the last was mid-stream.
    assert min(progress) > 0, progress
    assert sum(progress) < COUNT, progress
    assert set(got) == {f"o-{user}" for user in users}  # none missing, none foreign
    if channel == "webhook":
        sent = {e.user_id for e in events if e.channel == channel and e.status == "sent"}
        assert sent == set(users)
        repeated = {order for order, n in got.items() if n > 1}
        assert repeated <= in_doubt, (repeated - in_doubt, in_doubt)
    else:
        assert set(got.values()) == {1}  # each message delivered exactly once


def orders(server: ScriptedEndpoints) -> Counter[str]:
    """How often the provider accepted each order's message."""
    return Counter(
        match.group().decode()
        for r in server.accepted()
        if (match := re.search(rb"o-k\d+", r.body))
    )
