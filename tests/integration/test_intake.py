"""The intake agent in a real worker process on the real broker: every outcome counted."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from pipeline.contracts import Contracts
from pipeline.contracts.records import Intent, Malformed, StatusEvent
from pipeline.ops.reader import read_topic
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.topology import Topology
from pipeline.topology.partitioning import partition_for
from tests.support import WorkerProcess, read_all, wait_for

PAYLOAD = {"game_id": "g-1", "game_name": "Andromeda", "turn_number": 3}


def turn_ready(key: str, recipients: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "notification_type": "game.turn.ready",
        "producer": "game-master",
        "idempotency_key": key,
        "recipient_user_ids": recipients,
        # a producer's retry resends the event's own time, so pin it
        "occurred_at_ms": 1_700_000_000_000,
        "payload": extra.pop("payload", PAYLOAD),
        **extra,
    }


INTAKE_OUTCOMES = {"accepted", "duplicate", "rejected_conflict", "ignored"}


def outcomes(events: list[StatusEvent]) -> Counter[str]:
    """Intake's outcomes (routing adds its own statuses for the same notifications)."""
    return Counter(e.status for e in events if e.status in INTAKE_OUTCOMES)


def test_each_kind_of_intent_gets_exactly_its_outputs(
    isolated: Settings, worker: WorkerProcess
) -> None:
    contracts = Contracts(isolated)
    plain = Producer({"bootstrap.servers": isolated.kafka_bootstrap_servers})
    intents = isolated.topic("notification.intents")
    # Poison first: the worker must keep going past it.
    plain.produce(intents, b"\x00garbage that is not avro")
    plain.produce(intents, b"")
    plain.flush(10)
    with HeraldProducer(isolated, contracts) as herald:
        herald.publish_intent(**turn_ready("k-valid", ["u1", "u2", "u3"]), request_id="r-1")
        herald.publish_intent(**turn_ready("k-valid", ["u3", "u2", "u1"]), request_id="r-2")
        herald.publish_intent(**turn_ready("k-valid", ["u1"]))
        herald.publish_intent(**turn_ready("k-unknown", ["u1"], notification_type="no.such"))
        herald.publish_intent(**turn_ready("k-empty", []))
        herald.publish_intent(**turn_ready("k-fields", ["u1"], payload={"game_id": "g"}))
        herald.publish_intent(
            **turn_ready(
                "k-admin",
                [],
                notification_type="geo.review_recommended",
                audience_kind="admin_email",
                payload={"user_id": "u7", "review_reason": "jump"},
            )
        )

    events = wait_for(
        isolated,
        "notification.status",
        contracts.status,
        lambda evs: sum(outcomes(evs).values()) >= 4,
        what="4 status events",
    )
    malformed: list[Malformed] = wait_for(
        isolated, "notification.intents.malformed", contracts.malformed, lambda rs: len(rs) >= 5
    )
    time.sleep(2)  # nothing more may arrive
    events = read_all(isolated, "notification.status", contracts.status)
    malformed = read_all(isolated, "notification.intents.malformed", contracts.malformed)
    recipients = read_all(isolated, "notification.recipients", contracts.recipient)

    assert outcomes(events) == {"accepted": 2, "duplicate": 1, "rejected_conflict": 1}
    accepted = {e.idempotency_key: e.notification_id for e in events if e.status == "accepted"}
    duplicate = next(e for e in events if e.status == "duplicate")
    assert duplicate.notification_id == accepted["k-valid"]
    assert duplicate.request_id == "r-2"

    assert sorted((r.idempotency_key, r.user_id) for r in recipients) == [
        ("k-admin", None),
        ("k-valid", "u1"),
        ("k-valid", "u2"),
        ("k-valid", "u3"),
    ]

    # Each refused intent that decoded also has its status event, by request_id too.
    refused = sorted((e.idempotency_key, e.reason) for e in events if e.status == "rejected")
    assert refused == [
        ("k-empty", "empty_recipients"),
        ("k-fields", "missing_payload_fields"),
        ("k-unknown", "unknown_notification_type"),
    ]
    assert all(e.notification_id is None for e in events if e.status == "rejected")

    assert sorted(m.reason for m in malformed) == [
        "empty_recipients",
        "missing_payload_fields",
        "undecodable",
        "unknown_notification_type",
        "unknown_schema_id",
    ]
    for record in malformed:
        assert record.origin_topic == isolated.topic("notification.intents")
        assert record.origin_offset >= 0
        assert record.detail
    assert {m.raw_value for m in malformed if m.reason in ("undecodable", "unknown_schema_id")} == {
        b"\x00garbage that is not avro",
        b"",
    }
    assert worker.alive()


