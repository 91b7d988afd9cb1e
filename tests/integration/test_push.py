"""The push channel in a real worker against the real broker: every user-facing type
reaches the gateway topic as its FlatBuffers table (read back with the generated
readers), an unmapped type dead-letters, stale pushes expire, a missing gateway topic
retries three times then dead-letters, and a dead device token stops being targeted."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from pipeline.contracts import Contracts
from pipeline.contracts.fbs import notification_generated as fbs
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import ChannelRequest, Intent, PushDevice, StatusEvent, UserProfile
from pipeline.ops.reader import read_messages, read_topic
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.topology import Catalog
from tests.support import HERALD, WorkerProcess, fast_retries, settings_env, wait_for
from tests.unit.test_push import SAMPLES

pytestmark = pytest.mark.integration

TTL_TYPES = {"game.turn.ready": 3600, "game.finished": 86400}


@pytest.fixture
def push_settings(isolated: Settings, tmp_path: Path) -> Settings:
    """Isolated settings: push retries wait 1 s, then 2 s, for 3 attempts; a 2 s gateway
    timeout; email goes to the stub provider (no SMTP server in these tests)."""
    return fast_retries(
        isolated,
        tmp_path / "topologies",
        "push",
        gateway_timeout_s=2.0,
        email_provider="stub",
    )


@contextmanager
def running_worker(settings: Settings, log: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(settings, log)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def push_worker(push_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    with running_worker(push_settings, tmp_path / "worker.log") as process:
        yield process


def put_users(settings: Settings, *profiles: UserProfile) -> None:
    with HeraldProducer(settings) as herald:
        for profile in profiles:
            herald.put_user(profile)


def publish(settings: Settings, notification_type: str, user: str, **fields: Any) -> Intent:
    with HeraldProducer(settings) as herald:
        return herald.publish_intent(
            notification_type=notification_type,
            producer="game-master",
            idempotency_key=f"{notification_type}-{user}-{uuid.uuid4().hex[:6]}",
            recipient_user_ids=[user],
            payload=fields.pop("payload", SAMPLES.get(notification_type)),
            trace_id=f"trace-{notification_type}",
            **fields,
        )


def push_events(
    settings: Settings, contracts: Contracts, wanted: int, terminal: frozenset[str]
) -> list[StatusEvent]:
    """Status events once ``wanted`` push routes reached a state in ``terminal``, each
    once (at-least-once writing may repeat an event; its id then repeats too)."""
    events = wait_for(
        settings,
        "notification.status",
        contracts.status,
        lambda evs: (
            len({e.route_id for e in evs if e.channel == "push" and e.status in terminal}) >= wanted
        ),
        timeout_s=90,
        what=f"{wanted} push routes in {sorted(terminal)}",
    )
    return list({e.event_id: e for e in events}.values())


def gateway_records(settings: Settings) -> list[Any]:
    return list(read_messages(settings, settings.gateway_topic_name))


def text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def test_every_type_reaches_the_gateway_as_its_table(
    push_settings: Settings, push_worker: WorkerProcess
) -> None:
    settings, contracts = push_settings, Contracts(push_settings)
    catalog = Catalog.load(settings)
    put_users(
        settings,
        UserProfile(
            user_id="u-en",
            email="en@example.org",
            push_devices=[PushDevice(token="en-phone", platform="ios")],
        ),
        UserProfile(
            user_id="u-de",
            preferred_language="de",
            push_devices=[PushDevice(token="de-phone"), PushDevice(token="de-tablet")],
        ),
    )
    intents = {
        name: publish(settings, name, "u-de" if index % 2 else "u-en")
        for index, name in enumerate(sorted(SAMPLES))
    }
    # A route of a type without a FlatBuffers table, as an older catalog could have
    # routed it: the channel must fail it permanently, not guess.
    unmapped = ChannelRequest(
        route_id=deterministic_id("unmapped", "push", "u-en"),
        notification_id="n-unmapped",
        notification_type="lobby.invite.revoked",
        channel="push",
        template_id="lobby.invite.revoked",
        user_id="u-en",
        device_tokens=["en-phone"],
        variables_json=json.dumps({"game_id": "g-9"}),
    )
    with HeraldProducer(settings) as herald:
        herald._produce(
            settings.topic("notification.push.requested"),
            b"u-en",
            contracts.channel_request.encode(unmapped),
            wait=True,
        )

    events = push_events(
        settings, contracts, len(intents) + 1, frozenset({"published", "dead_lettered"})
    )
    push = [e for e in events if e.channel == "push"]
    final = sorted(e.status for e in push if e.status in ("published", "dead_lettered"))
    assert final == ["dead_lettered"] + ["published"] * len(intents)
    assert [e.status for e in push if e.status not in ("routed", "published")] == [
        "failed",
        "dead_lettered",
    ]
    assert [(e.status, e.attempt, e.reason) for e in push if e.route_id == unmapped.route_id] == [
        ("failed", 1, "push_type_unmapped"),
        ("dead_lettered", 1, "permanent_failure"),
    ]
    (letter,) = [
        contracts.dead_letter.decode(value)
        for *_, value in read_topic(settings, settings.topic("notification.push.dlq"))
    ]
    assert (letter.route_id, letter.last_reason) == (unmapped.route_id, "push_type_unmapped")
    assert letter.error_class == "permanent"

    records = gateway_records(settings)
    assert len(records) == len(intents)  # one per published route, nothing else
    by_type = {}
    for record in records:
        envelope = fbs.Notification.GetRootAs(record.value(), 0)
        by_type[envelope.Type().decode()] = (record, envelope)
    assert sorted(by_type) == sorted(intents)
    for name, intent in intents.items():
        record, envelope = by_type[name]
        user = intent.recipient_user_ids[0]
        headers = {k: text(v) for k, v in record.headers() or []}
        route_id = next(e.route_id for e in push if e.notification_type == name)
        assert record.key() == user.encode()
        assert headers == {
            "notification_type": name,
            "notification_id": envelope.NotificationId().decode(),
            "route_id": route_id,
            "trace_id": f"trace-{name}",
        }
        assert envelope.RouteId().decode() == route_id
        assert envelope.UserId().decode() == user
        assert envelope.OccurredAtMs() == intent.occurred_at_ms
        ttl = catalog.types[name].push_ttl_s
        assert envelope.ExpiresAtMs() == intent.occurred_at_ms + ttl * 1000
        assert envelope.Locale().decode() == ("de" if user == "u-de" else "en")
        tokens = [envelope.DeviceTokens(i).decode() for i in range(envelope.DeviceTokensLength())]
        assert tokens == (["de-phone", "de-tablet"] if user == "u-de" else ["en-phone"])
        table = catalog.types[name].push_payload
        assert envelope.BodyType() == getattr(fbs.Body, str(table))
        body = getattr(fbs, str(table))()
        union = envelope.Body()
        body.Init(union.Bytes, union.Pos)
        for field, expected in json.loads(intent.payload_json).items():
            value = getattr(body, "".join(p.title() for p in field.split("_")))()
            assert (value.decode() if isinstance(value, bytes) else value) == expected, (
                name,
                field,
            )
        display = envelope.Display()
        link = display.Link().decode()
        assert link == f"https://play.example.com/games/{SAMPLES[name]['game_id']}"
    # Display texts from the push templates in the user's language (sorted types
    # alternate users: game.finished went to u-en, game.turn.ready to u-de).
    finished = by_type["game.finished"][1].Display()
    assert finished.Title().decode() == "Andromeda has finished"
    assert finished.ImageUrl().decode() == "https://play.example.com/games/g-1/final-map.png"
    turn = by_type["game.turn.ready"][1].Display()
    assert turn.Title().decode() == "Andromeda"
    assert turn.Body().decode() == "Zug 42 ist bereit. Du bist dran!"
    assert turn.ImageUrl() is None


def test_stale_pushes_expire_on_a_clock_two_hours_ahead(
    push_settings: Settings, tmp_path: Path
) -> None:
    ahead = push_settings.model_copy(update={"clock_offset_ms": 2 * 3600 * 1000})
    contracts = Contracts(ahead)
    put_users(ahead, UserProfile(user_id="u-1", push_devices=[PushDevice(token="t-1")]))
    with running_worker(ahead, tmp_path / "worker.log"):
        publish(ahead, "game.turn.ready", "u-1")  # TTL 1 h: stale when it would be published
        publish(ahead, "game.finished", "u-1")  # TTL 24 h: still fresh
        events = push_events(ahead, contracts, 2, frozenset({"published", "expired"}))
    outcome = {
        e.notification_type: (e.status, e.attempt)
        for e in events
        if e.channel == "push" and e.status in ("published", "expired")
    }
    assert outcome == {"game.turn.ready": ("expired", 0), "game.finished": ("published", 1)}
    (expired,) = [e for e in events if e.status == "expired"]
    assert "passed before publication" in (expired.detail or "")
    records = gateway_records(ahead)
    assert [fbs.Notification.GetRootAs(r.value(), 0).Type().decode() for r in records] == [
        "game.finished"
    ]


def test_a_missing_gateway_topic_retries_three_times_then_dead_letters(
    push_settings: Settings, tmp_path: Path
) -> None:
    missing = push_settings.model_copy(
        update={"gateway_topic": push_settings.topic("gateway.not-created")}
    )
    contracts = Contracts(missing)
    put_users(
        missing,
        UserProfile(user_id="u-1", email="u1@example.org", push_devices=[PushDevice(token="t")]),
    )
    with running_worker(missing, tmp_path / "worker.log"):
        publish(missing, "game.turn.ready", "u-1")
        events = push_events(missing, contracts, 1, frozenset({"dead_lettered"}))
    # The email route of the same intent was not held up by the push channel.
    assert any(e.channel == "email" and e.status == "sent" for e in events)
    push = [(e.status, e.attempt, e.reason) for e in events if e.channel == "push"]
    assert push == [
        ("routed", 0, None),
        ("failed", 1, "gateway_topic_missing"),
        ("retry_scheduled", 1, None),
        ("failed", 2, "gateway_topic_missing"),
        ("retry_scheduled", 2, None),
        ("failed", 3, "gateway_topic_missing"),
        ("dead_lettered", 3, "budget_exhausted"),
    ]
    (letter,) = [
        contracts.dead_letter.decode(value)
        for *_, value in read_topic(missing, missing.topic("notification.push.dlq"))
    ]
    assert letter.channel == "push"
    assert letter.error_class == "transient"
    assert [(a.number, a.outcome, a.reason) for a in letter.attempts] == [
        (n, "transient", "gateway_topic_missing") for n in (1, 2, 3)
    ]
    assert letter.origin_topic == missing.topic("notification.push.requested")
    assert contracts.channel_request.decode(letter.request).attempt == 3


def test_a_reported_dead_token_is_no_longer_targeted(
    push_settings: Settings, push_worker: WorkerProcess
) -> None:
    settings, contracts = push_settings, Contracts(push_settings)
    put_users(
        settings,
        UserProfile(
            user_id="u-two", push_devices=[PushDevice(token="t-dead"), PushDevice(token="t-live")]
        ),
        UserProfile(user_id="u-one", email="one@example.org", push_devices=[PushDevice(token="t")]),
    )
    publish(settings, "game.turn.ready", "u-two")
    push_events(settings, contracts, 1, frozenset({"published"}))

    with HeraldProducer(settings) as herald:
        herald.report_invalid_token("u-two", "t-dead", "unregistered", platform="android")
        herald.report_invalid_token("u-one", "t", "invalid_token")
    plain = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    plain.produce(settings.topic("gateway.device-feedback"), key=b"u-two", value=b"garbage")
    plain.flush(15)

    # The reports are recorded per user in the invalid token table's changelog.
    deadline = time.monotonic() + 60
    recorded: dict[str, Any] = {}
    while set(recorded) != {"u-one", "u-two"} and time.monotonic() < deadline:
        changelog = settings.topic("herald.push.tokens.changelog")
        recorded = {
            key.decode(): json.loads(value)
            for *_, key, value in read_topic(settings, changelog)
            if key and value
        }
        time.sleep(0.5)
    assert recorded["u-two"]["t-dead"]["reason"] == "unregistered"
    assert recorded["u-two"]["t-dead"]["platform"] == "android"
    assert list(recorded["u-one"]) == ["t"]
    (bad,) = wait_for(
        settings,
        "notification.malformed",
        contracts.malformed,
        lambda records: len(records) >= 1,
        what="the garbage feedback record",
    )
    assert bad.reason == "undecodable"
    assert bad.origin_topic == settings.topic("gateway.device-feedback")

    publish(settings, "game.turn.ready", "u-two")
    publish(settings, "game.turn.ready", "u-one")
    events = push_events(settings, contracts, 2, frozenset({"published"}))
    skipped = wait_for(
        settings,
        "notification.status",
        contracts.status,
        lambda evs: any(e.user_id == "u-one" and e.channel == "push" for e in evs),
        what="u-one's push decision",
    )
    assert [
        (e.status, e.reason) for e in skipped if e.user_id == "u-one" and e.channel == "push"
    ] == [("skipped", "no_push_device")]
    assert len([e for e in events if e.status == "published"]) == 2
    tokens = []
    for record in gateway_records(settings):
        envelope = fbs.Notification.GetRootAs(record.value(), 0)
        assert envelope.UserId().decode() == "u-two"
        tokens.append(
            [envelope.DeviceTokens(i).decode() for i in range(envelope.DeviceTokensLength())]
        )
    assert tokens == [["t-dead", "t-live"], ["t-live"]]

    # What an operator sees: `herald tail gateway` decodes the same records.
    shown = subprocess.run(
        [HERALD, "tail", "gateway"],
        env=settings_env(settings),
        capture_output=True,
        check=True,
        timeout=60,
    )
    lines = [json.loads(line) for line in shown.stdout.decode().splitlines()]
    assert [line["value"]["device_tokens"] for line in lines] == tokens
    assert {line["headers"]["notification_type"] for line in lines} == {"game.turn.ready"}
    assert [line["key"] for line in lines] == ["u-two", "u-two"]
