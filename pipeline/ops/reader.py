"""Read a topic the way an operator does: from an offset to its current end, or following.

Partitions are assigned directly (no consumer group, nothing committed), so reading
never disturbs the workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)

from pipeline.errors import BrokerUnavailableError
from pipeline.settings import Settings

_POLL_S = 0.2


def read_topic(
    settings: Settings,
    topic: str,
    *,
    from_beginning: bool = True,
    follow: bool = False,
    idle_timeout_s: float | None = None,
) -> Iterator[tuple[int, int, int, bytes | None, bytes | None]]:
    """Yield (partition, offset, timestamp_ms, key, value) of ``topic`` (a physical name).

    Without ``follow`` it stops at the end offsets seen on entry. With ``follow`` it
    runs until ``idle_timeout_s`` passes without a record (None: forever).
    """
    for msg in read_messages(
        settings, topic, from_beginning=from_beginning, follow=follow, idle_timeout_s=idle_timeout_s
    ):
        partition, offset = msg.partition(), msg.offset()
        # librdkafka sets both on every fetched record
        assert partition is not None
        assert offset is not None
        yield partition, offset, msg.timestamp()[1], msg.key(), msg.value()


def read_messages(
    settings: Settings,
    topic: str,
    *,
    from_beginning: bool = True,
    follow: bool = False,
    idle_timeout_s: float | None = None,
) -> Iterator[Message]:
    """The records of ``topic`` as confluent-kafka messages (headers included); see
    :func:`read_topic`."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": "herald-reader",  # required by librdkafka; never joined or committed
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        try:
            meta = consumer.list_topics(topic, timeout=15)
        except KafkaException as exc:
            raise BrokerUnavailableError(f"cannot reach Kafka: {exc}") from exc
        topic_meta = meta.topics.get(topic)
        if topic_meta is None or topic_meta.error is not None:
            raise BrokerUnavailableError(f"topic {topic} does not exist")
        partitions = sorted(topic_meta.partitions)
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in partitions])
        remaining: dict[int, int] = {}
        if not follow:
            for p in partitions:
                low, high = _watermarks(consumer, TopicPartition(topic, p))
                if high > low and from_beginning:
                    remaining[p] = high
            if not remaining:
                return
        last_seen = time.monotonic()
        while True:
            msg = consumer.poll(_POLL_S)
            if msg is None:
                if idle_timeout_s is not None and time.monotonic() - last_seen > idle_timeout_s:
                    return
                continue
            if msg.error():
                raise BrokerUnavailableError(str(msg.error()))
            last_seen = time.monotonic()
            partition, offset = msg.partition(), msg.offset()
            yield msg
            if (
                not follow
                and partition in remaining
                and offset is not None
                and offset + 1 >= remaining[partition]
            ):
                del remaining[partition]
                if not remaining:
                    return
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout_s: float = 15.0) -> tuple[int, int]:
    """Low and high offsets, retried while leadership settles (a topic just created, a
    broker just restarted); BrokerUnavailableError if it does not."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
            return int(low), int(high)
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(f"cannot read offsets of {tp.topic}: {exc}") from exc
            time.sleep(0.2)
