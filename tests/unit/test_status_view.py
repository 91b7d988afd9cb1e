"""The status view without a broker: projection, repeats, lookups, pagination, and the
OpenAPI document matching the routes the API serves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline.contracts import Contracts
from pipeline.contracts.records import Attempt, ChannelRequest, StatusEvent
from pipeline.errors import ValidationError
from pipeline.runtime.records import Out
from pipeline.settings import Settings
from pipeline.web.operator_api import Resends, openapi_document
from pipeline.web.server import create_app
from pipeline.web.status_store import DeliveryQuery, StatusStore, decode_cursor, encode_cursor

T0 = 1_800_000_000_000


def event(status: str, at: int, **fields: Any) -> StatusEvent:
    values: dict[str, Any] = {
        "event_id": f"{fields.get('route_id') or fields.get('notification_id', 'n-1')}-{status}-"
        f"{fields.get('attempt', 0)}",
        "status": status,
        "at_ms": T0 + at,
        "notification_id": "n-1",
        "notification_type": "game.turn.ready",
    }
    values.update(fields)
    return StatusEvent(**values)


def flow(store: StatusStore) -> None:
    events = [
        event("accepted", 0, producer="gm", idempotency_key="k", request_id="req-1"),
        event("routed", 1, route_id="r-mail", channel="email", user_id="u1", request_id="req-1"),
        event("routed", 1, route_id="r-push", channel="push", user_id="u1", request_id="req-1"),
        event("rendered", 2, route_id="r-mail", channel="email", user_id="u1", attempt=1),
        event("failed", 3, route_id="r-mail", channel="email", attempt=1, reason="smtp_deferred"),
        event("retry_scheduled", 3, route_id="r-mail", channel="email", attempt=1),
        event("published", 4, route_id="r-push", channel="push", user_id="u1", attempt=1),
        event("sent", 9, route_id="r-mail", channel="email", user_id="u1", attempt=2),
    ]
    store.apply(events, "status", {0: len(events)})


def test_a_notification_and_its_deliveries() -> None:
    store = StatusStore(":memory:")
    flow(store)
    found = store.notification("n-1")
    assert found is not None
    assert (found["status"], found["producer"], found["request_id"]) == ("accepted", "gm", "req-1")
    assert {(d["route_id"], d["status"], d["attempts"]) for d in found["deliveries"]} == {
        ("r-mail", "sent", 2),
        ("r-push", "published", 1),
    }
    assert [e["status"] for e in found["events"]] == ["accepted"]
    mail = store.delivery("r-mail")
    assert mail is not None
    assert [(e["status"], e["attempt"], e["reason"]) for e in mail["history"]] == [
        ("routed", 0, None),
        ("rendered", 1, None),
        ("failed", 1, "smtp_deferred"),
        ("retry_scheduled", 1, None),
        ("sent", 2, None),
    ]
    assert [n["notification_id"] for n in store.notifications_by_request("req-1")] == ["n-1"]
    assert store.notification("nope") is None
    assert store.delivery("nope") is None
    assert store.next_offsets("status") == {0: 8}


def test_refused_intents_are_found_by_request_id() -> None:
    """Intake's refusals name no notification; the view keeps them by request_id."""
    store = StatusStore(":memory:")
    flow(store)
    refusals = [
        event(
            "rejected",
            5,
            notification_id=None,
            event_id="e-rejected",
            producer="gm",
            idempotency_key="k-bad",
            request_id="req-1",
            reason="missing_payload_fields",
            detail="game_name",
        ),
        event(
            "rejected_conflict",
            6,
            notification_id=None,
            event_id="e-conflict",
            producer="gm",
            idempotency_key="k",
            request_id="req-1",
            reason="idempotency_conflict",
        ),
    ]
    store.apply([*refusals, refusals[0]], "status", {0: 11})
    found = store.rejections_by_request("req-1")
    assert [(r["status"], r["idempotency_key"], r["reason"]) for r in found] == [
        ("rejected", "k-bad", "missing_payload_fields"),
        ("rejected_conflict", "k", "idempotency_conflict"),
    ]
    assert store.rejections_by_request("req-2") == []
    # the notification of the same request is untouched
    assert [n["notification_id"] for n in store.notifications_by_request("req-1")] == ["n-1"]


def test_a_repeated_event_changes_nothing() -> None:
    store = StatusStore(":memory:")
    flow(store)
    # The same "routed" event written twice (at-least-once) after the route was sent.
    repeat = event("routed", 1, route_id="r-mail", channel="email", user_id="u1")
    assert store.apply([repeat], "status", {0: 9}) == 0
    assert (store.delivery("r-mail") or {})["status"] == "sent"


