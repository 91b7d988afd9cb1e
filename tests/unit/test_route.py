"""Routing decisions per recipient and channel, quiet hours, locales and delay tiers."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.contracts import Contracts
from pipeline.contracts.records import (
    ChannelRequest,
    PushDevice,
    QuietHours,
    Recipient,
    UserProfile,
)
from pipeline.errors import InDoubtError, PermanentError
from pipeline.rendering import TemplateCatalog
from pipeline.runtime.records import Out, RawRecord
from pipeline.runtime.tables import WriteBehind
from pipeline.settings import Settings
from pipeline.stages.channels import routings
from pipeline.stages.context import StageContext
from pipeline.stages.delay import ATTEMPT, DUE_AT, TARGET, DelayTiers, attempt_of
from pipeline.stages.deliveries import FALLBACK, Deliveries
from pipeline.stages.route import Router, RouteTables, quiet_until_ms
from pipeline.stages.users import UserDirectory
from pipeline.topology import Catalog, Topology
from pipeline.topology.catalog import FALLBACK_WHEN
from pipeline.topology.limits import Limits
from tests.unit.helpers import profile_record, raw, stage_context, users_home

NOON_UTC = int(datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
def contracts(settings: Settings) -> Contracts:
    return Contracts(settings)


@pytest.fixture
def router(settings: Settings, contracts: Contracts) -> Router:
    ctx = stage_context(settings)
    return Router(ctx, routings(ctx, {}))


def recipient(**overrides: Any) -> Recipient:
    fields: dict[str, Any] = {
        "notification_id": "n-1",
        "notification_type": "game.turn.ready",
        "audience_kind": "user",
        "user_id": "u1",
        "producer": "gm",
        "idempotency_key": "k",
        "occurred_at_ms": NOON_UTC,
        "accepted_at_ms": NOON_UTC,
        "payload_json": json.dumps({"game_id": "g", "game_name": "G", "turn_number": 2}),
    }
    fields.update(overrides)
    return Recipient(**fields)


def profile(**overrides: Any) -> UserProfile:
    fields: dict[str, Any] = {
        "user_id": "u1",
        "email": "u1@example.org",
        "push_devices": [PushDevice(token="tok-1", platform="ios")],
    }
    fields.update(overrides)
    return UserProfile(**fields)


def route(
    router: Router,
    contracts: Contracts,
    rec: Recipient,
    user: UserProfile | None,
    now: int = NOON_UTC,
    headers: tuple[tuple[str, bytes], ...] = (),
) -> list[Out]:
    users = {} if user is None else {user.user_id.encode(): contracts.user.encode(user)}
    record = raw(
        contracts.recipient.encode(rec),
        topic="notification.recipients",
        key=(rec.user_id or "").encode(),
        headers=headers,
    )
    return router.handle(record, users, now)


def outcomes(outputs: list[Out], contracts: Contracts) -> dict[str, tuple[str, str | None]]:
    """channel -> (status, reason) from the status events among ``outputs``."""
    events = [contracts.status.decode(o.value) for o in outputs if o.topic == "notification.status"]
    return {e.channel or "": (e.status, e.reason) for e in events}


def test_known_user_is_routed_on_every_channel(router: Router, contracts: Contracts) -> None:
    outputs = route(router, contracts, recipient(), profile(preferred_language="de"))
    assert outcomes(outputs, contracts) == {"push": ("routed", None), "email": ("routed", None)}
    requests = {
        o.topic: contracts.channel_request.decode(o.value)
        for o in outputs
        if o.topic.endswith(".requested")
    }
    email = requests["notification.email.requested"]
    push = requests["notification.push.requested"]
    assert (email.address, email.locale, email.locale_fallback) == ("u1@example.org", "de", False)
    assert push.device_tokens == ["tok-1"]
    assert push.deadline_ms == NOON_UTC + 3600 * 1000  # the type's push TTL
    assert email.template_id == "game.turn.ready"
    assert email.route_id != push.route_id
    assert all(o.key == b"u1" for o in outputs if o.topic.endswith(".requested"))


def test_route_ids_are_deterministic(router: Router, contracts: Contracts) -> None:
    first = route(router, contracts, recipient(), profile())
    assert first == route(router, contracts, recipient(), profile())


def test_unsupported_language_falls_back_to_en(router: Router, contracts: Contracts) -> None:
    outputs = route(router, contracts, recipient(), profile(preferred_language="fr"))
    email = next(
        contracts.channel_request.decode(o.value)
        for o in outputs
        if o.topic == "notification.email.requested"
    )
    assert (email.locale, email.locale_fallback) == ("en", True)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"channels_disabled": ["push"]},
            {"push": ("skipped", "channel_disabled"), "email": ("routed", None)},
        ),
        (
            {"opt_outs": ["game"]},
            {"push": ("skipped", "opted_out"), "email": ("skipped", "opted_out")},
        ),
        (
            {"opt_outs": ["email:game.turn.ready"]},
            {"push": ("routed", None), "email": ("skipped", "opted_out")},
        ),
        ({"email": None}, {"push": ("routed", None), "email": ("skipped", "no_email_address")}),
        ({"push_devices": []}, {"push": ("skipped", "no_push_device"), "email": ("routed", None)}),
    ],
)
def test_preferences_and_endpoints_skip_with_a_reason(
    router: Router,
    contracts: Contracts,
    changes: dict[str, Any],
    expected: dict[str, tuple[str, str | None]],
) -> None:
    assert (
        outcomes(route(router, contracts, recipient(), profile(**changes)), contracts) == expected
    )


def test_critical_bypasses_optional_opt_outs_only(router: Router, contracts: Contracts) -> None:
    user = profile(opt_outs=["game"])
    finished = recipient(notification_type="game.finished", priority="critical")
    assert outcomes(route(router, contracts, finished, user), contracts)["email"] == (
        "routed",
        None,
    )
    turn = recipient(priority="critical")  # game.turn.ready honours opt-outs always
    assert outcomes(route(router, contracts, turn, user), contracts)["email"] == (
        "skipped",
        "opted_out",
    )
    login = recipient(notification_type="auth.login_code", payload_json='{"code": "1"}')
    disabled = profile(channels_disabled=["email"], opt_outs=["auth"])
    assert outcomes(route(router, contracts, login, disabled), contracts) == {
        "email": ("routed", None)
    }


def test_quiet_hours_defer_to_the_window_end(router: Router, contracts: Contracts) -> None:
    user = profile(timezone="Europe/Berlin", quiet_hours=QuietHours(start="13:00", end="15:00"))
    outputs = route(router, contracts, recipient(), user)  # 14:00 in Berlin (CEST)
    assert {c: s for c, (s, _) in outcomes(outputs, contracts).items()} == {
        "push": "deferred",
        "email": "deferred",
    }
    window_end = int(datetime(2026, 6, 1, 13, 0, tzinfo=UTC).timestamp() * 1000)
    delayed = [o for o in outputs if ".retry." in o.topic]
    assert {dict(o.headers)[TARGET] for o in delayed} == {
        b"notification.email.requested",
        b"notification.push.requested",
    }
    assert {dict(o.headers)[DUE_AT] for o in delayed} == {str(window_end).encode()}
    critical = route(router, contracts, recipient(priority="critical"), user)
    assert {s for s, _ in outcomes(critical, contracts).values()} == {"routed"}


@pytest.mark.parametrize(
    ("local_time", "window", "inside"),
    [
        ("23:30", ("22:00", "07:00"), True),
        ("06:59", ("22:00", "07:00"), True),
        ("07:00", ("22:00", "07:00"), False),
        ("12:00", ("22:00", "07:00"), False),
        ("12:00", ("12:00", "12:00"), False),
        ("12:00", ("bad", "07:00"), False),
    ],
)
def test_quiet_windows(local_time: str, window: tuple[str, str], inside: bool) -> None:
    hour, minute = map(int, local_time.split(":"))
    now = int(datetime(2026, 1, 10, hour, minute, tzinfo=UTC).timestamp() * 1000)
    until = quiet_until_ms(QuietHours(start=window[0], end=window[1]), "UTC", now)
    assert (until is not None) == inside
    if until is not None:
        assert datetime.fromtimestamp(until / 1000, UTC).strftime("%H:%M") == window[1]
        assert until > now


def test_unknown_user_waits_then_is_recorded(
    router: Router, contracts: Contracts, settings: Settings
) -> None:
    [wait] = route(router, contracts, recipient(), None)
    assert wait.topic.startswith("notification.recipients.retry.")
    assert dict(wait.headers)[TARGET] == b"notification.recipients.rejoin"
    assert attempt_of(wait.headers) == 1
    budget = Topology.load(settings).retry["recipients"].budget
    last = ((ATTEMPT, str(budget - 1).encode()),)
    outputs = route(router, contracts, recipient(), None, headers=last)
    assert outcomes(outputs, contracts) == {
        "push": ("recipient_unknown", None),
        "email": ("recipient_unknown", None),
    }


def test_admin_route_uses_the_configured_list(router: Router, contracts: Contracts) -> None:
    admin = recipient(
        notification_type="geo.review_recommended", audience_kind="admin_email", user_id=None
    )
    outputs = route(router, contracts, admin, None)
    [request] = [
        contracts.channel_request.decode(o.value)
        for o in outputs
        if o.topic == "notification.email.requested"
    ]
    assert (request.channel, request.address, request.user_id) == (
        "email",
        "moderation@herald.invalid",
        None,
    )
    assert outcomes(outputs, contracts) == {"email": ("routed", None)}


def test_locales_resolve_by_base_language(tmp_path: Path) -> None:
    for locale in ("en", "pt", "de"):
        (tmp_path / "t" / locale).mkdir(parents=True)
    locales = TemplateCatalog(tmp_path)
    assert locales.resolve("t", "pt-BR") == ("pt", False)
    assert locales.resolve("t", "DE") == ("de", False)
    assert locales.resolve("t", "ja") == ("en", True)
    assert locales.resolve("t", None) == ("en", False)
    assert locales.resolve("missing", "de") == ("en", True)


def test_delay_tiers_pick_and_back_off(settings: Settings) -> None:
    tiers = DelayTiers.of(Topology.load(settings).retry["email"], settings)
    assert tiers.tier_for(0) == 0
    assert tiers.tier_for(59) == 0
    assert tiers.tier_for(60) == 1
    assert tiers.tier_for(8 * 3600) == 3
    assert [tiers.backoff_s(a) for a in (1, 2, 3, 4, 9)] == [10, 20, 40, 80, 1800]
    rng = random.Random(7)
    assert all(5 <= tiers.backoff_s(1, rng) <= 10 for _ in range(100))


def test_user_directory_keeps_latest_profile_and_forgets_on_tombstone(
    settings: Settings, contracts: Contracts
) -> None:
    directory = UserDirectory(stage_context(settings))
    table: dict[bytes, Any] = {}
    view = WriteBehind(table)
    home = users_home(settings)
    value = contracts.user.encode(profile())
    assert directory.handle(profile_record(settings, value), view, NOON_UTC) == []
    view.commit()
    assert table == {b"u1": value}
    elsewhere = profile_record(settings, value, partition=(home + 1) % 6)
    [moved] = directory.handle(elsewhere, view, NOON_UTC)
    assert (moved.topic, moved.partition) == ("notification.users.keyed", home)
    directory.handle(profile_record(settings, None), view, NOON_UTC)
    view.commit()
    assert table == {}
    [bad] = directory.handle(
        raw(value, topic="notification.users.keyed", key=b"u2"), view, NOON_UTC
    )
    assert contracts.malformed.decode(bad.value).reason == "key_mismatch"


@pytest.fixture
def fallback_router(settings: Settings) -> tuple[Router, StageContext]:
    """A router whose game.turn.ready tries push, then email (the catalog's fallback)."""
    ctx = stage_context(settings)
    types = dict(ctx.catalog.types)
    types["game.turn.ready"] = dataclasses.replace(
        types["game.turn.ready"], fallback_when=frozenset(FALLBACK_WHEN)
    )
    ctx = dataclasses.replace(ctx, catalog=Catalog(types))
    return Router(ctx, routings(ctx, {})), ctx


def first_route(router: Router, contracts: Contracts) -> tuple[ChannelRequest, RawRecord]:
    """The one route a fallback type's recipient gets, and its record as its channel's
    stage reads it (on the user's partition, 4)."""
    (out,) = [
        o for o in route(router, contracts, recipient(), profile()) if o.topic.endswith("requested")
    ]
    lane = raw(out.value, topic=out.topic, key=b"u1", partition=4)
    return contracts.channel_request.decode(out.value), lane


def test_a_fallback_type_routes_only_its_first_channel_that_can_take_it(
    fallback_router: tuple[Router, StageContext], contracts: Contracts
) -> None:
    router, _ = fallback_router
    with_device = route(router, contracts, recipient(), profile())
    assert outcomes(with_device, contracts) == {"push": ("routed", None)}
    without = route(router, contracts, recipient(), profile(push_devices=[]))
    assert outcomes(without, contracts) == {
        "push": ("skipped", "no_push_device"),
        "email": ("routed", None),
    }


def test_a_dead_lettered_route_of_a_fallback_type_gets_the_next_channel(
    fallback_router: tuple[Router, StageContext], contracts: Contracts
) -> None:
    router, ctx = fallback_router
    push, lane = first_route(router, contracts)
    deliveries = Deliveries(ctx, "push")
    assert deliveries.fallback(lane, push, "published") == []
    (back,) = deliveries.fallback(lane, push, "dead_lettered")
    assert (back.topic, back.key, back.partition) == ("notification.recipients.rejoin", b"u1", 4)
    assert back.headers == ((FALLBACK, b"push"),)
    user = profile()
    record = raw(back.value, topic=back.topic, key=back.key, headers=back.headers)
    outputs = router.handle(record, {b"u1": contracts.user.encode(user)}, NOON_UTC)
    assert outcomes(outputs, contracts) == {"email": ("routed", "fallback")}
    (event,) = [contracts.status.decode(o.value) for o in outputs if o.topic.endswith("status")]
    assert event.detail == f"after push route {push.route_id}"
    (email,) = [
        contracts.channel_request.decode(o.value) for o in outputs if o.topic.endswith("requested")
    ]
    assert (email.channel, email.address, email.notification_id) == (
        "email",
        "u1@example.org",
        push.notification_id,
    )
    # The last channel of the chain has nothing after it.
    assert deliveries.fallback(lane, email, "dead_lettered") == []


def test_a_route_held_in_doubt_does_not_fall_back(
    fallback_router: tuple[Router, StageContext], contracts: Contracts
) -> None:
    """It may have reached the user: the operator decides, not the fallback. Its end
    says why (dead_lettered, reason in_doubt), so the operator API lists the held
    routes."""
    router, ctx = fallback_router
    push, lane = first_route(router, contracts)
    deliveries = Deliveries(ctx, "push")
    rejoin = "notification.recipients.rejoin"
    held = deliveries.failed(lane, {}, push, 1, InDoubtError("outcome unknown"))
    assert "notification.push.dlq" in {o.topic for o in held}
    assert rejoin not in {o.topic for o in held}
    refused = deliveries.failed(lane, {}, push, 1, PermanentError("refused"))
    assert rejoin in {o.topic for o in refused}
    ends = {
        name: [
            (e.status, e.reason)
            for o in outputs
            if o.topic == "notification.status"
            and (e := contracts.status.decode(o.value)).status == "dead_lettered"
        ]
        for name, outputs in (("held", held), ("refused", refused))
    }
    assert ends == {
        "held": [("dead_lettered", "in_doubt")],
        "refused": [("dead_lettered", "permanent_failure")],
    }


def test_each_priority_takes_its_lane(router: Router, contracts: Contracts) -> None:
    """Email has a lane per priority but normal (issue 16): a backlog on one never
    delays another. Push has one lane (its routes are published at routing)."""
    lanes = {}
    for priority in ("critical", "high", "normal", "low"):
        outputs = route(router, contracts, recipient(priority=priority), profile())
        lanes[priority] = sorted(o.topic for o in outputs if o.topic != "notification.status")
    assert lanes == {
        "critical": ["notification.email.priority", "notification.push.requested"],
        "high": ["notification.email.high", "notification.push.requested"],
        "normal": ["notification.email.requested", "notification.push.requested"],
        "low": ["notification.email.low", "notification.push.requested"],
    }


def limited_router(settings: Settings, users: list[dict[str, Any]]) -> Router:
    ctx = dataclasses.replace(stage_context(settings), limits=Limits.from_dict({"users": users}))
    return Router(ctx, routings(ctx, {}))


def test_a_user_limit_defers_a_route_to_the_first_window_with_room(
    settings: Settings, contracts: Contracts
) -> None:
    router = limited_router(
        settings,
        [
            {"channel": "email", "category": "game", "max": 2, "per": "1h"},
            {"channel": "email", "max": 3, "per": "1d"},  # every category
        ],
    )
    limits: dict[bytes, Any] = {}
    hour = 3600 * 1000
    now = NOON_UTC + 60_000  # 12:01

    def email(n: int, priority: str = "normal", at: int = now) -> tuple[str, str | None, int]:
        rec = recipient(notification_id=f"n-{n}", priority=priority)
        record = raw(contracts.recipient.encode(rec), topic="notification.recipients", key=b"u1")
        users = {b"u1": contracts.user.encode(profile())}
        outputs = router.handle(record, users, at, RouteTables(limits=limits))
        (event,) = [
            e
            for e in (contracts.status.decode(o.value) for o in outputs if "status" in o.topic)
            if e.channel == "email"
        ]
        routes = [
            contracts.channel_request.decode(o.value)
            for o in outputs
            if o.topic != "notification.status"
        ]
        (due,) = [r.due_at_ms for r in routes if r.channel == "email"]
        return event.status, event.reason, due

    assert email(1)[:2] == ("routed", None)
    assert email(2)[:2] == ("routed", None)
    # The hour's two are spent: the third waits for 13:00, in the channel's tiers.
    assert email(3) == ("deferred", "rate_limited", NOON_UTC + hour)
    # 13:00's window has room for one more, then the day's three are spent.
    assert email(4) == ("deferred", "rate_limited", NOON_UTC + 12 * hour)  # next day, 00:00
    # Critical routes are neither held nor counted; push is not limited at all.
    assert email(5, priority="critical")[:2] == ("routed", None)
    state = limits[b"u1"]
    assert state["email|game"] == {
        str(NOON_UTC): 2,
        str(NOON_UTC + hour): 1,
        str(NOON_UTC + 12 * hour): 1,
    }
    # Windows that have closed are dropped from the state as it is written.
    email(6, at=NOON_UTC + 13 * hour)
    assert str(NOON_UTC) not in limits[b"u1"]["email|game"]
