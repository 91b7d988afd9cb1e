"""A cancelled notification: the route stage and every channel's gate end its routes
``cancelled`` instead of routing or sending them."""

from __future__ import annotations

import json
from typing import Any

from pipeline.contracts import Contracts
from pipeline.contracts.records import ChannelRequest, PushDevice, Recipient, UserProfile
from pipeline.runtime.records import Out
from pipeline.settings import Settings
from pipeline.stages.channels import routings
from pipeline.stages.deliveries import Deliveries, registry_entry
from pipeline.stages.route import Router
from tests.unit.helpers import raw, stage_context

PAYLOAD = json.dumps({"game_id": "g", "game_name": "G", "turn_number": 2})


def statuses(outputs: list[Out], contracts: Contracts) -> list[tuple[str | None, str, str | None]]:
    events = [contracts.status.decode(o.value) for o in outputs if o.topic == "notification.status"]
    return sorted((e.channel, e.status, e.detail) for e in events)


def recipient(**fields: Any) -> Recipient:
    return Recipient(
        notification_id=fields.pop("notification_id", "n-1"),
        notification_type=fields.pop("notification_type", "game.turn.ready"),
        audience_kind=fields.pop("audience_kind", "user"),
        user_id=fields.pop("user_id", "u1"),
        producer="gm",
        idempotency_key="k",
        occurred_at_ms=1,
        accepted_at_ms=1,
        payload_json=fields.pop("payload_json", PAYLOAD),
        **fields,
    )


def test_the_route_stage_cancels_every_route_of_a_cancelled_notification(
    settings: Settings,
) -> None:
    ctx = stage_context(settings)
    contracts = ctx.contracts
    router = Router(ctx, routings(ctx, {}))
    user = UserProfile(user_id="u1", email="u1@example.org", push_devices=[PushDevice(token="t")])
    users = {b"u1": contracts.user.encode(user)}
    ctx.cancellations.put(b"n-1", {"by": "operator"})

    def routed(rec: Recipient, known: dict[bytes, bytes]) -> list[Out]:
        record = raw(contracts.recipient.encode(rec), topic="notification.recipients", key=b"u1")
        return router.handle(record, known, 1_000)

    cancelled = routed(recipient(), users)
    assert statuses(cancelled, contracts) == [
        ("email", "cancelled", "by operator"),
        ("push", "cancelled", "by operator"),
    ]
    assert all(o.topic == "notification.status" for o in cancelled)  # no route written
    # A recipient still waiting for its user is cancelled at its next lookup too.
    assert [s for _, s, _ in statuses(routed(recipient(), {}), contracts)] == ["cancelled"] * 2
    # Admin routes: one per address of the type's list.
    admin = recipient(
        notification_type="geo.review_recommended",
        audience_kind="admin_email",
        user_id=None,
        payload_json=json.dumps({"user_id": "u9", "review_reason": "x"}),
    )
    assert statuses(routed(admin, {}), contracts) == [("email", "cancelled", "by operator")]
    # Another notification is routed as ever.
    other = statuses(routed(recipient(notification_id="n-2"), users), contracts)
    assert [s for _, s, _ in other] == ["routed", "routed"]


def test_a_channel_settles_a_cancelled_route_without_sending_it(settings: Settings) -> None:
    ctx = stage_context(settings)
    contracts = ctx.contracts
    deliveries = Deliveries(ctx, "email")
    request = ChannelRequest(
        route_id="r-1",
        notification_id="n-1",
        notification_type="game.turn.ready",
        channel="email",
        template_id="game.turn.ready",
        address="u1@example.org",
        attempt=2,
    )
    record = raw(contracts.channel_request.encode(request), topic="notification.email.requested")
    registry: dict[bytes, Any] = {}
    assert isinstance(deliveries.accept(record, registry, 1_000), ChannelRequest)
    ctx.cancellations.put(b"n-1", {"by": "producer gm"})
    outputs = deliveries.accept(record, registry, 1_000)
    assert isinstance(outputs, list)
    assert statuses(outputs, contracts) == [("email", "cancelled", "by producer gm")]
    assert registry_entry(registry[b"r-1"]) is not None
    assert registry_entry(registry[b"r-1"])["state"] == "cancelled"  # type: ignore[index]
    # A later copy (a retry in flight, a replay of the lane) is already handled.
    assert deliveries.accept(record, registry, 2_000) == []