def test_pages_follow_creation_order_without_gaps_or_repeats() -> None:
    store = StatusStore(":memory:")
    events = []
    for i in range(23):
        # Several deliveries created in the same millisecond: the route id breaks ties.
        events.append(
            event(
                "routed",
                i // 3,
                route_id=f"r-{i:02d}",
                notification_id=f"n-{i}",
                channel="email" if i % 2 else "push",
                user_id="u1" if i % 4 else "u2",
            )
        )
    store.apply(events, "status", {0: len(events)})
    seen: list[str] = []
    cursor = None
    while True:
        after = decode_cursor(cursor) if cursor else None
        page, cursor = store.deliveries(DeliveryQuery(), limit=5, after=after)
        seen.extend(d["route_id"] for d in page)
        if cursor is None:
            break
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen)) == 23

    email_u1, cursor = store.deliveries(
        DeliveryQuery(channel="email", recipient="u1"), limit=100, after=None
    )
    assert cursor is None
    assert {d["route_id"] for d in email_u1} == {f"r-{i:02d}" for i in range(23) if i % 2 and i % 4}
    window, _ = store.deliveries(
        DeliveryQuery(since_ms=T0 + 2, until_ms=T0 + 4), limit=100, after=None
    )
    assert [d["route_id"] for d in window] == [f"r-{i:02d}" for i in range(6, 12)]


def test_the_routes_held_in_doubt_are_listed_by_their_reason() -> None:
    """status=dead_lettered&reason=in_doubt: what an operator decides on (in_doubt: hold)."""
    store = StatusStore(":memory:")
    ends = {"r-held": "in_doubt", "r-refused": "permanent_failure", "r-spent": "budget_exhausted"}
    events = [
        e
        for n, (route_id, reason) in enumerate(ends.items())
        for e in (
            event("routed", n, route_id=route_id, channel="sms", user_id="u1"),
            event("dead_lettered", n + 5, route_id=route_id, channel="sms", reason=reason),
        )
    ]
    store.apply(events, "status", {0: len(events)})
    held, _ = store.deliveries(
        DeliveryQuery(status="dead_lettered", reason="in_doubt"), limit=10, after=None
    )
    assert [d["route_id"] for d in held] == ["r-held"]
    dead, _ = store.deliveries(DeliveryQuery(status="dead_lettered"), limit=10, after=None)
    assert len(dead) == 3


def test_cursors_are_opaque_and_checked() -> None:
    assert decode_cursor(encode_cursor(5, "r-1")) == (5, "r-1")
    for bad in ("nope", encode_cursor(5, "r")[:-2] + "!!", "W10"):
        with pytest.raises(ValidationError):
            decode_cursor(bad)


def test_the_view_survives_a_restart_of_its_file(tmp_path: Path) -> None:
    path = tmp_path / "status.sqlite3"
    store = StatusStore(path)
    flow(store)
    store.close()
    again = StatusStore(path)
    assert again.next_offsets("status") == {0: 8}
    assert (again.delivery("r-push") or {})["status"] == "published"


def test_every_served_route_is_documented(settings: Settings, tmp_path: Path) -> None:
    app = create_app(settings.model_copy(update={"state_dir": tmp_path}))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (method, path)
        for path, operations in openapi_document()["paths"].items()
        for method in operations
    }
    assert served - {("get", "/api/v1/openapi.yaml"), ("get", "/api/v1/openapi.json")} == (
        documented
    )


class RecordingWriter:
    def __init__(self) -> None:
        self.records: list[Out] = []

    async def deliver(self, records: Sequence[Out]) -> None:
        self.records.extend(records)


async def test_only_finished_deliveries_with_a_known_route_are_resent(settings: Settings) -> None:
    contracts = Contracts(settings)
    store = StatusStore(":memory:")
    flow(store)
    writer = RecordingWriter()
    resends = Resends(settings, store, contracts, writer)  # type: ignore[arg-type]
    with pytest.raises(LookupError):
        await resends.resend("nope", None)
    store.apply([event("retry_scheduled", 10, route_id="r-push", channel="push")], "s", {0: 9})
    with pytest.raises(ValueError, match="not_terminal"):
        await resends.resend("r-push", None)
    with pytest.raises(ValueError, match="request_unavailable"):
        await resends.resend("r-mail", None)  # sent, but its route was never seen

    route = ChannelRequest(
        route_id="r-mail",
        notification_id="n-1",
        notification_type="game.turn.ready",
        channel="email",
        template_id="game.turn.ready",
        user_id="u1",
        address="u1@example.org",
        attempt=2,
        attempts=[Attempt(number=1, at_ms=T0, outcome="transient", reason="smtp_deferred")],
    )
    lane = "notification.email.requested"
    store.keep_requests([("r-mail", contracts.channel_request.encode(route))], lane, {0: 1})
    clone = await resends.resend("r-mail", "k-1")
    assert clone["resend_of"] == "r-mail"
    copy = contracts.channel_request.decode(writer.records[0].value)
    assert (writer.records[0].topic, writer.records[0].key) == (lane, b"u1")
    assert (copy.route_id, copy.attempt, copy.attempts) == (clone["route_id"], 0, [])
    linked = contracts.status.decode(writer.records[1].value)
    assert (linked.status, linked.reason, linked.detail) == ("routed", "resend", "r-mail")
    assert (await resends.resend("r-mail", "k-1"))["route_id"] == clone["route_id"]
