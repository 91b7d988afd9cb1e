"""The worker's producer path (confluent-kafka) against the real broker."""

from __future__ import annotations

from collections import Counter

from pipeline.ops.reader import read_topic
from pipeline.runtime.producer import KafkaWriter
from pipeline.runtime.records import Out
from pipeline.runtime.sink import AckedSink
from pipeline.settings import Settings
from pipeline.topology import Topology
from pipeline.topology.partitioning import partition_for


async def test_every_record_is_acknowledged_on_its_keys_murmur2_partition(
    isolated: Settings,
) -> None:
    topic = isolated.topic("notification.recipients")
    partitions = Topology.load(isolated).spec("notification.recipients").partitions
    writer = KafkaWriter({"bootstrap.servers": isolated.kafka_bootstrap_servers})
    sink = AckedSink(writer.write, ack_timeout_s=30)
    records = [Out(topic, f"user-{i}".encode(), str(i).encode()) for i in range(2000)]
    records.append(Out(topic, b"pinned", b"pinned", partition=0, headers=(("h", b"v"),)))
    await sink.deliver(records)
    writer.close()

    stored = list(read_topic(isolated, topic))
    assert Counter(value for _, _, _, _, value in stored) == Counter(r.value for r in records)
    for partition, _, _, key, value in stored:
        expected = 0 if key == b"pinned" else partition_for(key or b"", partitions)
        assert partition == expected, (key, value)
