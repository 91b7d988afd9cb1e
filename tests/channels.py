"""Helpers for the channel tests beyond the default catalog (webhook, Slack, SMS, and
email with a type's own in-doubt policy): a shop type on a channel, its users and
intents, and reading how their routes ended."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.contracts.records import StatusEvent, UserProfile
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from tests.endpoints import ScriptedEndpoints
from tests.support import fast_retries, with_types

SHIPPED = "shop.order.shipped"
NAMED = "ops.deploy"
SLACK_TEXT = "*Order {{ order_id }}* has shipped. <https://shop.example/orders|Your orders>"
SMS_TEXT = "Order {{ order_id }} has shipped.{% if note is defined %} {{ note }}{% endif %}"


def shop(
    settings: Settings, folder: Path, channel: str, in_doubt: str = "resend", **updates: Any
) -> Settings:
    """Settings with a shop type on ``channel`` (routes in doubt: ``in_doubt``) and a
    type posting to the named Slack webhook or webhook endpoint ``ops``, ``channel``
    retries of 1 s then 2 s for 3 attempts, a 2 s HTTP timeout."""
    fast = fast_retries(settings, folder / "topologies", channel, http_timeout_s=2.0)
    types: dict[str, dict[str, object]] = {
        SHIPPED: {
            "category": "shop",
            "channels": {"user": [channel]},
            "required": {"order_id": "string"},
            "in_doubt": in_doubt,
        }
    }
    templates = {
        SHIPPED: {"slack": SLACK_TEXT, "sms": SMS_TEXT, "subject": SMS_TEXT, "text": SMS_TEXT}
    }
    if channel in ("slack", "webhook"):
        types[NAMED] = {
            "category": "ops",
            "channels": {"user": [channel]},
            "required": {"order_id": "string"},
            f"{channel}_{'webhook' if channel == 'slack' else 'endpoint'}": "ops",
        }
        templates[NAMED] = {"slack": "Deploy {{ order_id }}"}
    return with_types(fast, folder, types, templates, **updates)


def slack_url(name: str) -> str:
    return f"https://hooks.slack.com/services/T0/B0/{name}"


def publish(
    settings: Settings,
    users: Mapping[str, Mapping[str, str]],
    kind: str = SHIPPED,
    payloads: Mapping[str, dict[str, str]] | None = None,
    key: str | None = None,
) -> None:
    """Each user with their contacts, then one intent each (idempotency key: ``key``,
    else one per type and user)."""
    with HeraldProducer(settings) as herald:
        for user, contacts in users.items():
            others = {channel: c for channel, c in contacts.items() if channel != "email"}
            herald.put_user(UserProfile(user_id=user, email=contacts.get("email"), contacts=others))
        for user in users:
            herald.publish_intent(
                notification_type=kind,
                producer="shop",
                idempotency_key=key or f"{kind}-{user}",
                recipient_user_ids=[user],
                payload=(payloads or {}).get(user, {"order_id": f"o-{user}"}),
            )


def settled(users: list[str], channel: str) -> Callable[[list[StatusEvent]], bool]:
    final = {"sent", "dead_lettered", "suppressed", "skipped"}

    def done(events: list[StatusEvent]) -> bool:
        ended = {e.user_id for e in events if e.channel == channel and e.status in final}
        return ended >= set(users)

    return done


def outcomes(events: list[StatusEvent], channel: str) -> dict[str | None, tuple[str, str | None]]:
    last: dict[str | None, tuple[str, str | None]] = {}
    for event in events:
        if event.channel == channel:
            last[event.user_id] = (event.status, event.reason)
    return last


def new_secret() -> str:
    """A fresh webhook signing secret."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def sms_updates(server: ScriptedEndpoints) -> dict[str, Any]:
    """Settings that send SMS through the Twilio-compatible API ``server`` plays."""
    return {
        "sms_provider": "twilio",
        "sms_base_url": server.url(""),
        "sms_account_sid": "AC0123",
        "sms_auth_token": "not-a-real-token",
        "sms_from": "+15005550006",
    }
