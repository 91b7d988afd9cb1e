"""Intake decisions over a plain dict table: outputs per input, exactly."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.contracts import Contracts
from pipeline.runtime.records import Out
from pipeline.runtime.tables import WriteBehind
from pipeline.settings import Settings
from pipeline.stages.intake import Intake
from pipeline.topology import Topology
from pipeline.topology.partitioning import partition_for
from tests.unit.helpers import make_intent, raw, stage_context

NOW = 1_800_000_000_000


@pytest.fixture
def contracts(settings: Settings) -> Contracts:
    return Contracts(settings)


@pytest.fixture
def intake(settings: Settings, contracts: Contracts) -> Intake:
    return Intake(stage_context(settings))


def home(intent_key: str, settings: Settings) -> dict[str, Any]:
    """Where a well-behaved producer puts an intent: canonical key, home partition."""
    key = intent_key.encode()
    partitions = Topology.load(settings).spec("notification.intents").partitions
    return {"key": key, "partition": partition_for(key, partitions)}


def statuses(outputs: list[Out], contracts: Contracts) -> list[str]:
    return [
        contracts.status.decode(o.value).status for o in outputs if o.topic == "notification.status"
    ]


def on(topic: str, outputs: list[Out]) -> list[Out]:
    return [o for o in outputs if o.topic == topic]


def test_accepted_intent_fans_out_per_recipient(
    intake: Intake, contracts: Contracts, settings: Settings
) -> None:
    intent = make_intent(recipient_user_ids=["u1", "u2", "u1"])
    table: dict[bytes, Any] = {}
    outputs = intake.handle(
        raw(contracts.intent.encode(intent), **home(intent.idempotency_id, settings)), table, NOW
    )
    assert statuses(outputs, contracts) == ["accepted"]
    recipients = [
        contracts.recipient.decode(o.value) for o in on("notification.recipients", outputs)
    ]
    assert [r.user_id for r in recipients] == ["u1", "u2"]
    assert [o.key for o in on("notification.recipients", outputs)] == [b"u1", b"u2"]
    assert len({r.notification_id for r in recipients}) == 1
    assert table[intent.idempotency_id.encode()]["nid"] == recipients[0].notification_id
    # The payload travels as the producer wrote it (validated, not re-serialized).
    assert {r.payload_json for r in recipients} == {intent.payload_json}


def test_duplicate_conflict_and_expiry(
    intake: Intake, contracts: Contracts, settings: Settings
) -> None:
    intent = make_intent()
    where = home(intent.idempotency_id, settings)
    table: dict[bytes, Any] = {}
    first = intake.handle(raw(contracts.intent.encode(intent), **where), table, NOW)
    nid = contracts.status.decode(first[0].value).notification_id

    retry = make_intent(request_id="another-request", trace_id="another-trace")
    dup = intake.handle(raw(contracts.intent.encode(retry), offset=1, **where), table, NOW + 5)
    assert statuses(dup, contracts) == ["duplicate"]
    assert contracts.status.decode(dup[0].value).notification_id == nid
    assert not on("notification.recipients", dup)

    changed = make_intent(recipient_user_ids=["u3"])
    conflict = intake.handle(
        raw(contracts.intent.encode(changed), offset=2, **where), table, NOW + 6
    )
    event = contracts.status.decode(conflict[0].value)
    assert (event.status, event.reason, event.notification_id) == (
        "rejected_conflict",
        "idempotency_conflict",
        None,
    )
    assert nid is not None
    assert nid in (event.detail or "")

    window_ms = settings.idempotency_window_s * 1000
    assert intake.expired_keys(table, NOW + window_ms - 1) == []
    assert intake.expired_keys(table, NOW + window_ms) == [intent.idempotency_id.encode()]
    later = intake.handle(
        raw(contracts.intent.encode(changed), offset=3, **where), table, NOW + window_ms
    )
    assert statuses(later, contracts) == ["accepted"]


def test_reprocessing_gives_identical_outputs(
    intake: Intake, contracts: Contracts, settings: Settings
) -> None:
    """After a crash before the table entry was saved, the re-run writes the same ids."""
    intent = make_intent()
    record = raw(contracts.intent.encode(intent), **home(intent.idempotency_id, settings))
    assert intake.handle(record, {}, NOW) == intake.handle(record, {}, NOW)


def test_wrong_partition_or_key_moves_to_the_keyed_topic(
    intake: Intake, contracts: Contracts, settings: Settings
) -> None:
    intent = make_intent()
    where = home(intent.idempotency_id, settings)
    value = contracts.intent.encode(intent)
    elsewhere = (where["partition"] + 1) % 6
    for record in (
        raw(value, partition=where["partition"], key=None),
        raw(value, partition=elsewhere, key=where["key"]),
    ):
        table: dict[bytes, Any] = {}
        [moved] = intake.handle(record, table, NOW)
        assert (moved.topic, moved.key, moved.partition, moved.value) == (
            "notification.intents.keyed",
            where["key"],
            where["partition"],
            value,
        )
        assert table == {}
    # On the keyed topic the record is processed wherever it is.
    out = intake.handle(raw(value, topic="notification.intents.keyed", partition=3), {}, NOW)
    assert statuses(out, contracts) == ["accepted"]


def test_admin_email_gets_one_admin_route(
    intake: Intake, contracts: Contracts, settings: Settings
) -> None:
    intent = make_intent(
        notification_type="game.generation_failed",
        audience_kind="admin_email",
        recipient_user_ids=[],
        payload={"game_id": "g", "game_name": "G", "failure_reason": "oom"},
    )
    outputs = intake.handle(
        raw(contracts.intent.encode(intent), **home(intent.idempotency_id, settings)), {}, NOW
    )
    [route] = on("notification.recipients", outputs)
    recipient = contracts.recipient.decode(route.value)
    assert (recipient.audience_kind, recipient.user_id) == ("admin_email", None)
    assert route.key == recipient.notification_id.encode()


def test_type_that_produces_nothing_is_remembered_but_not_routed(
    intake: Intake, contracts: Contracts, settings: Settings
) -> None:
    intent = make_intent(notification_type="lobby.invite.revoked", payload={"game_id": "g"})
    table: dict[bytes, Any] = {}
    outputs = intake.handle(
        raw(contracts.intent.encode(intent), **home(intent.idempotency_id, settings)), table, NOW
    )
    assert statuses(outputs, contracts) == ["accepted", "ignored"]
    assert not on("notification.recipients", outputs)
    assert intent.idempotency_id.encode() in table


def test_malformed_records_keep_bytes_reason_and_origin(
    intake: Intake, contracts: Contracts
) -> None:
    garbage = b"\x00\x00\x00\x00\x01\xff\xfe"
    [out] = intake.handle(raw(garbage, partition=2, offset=41, key=b"k"), {}, NOW)
    bad = contracts.malformed.decode(out.value)
    assert out.topic == "notification.intents.malformed"
    assert (bad.reason, bad.origin_topic, bad.origin_partition, bad.origin_offset) == (
        "undecodable",
        "notification.intents",
        2,
        41,
    )
    assert (bad.raw_value, bad.raw_key) == (garbage, b"k")

    invalid = make_intent(notification_type="nope", request_id="req-9")
    [out, status] = intake.handle(raw(contracts.intent.encode(invalid)), {}, NOW)
    bad = contracts.malformed.decode(out.value)
    assert (bad.reason, bad.producer, bad.notification_type) == (
        "unknown_notification_type",
        "game-master",
        "nope",
    )
    # The producer learns of it where it follows its intents: a status event.
    refused = contracts.status.decode(status.value)
    assert status.topic == "notification.status"
    assert status.key == invalid.idempotency_id.encode()
    assert (refused.status, refused.reason, refused.notification_id) == (
        "rejected",
        "unknown_notification_type",
        None,
    )
    assert (refused.request_id, refused.producer, refused.idempotency_key) == (
        "req-9",
        "game-master",
        invalid.idempotency_key,
    )
    assert refused.detail


def test_write_behind_holds_writes_until_commit() -> None:
    table: dict[bytes, Any] = {b"a": 1}
    view = WriteBehind(table)
    view[b"b"] = 2
    assert view.get(b"b") == 2
    assert view[b"a"] == 1
    assert set(view) == {b"a", b"b"}
    assert len(view) == 2
    assert b"b" not in table
    view.commit()
    assert table == {b"a": 1, b"b": 2}
