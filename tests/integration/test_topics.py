"""`herald topics apply/check` against the real broker."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from pipeline.settings import Settings
from pipeline.topology import Topology
from pipeline.topology import admin as topology_admin
from tests.support import HERALD, settings_env


@pytest.fixture
def fresh(kafka_bootstrap: str) -> Iterator[Settings]:
    """Settings with a new prefix and nothing created yet; cleaned up afterwards."""
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}."
    )
    yield settings
    topology_admin.delete_prefixed(settings)


def topics_check(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HERALD, "topics", "check"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        check=False,
    )


def test_apply_creates_everything_once_and_check_agrees(fresh: Settings) -> None:
    settings = fresh
    topology = Topology.load(settings)
    first = topology_admin.apply(settings, topology)
    assert sorted(first.created) == sorted(settings.topic(n) for n in topology.topics)
    assert first.drift == []
    second = topology_admin.apply(settings, topology)
    assert (second.created, second.drift) == ([], [])
    check = topics_check(settings)
    assert check.returncode == 0, check.stdout + check.stderr


def test_drift_is_reported_never_repaired_by_deletion(fresh: Settings) -> None:
    settings = fresh
    admin = topology_admin.admin_client(settings)
    wrong = settings.topic("herald.intake.idempotency.changelog")
    admin.create_topics(
        [
            NewTopic(
                wrong, num_partitions=2, replication_factor=1, config={"cleanup.policy": "delete"}
            )
        ]
    )[wrong].result(30)

    report = topology_admin.apply(settings, Topology.load(settings))
    found = {(d.topic, d.what) for d in report.drift}
    assert (wrong, "partitions") in found
    assert (wrong, "config:cleanup.policy") in found
    assert ("group intake", "copartition:intake") in found
    assert wrong not in report.created
    meta = admin.list_topics(wrong, timeout=10).topics[wrong]
    assert len(meta.partitions) == 2  # left as it was: apply never deletes or re-creates

    check = topics_check(settings)
    assert check.returncode != 0
    assert "partitions expected 6, found 2" in check.stdout


def test_broker_does_not_create_topics_on_demand(fresh: Settings) -> None:
    settings = fresh
    missing = settings.topic("never.declared")
    errors: list[str] = []
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "message.timeout.ms": 3000}
    )
    producer.produce(missing, b"x", on_delivery=lambda err, msg: errors.append(str(err)))
    producer.flush(10)
    assert len(errors) == 1
    assert errors[0] != "None"  # the write failed instead of creating the topic
    topics = topology_admin.admin_client(settings).list_topics(timeout=10).topics
    assert missing not in topics
