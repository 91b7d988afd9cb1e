"""Consumer lag of Herald's workers, under the names kafka_exporter uses.

``kafka_consumergroup_lag{consumergroup, topic, partition}``,
``kafka_consumergroup_lag_sum{consumergroup, topic}``,
``kafka_consumergroup_current_offset{consumergroup, topic, partition}`` and
``kafka_topic_partition_current_offset{topic, partition}``: the same names and labels,
so dashboards and alerts written for kafka_exporter read Herald's lag unchanged.
Computed from two batched admin calls (the group's committed offsets, the partitions'
end offsets) at most every few seconds, whatever the scrape interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec  # not re-exported for type checkers
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.errors import BrokerUnavailableError
from pipeline.settings import Settings

_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition a group consumes."""

    group: str
    topic: str
    partition: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(self.end - self.committed, 0)


def consumer_lag(admin: AdminClient, group: str) -> list[PartitionLag]:
    """Every partition of every topic ``group`` has committed on, with its end offset.

    A partition the group has not committed on yet counts from its first offset, the
    way a worker reads it (auto.offset.reset earliest): its whole content is lag.
    """
    try:
        futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
        offsets = futures[group].result(timeout=_TIMEOUT_S).topic_partitions or []
        committed = {
            (tp.topic, tp.partition): tp.offset for tp in offsets if tp.offset >= 0 and not tp.error
        }
        topics = sorted({topic for topic, _ in committed})
        if not topics:
            return []
        metadata = admin.list_topics(timeout=_TIMEOUT_S).topics
        partitions = [
            (topic, p) for topic in topics if topic in metadata for p in metadata[topic].partitions
        ]
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        earliest = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
        # One request cannot ask for two offsets of a partition: ends, then starts.
        ends = _offsets(admin, {TopicPartition(t, p): latest for t, p in partitions})
        starts = _offsets(
            admin,
            {TopicPartition(t, p): earliest for t, p in partitions if (t, p) not in committed},
        )
    except KafkaException as exc:
        raise BrokerUnavailableError(f"cannot read consumer offsets of {group}: {exc}") from exc
    return [
        PartitionLag(group, t, p, committed.get((t, p), starts.get((t, p), 0)), ends[(t, p)])
        for t, p in sorted(partitions)
    ]


def _offsets(admin: AdminClient, requests: dict[TopicPartition, Any]) -> dict[tuple[str, int], int]:
    if not requests:
        return {}
    futures = admin.list_offsets(requests, request_timeout=_TIMEOUT_S)
    return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}


class ConsumerLagCollector(Collector):
    """A Prometheus collector of the workers' consumer group lag."""

    def __init__(self, settings: Settings, max_age_s: float = 5.0) -> None:
        self._group = settings.app_id
        self._bootstrap = settings.kafka_bootstrap_servers
        self._admin: AdminClient | None = None
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._cached: tuple[float, list[PartitionLag]] = (0.0, [])

    def current(self) -> list[PartitionLag]:
        """The lag, at most ``max_age_s`` old."""
        with self._lock:
            read_at, lags = self._cached
            if time.monotonic() - read_at > self._max_age_s:
                lags = consumer_lag(self._client(), self._group)
                self._cached = (time.monotonic(), lags)
            return lags

    def _client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self._bootstrap})
        return self._admin

    def close(self) -> None:
        """Drop the admin client: librdkafka keeps reconnecting while a handle lives."""
        with self._lock:
            self._admin = None

    def broker_reachable(self) -> bool:
        """Whether the brokers answer a metadata request within two seconds."""
        try:
            self._client().list_topics(timeout=2.0)
        except KafkaException:
            return False
        return True

    def collect(self) -> Iterator[Metric]:
        try:
            lags = self.current()
        except BrokerUnavailableError:
            return  # no lag series rather than wrong ones; the broker alert says why
        lag = GaugeMetricFamily(
            "kafka_consumergroup_lag",
            "Current approximate lag of a consumer group at topic/partition",
            labels=["consumergroup", "topic", "partition"],
        )
        current = GaugeMetricFamily(
            "kafka_consumergroup_current_offset",
            "Current offset of a consumer group at topic/partition",
            labels=["consumergroup", "topic", "partition"],
        )
        end = GaugeMetricFamily(
            "kafka_topic_partition_current_offset",
            "Current offset of a broker at topic/partition",
            labels=["topic", "partition"],
        )
        total = GaugeMetricFamily(
            "kafka_consumergroup_lag_sum",
            "Current approximate lag of a consumer group at topic for all partitions",
            labels=["consumergroup", "topic"],
        )
        sums: dict[str, int] = {}
        for p in lags:
            labels = [p.group, p.topic, str(p.partition)]
            lag.add_metric(labels, p.lag)
            current.add_metric(labels, p.committed)
            end.add_metric([p.topic, str(p.partition)], p.end)
            sums[p.topic] = sums.get(p.topic, 0) + p.lag
        for topic, value in sorted(sums.items()):
            total.add_metric([self._group, topic], value)
        yield from (lag, total, current, end)
