"""Enrichment and routing in a real worker on the real broker: every recipient of every
accepted intent ends in exactly one of routed, skipped, deferred or recipient_unknown
per channel, with the right address and locale."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.contracts import Contracts
from pipeline.contracts.records import (
    ChannelRequest,
    PushDevice,
    QuietHours,
    StatusEvent,
    UserProfile,
)
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from tests.support import WorkerProcess, read_all, wait_for

ROUTE_STATES = {"routed", "skipped", "deferred", "recipient_unknown"}
TURN = {"game_id": "g-1", "game_name": "Andromeda", "turn_number": 4}


@pytest.fixture
def fast(isolated: Settings, tmp_path: Path) -> Settings:
    """The isolated settings with a topology whose unknown-user wait is ~3 s."""
    folder = tmp_path / "topologies"
    folder.mkdir()
    shutil.copy(isolated.topology_dir / "catalog.yaml", folder / "catalog.yaml")
    doc = yaml.safe_load((isolated.topology_dir / "topics.yaml").read_text())
    doc["retry"]["recipients"] = {"budget": 4, "tiers": ["1s"]}
    (folder / "topics.yaml").write_text(yaml.safe_dump(doc))
    return isolated.model_copy(update={"topology_dir": folder})


@pytest.fixture
def fast_worker(fast: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(fast, tmp_path / "fast-worker.log")
    process.start()
    yield process
    process.stop()


def user(user_id: str, **fields: Any) -> UserProfile:
    return UserProfile(user_id=user_id, **fields)


def intent(herald: HeraldProducer, key: str, users: list[str], **extra: Any) -> None:
    herald.publish_intent(
        notification_type=extra.pop("notification_type", "game.turn.ready"),
        producer="game-master",
        idempotency_key=key,
        recipient_user_ids=users,
        payload=extra.pop("payload", TURN),
        **extra,
    )


def route_outcomes(
    events: list[StatusEvent], key: str
) -> dict[tuple[str | None, str | None], tuple[str, str | None]]:
    """(user, channel) -> (status, reason) for one intent; fails on a second outcome."""
    found: dict[tuple[str | None, str | None], tuple[str, str | None]] = {}
    for event in events:
        if event.idempotency_key == key and event.status in ROUTE_STATES:
            where = (event.user_id, event.channel)
            assert where not in found, f"two outcomes for {where}: {found[where]}, {event.status}"
            found[where] = (event.status, event.reason)
    return found


def requests(settings: Settings, contracts: Contracts, channel: str) -> list[ChannelRequest]:
    """The routes the route stage made on ``channel``: email ones on their lane, push
    ones (published by the route stage itself, docs/push.md) on notification.push.routes."""
    topic = "notification.push.routes" if channel == "push" else f"notification.{channel}.requested"
    return read_all(settings, topic, contracts.channel_request)


def test_users_are_joined_updated_forgotten_and_waited_for(
    fast: Settings, fast_worker: WorkerProcess
) -> None:
    contracts = Contracts(fast)
    with HeraldProducer(fast, contracts) as herald:
        herald.put_user(
            user(
                "u1",
                email="u1@example.org",
                preferred_language="de",
                push_devices=[PushDevice(token="t-1", platform="ios")],
            )
        )
        herald.put_user(user("u2", email="u2@example.org", preferred_language="fr"))
        herald.put_user(
            user(
                "u3",
                email="u3@example.org",
                opt_outs=["game"],
                push_devices=[PushDevice(token="t-3")],
            )
        )
        intent(herald, "first", ["u1", "u2", "u3", "late"])
        intent(
            herald,
            "admin",
            [],
            notification_type="geo.review_recommended",
            audience_kind="admin_email",
            payload={"user_id": "u9", "review_reason": "jump"},
        )
    time.sleep(1.0)
    with HeraldProducer(fast, contracts) as herald:  # the user service lags behind
        herald.put_user(user("late", email="late@example.org"))

    events = wait_for(
        fast,
        "notification.status",
        contracts.status,
        lambda evs: len(route_outcomes(evs, "first")) == 8,
        what="8 outcomes",
    )
    assert route_outcomes(events, "first") == {
        ("u1", "push"): ("routed", None),
        ("u1", "email"): ("routed", None),
        ("u2", "push"): ("skipped", "no_push_device"),
        ("u2", "email"): ("routed", None),
        ("u3", "push"): ("skipped", "opted_out"),
        ("u3", "email"): ("skipped", "opted_out"),
        ("late", "push"): ("skipped", "no_push_device"),
        ("late", "email"): ("routed", None),
    }
    emails = {r.user_id: r for r in requests(fast, contracts, "email")}
    assert (emails["u1"].address, emails["u1"].locale, emails["u1"].locale_fallback) == (
        "u1@example.org",
        "de",
        False,
    )
    assert (emails["u2"].locale, emails["u2"].locale_fallback) == ("en", True)
    assert emails["late"].address == "late@example.org"
    assert emails[None].address == "moderation@herald.invalid"  # the admin route
    [push] = requests(fast, contracts, "push")
    assert (push.user_id, push.device_tokens) == ("u1", ["t-1"])

    with HeraldProducer(fast, contracts) as herald:
        herald.put_user(user("u1", email="new-u1@example.org"))
        herald.delete_user("u2")
    time.sleep(1.0)  # the directory applies the changes before the next intent
    with HeraldProducer(fast, contracts) as herald:
        intent(herald, "second", ["u1", "u2"])
    events = wait_for(
        fast,
        "notification.status",
        contracts.status,
        lambda evs: len(route_outcomes(evs, "second")) == 4,
        what="4 outcomes",
    )
    assert route_outcomes(events, "second") == {
        ("u1", "push"): ("skipped", "no_push_device"),
        ("u1", "email"): ("routed", None),
        ("u2", "push"): ("recipient_unknown", None),
        ("u2", "email"): ("recipient_unknown", None),
    }
    second = [r for r in requests(fast, contracts, "email") if r.user_id == "u1"]
    # At least once: a route may be written twice (the email registry sends it once).
    addresses = {(r.route_id, r.address) for r in second}
    assert sorted(address or "" for _, address in addresses) == [
        "new-u1@example.org",
        "u1@example.org",
    ]


def test_quiet_hours_defer_until_the_window_ends(fast: Settings, tmp_path: Path) -> None:
    """The worker's clock is set to 06:59:20 UTC; the user is quiet 22:00-07:00 UTC, so
    the routes wait until the worker's 07:00 and then reach their channels; a critical
    one does not wait. (The window counts from the worker's start: 40 s leave room for
    a start slowed by a loaded machine, where 10 s did not in CI.)"""
    real = datetime.now(UTC)
    pretend = real.replace(hour=6, minute=59, second=20, microsecond=0)
    offset_ms = int((pretend - real) / timedelta(milliseconds=1))
    clocked = fast.model_copy(update={"clock_offset_ms": offset_ms})
    contracts = Contracts(clocked)
    worker = WorkerProcess(clocked, tmp_path / "clocked.log")
    worker.start()
    try:
        with HeraldProducer(clocked, contracts) as herald:
            herald.put_user(
                user(
                    "night",
                    email="night@example.org",
                    timezone="UTC",
                    quiet_hours=QuietHours(start="22:00", end="07:00"),
                    push_devices=[PushDevice(token="t-n")],
                )
            )
            time.sleep(1.0)
            intent(herald, "quiet", ["night"])
            intent(herald, "urgent", ["night"], priority="critical")
        events = wait_for(
            clocked,
            "notification.status",
            contracts.status,
            lambda evs: (
                len(route_outcomes(evs, "quiet")) == 2 and len(route_outcomes(evs, "urgent")) == 2
            ),
            what="outcomes",
        )
        assert set(route_outcomes(events, "quiet").values()) == {("deferred", "quiet_hours")}
        assert set(route_outcomes(events, "urgent").values()) == {("routed", None)}
        deferred_at = time.time()
        quiet_ids = {e.route_id for e in events if e.idempotency_key == "quiet"}
        early = {r.route_id for r in requests(clocked, contracts, "email")} & quiet_ids
        assert early == set()  # still waiting
        wait_for(
            clocked,
            "notification.email.requested",
            contracts.channel_request,
            lambda rs: len({r.route_id for r in rs} & quiet_ids) == 1,
            timeout_s=70,
            what="released email route",
        )
        wait_for(
            clocked,
            "notification.push.requested",
            contracts.channel_request,
            lambda rs: len({r.route_id for r in rs} & quiet_ids) == 1,
            timeout_s=70,
            what="released push route",
        )
        assert time.time() - deferred_at > 3  # released by the window end, not at once
    finally:
        worker.stop()


def test_restarted_worker_restores_the_user_table(fast: Settings, tmp_path: Path) -> None:
    contracts = Contracts(fast)
    first = WorkerProcess(fast, tmp_path / "first.log")
    first.start()
    with HeraldProducer(fast, contracts) as herald:
        for n in range(10):
            herald.put_user(user(f"r{n}", email=f"r{n}@example.org"), wait=False)
        herald.flush()
        time.sleep(1.0)
        intent(herald, "before", [f"r{n}" for n in range(10)])
    wait_for(
        fast,
        "notification.status",
        contracts.status,
        lambda evs: len(route_outcomes(evs, "before")) == 20,
        what="20 outcomes",
    )
    time.sleep(2)
    first.kill()
    second = WorkerProcess(fast, tmp_path / "second.log")
    second.start()
    try:
        with HeraldProducer(fast, contracts) as herald:
            intent(herald, "after", [f"r{n}" for n in range(10)])
        events = wait_for(
            fast,
            "notification.status",
            contracts.status,
            lambda evs: len(route_outcomes(evs, "after")) == 20,
            timeout_s=90,
            what="20 outcomes after restart",
        )
    finally:
        second.stop()
    outcomes = route_outcomes(events, "after")
    assert {outcomes[(f"r{n}", "email")] for n in range(10)} == {("routed", None)}
    after = {
        r.user_id: r.address
        for r in requests(fast, contracts, "email")
        if r.notification_id in {e.notification_id for e in events if e.idempotency_key == "after"}
    }
    assert after == {f"r{n}": f"r{n}@example.org" for n in range(10)}