def test_standard_serializer_without_key_is_deduplicated_across_partitions(
    isolated: Settings, worker: WorkerProcess
) -> None:
    """Intents from a plain confluent-kafka AvroSerializer, unkeyed (random partitions):
    the same intent sent many times is still accepted exactly once."""
    schema = (isolated.schemas_dir / "intent.avsc").read_text()
    serializer = AvroSerializer(SchemaRegistryClient.new_client({"url": "mock://itest"}), schema)
    ctx = SerializationContext(isolated.topic("notification.intents"), MessageField.VALUE)
    plain = Producer(
        {"bootstrap.servers": isolated.kafka_bootstrap_servers, "partitioner": "random"}
    )
    record = Intent(
        notification_type="lobby.invite.created",
        producer="game-lobby",
        audience_kind="user",
        recipient_user_ids=["u5"],
        idempotency_key="inv-9",
        occurred_at_ms=1_700_000_000_000,
        payload_json=json.dumps({"game_id": "g", "game_name": "G", "inviter_name": "Ann"}),
    ).to_avro()
    for _ in range(12):
        plain.produce(ctx.topic, serializer(record, ctx))
    plain.flush(10)

    contracts = Contracts(isolated)
    wait_for(
        isolated,
        "notification.status",
        contracts.status,
        lambda evs: sum(outcomes(evs).values()) >= 12,
        what="12 status events",
    )
    time.sleep(1)
    events = read_all(isolated, "notification.status", contracts.status)
    assert outcomes(events) == {"accepted": 1, "duplicate": 11}
    assert len(read_all(isolated, "notification.recipients", contracts.recipient)) == 1


def test_restarted_worker_remembers_accepted_intents(isolated: Settings, tmp_path: Path) -> None:
    """Kill -9 after N accepted; a new worker restores the table from its changelog, so
    the same N published again are all duplicates."""
    contracts = Contracts(isolated)
    count = 30
    keys = [f"restart-{uuid.uuid4().hex[:6]}-{i}" for i in range(count)]

    def publish_all() -> None:
        with HeraldProducer(isolated, contracts) as herald:
            for key in keys:
                herald.publish_intent(**turn_ready(key, ["u1"]), wait=False)

    first = WorkerProcess(isolated, tmp_path / "first.log")
    first.start()
    publish_all()
    wait_for(
        isolated,
        "notification.status",
        contracts.status,
        lambda evs: outcomes(evs)["accepted"] >= count,
        what="N accepted",
    )
    time.sleep(2 * isolated.commit_interval_s + 1)  # let the changelog writes settle
    first.kill()

    second = WorkerProcess(isolated, tmp_path / "second.log")
    second.start()
    try:
        publish_all()
        try:
            events = wait_for(
                isolated,
                "notification.status",
                contracts.status,
                lambda evs: outcomes(evs)["duplicate"] >= count,
                timeout_s=90,
                what="N duplicates",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{missing_report(isolated, keys)}") from None
        time.sleep(2)
        events = read_all(isolated, "notification.status", contracts.status)
    finally:
        second.stop()
    assert outcomes(events)["accepted"] == count
    assert outcomes(events)["duplicate"] == count
    assert len(read_all(isolated, "notification.recipients", contracts.recipient)) == count


def test_idempotency_keys_expire_and_are_swept(isolated: Settings, tmp_path: Path) -> None:
    """After the window a key is forgotten: the sweep writes a tombstone to the changelog
    (so the table does not grow without bound) and the intent is accepted again."""
    short = isolated.model_copy(
        update={"idempotency_window_s": 3, "idempotency_sweep_interval_s": 1.0}
    )
    contracts = Contracts(short)
    process = WorkerProcess(short, tmp_path / "expiry.log")
    process.start()
    try:
        with HeraldProducer(short, contracts) as herald:
            herald.publish_intent(**turn_ready("k-expire", ["u1"]))
        wait_for(
            short,
            "notification.status",
            contracts.status,
            lambda evs: outcomes(evs)["accepted"] == 1,
            what="accepted",
        )
        changelog = short.topic("herald.intake.idempotency.changelog")
        deadline = time.monotonic() + 30
        tombstones: list[bytes | None] = []
        while not tombstones and time.monotonic() < deadline:
            time.sleep(1)
            tombstones = [
                key for _, _, _, key, value in read_topic(short, changelog) if value is None
            ]
        assert tombstones == [b"game-master:k-expire"]
        with HeraldProducer(short, contracts) as herald:
            herald.publish_intent(**turn_ready("k-expire", ["u1"]))
        events = wait_for(
            short,
            "notification.status",
            contracts.status,
            lambda evs: sum(outcomes(evs).values()) >= 2,
            what="second outcome",
        )
    finally:
        process.stop()
    assert [e.status for e in events if e.status in INTAKE_OUTCOMES] == ["accepted", "accepted"]


def missing_report(settings: Settings, keys: list[str]) -> str:
    """Which keys have no duplicate yet, with their partitions and the group's offsets."""
    contracts = Contracts(settings)
    events = read_all(settings, "notification.status", contracts.status)
    done = {e.idempotency_key for e in events if e.status == "duplicate"}
    partitions = Topology.load(settings).spec("notification.intents").partitions
    missing = {
        k: partition_for(f"game-master:{k}".encode(), partitions) for k in keys if k not in done
    }
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": settings.app_id}
    )
    topic = settings.topic("notification.intents")
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()
    return f"missing keys -> partition: {missing}; committed: {committed}; end offsets: {ends}"
