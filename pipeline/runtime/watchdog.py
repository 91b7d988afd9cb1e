"""Liveness: a worker that owns lagging partitions but commits nothing exits to be restarted.

Rarely, a freshly (re)started faust-streaming worker stops fetching a partition it
owns while reporting itself ready (seen after a SIGKILL and a quick restart; the
records stay uncommitted, so nothing is lost, but nothing moves either). The broker
is the judge here, not Faust's own bookkeeping: end offsets and the group's committed
offsets are read with confluent-kafka. When an owned stream partition has records
beyond its committed offset and that offset has not moved for ``stall_timeout_s``,
the worker tries, in order (:class:`Cures`), each after another ``stall_timeout_s``
at the same offset:

1. seeking the partition back to its committed offset (the cause found so far:
   faust-streaming resumes fetching before it seeks after an assignment, and a stream
   silently skips records it fetched in between, e.g. of a stale generation, while
   the read offset has already passed them);
2. rejoining the consumer group: Faust rebuilds its whole view of the partitions and
   recovers its tables again (a seek cannot help when Faust's own bookkeeping, not the
   position, keeps a partition from its stream: seen once as a table recovery that
   received nothing for 40 s after a kill);
3. exiting with :data:`EXIT_STALLED` so that its supervisor (Kubernetes, systemd)
   starts it again.

Uncommitted records are re-read and their deterministic outputs absorbed downstream.
Delay-tier topics are left out: they lag by design while records wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.settings import Settings

log = logging.getLogger(__name__)

#: Exit status of a stalled worker (EX_TEMPFAIL): "restart me".
EXIT_STALLED = 75


class Cures:
    """Which cure each stalled partition gets next (see the module docstring): a
    partition stuck at the same committed offset climbs one step per verdict."""

    RESEEK = "reseek"
    REJOIN = "rejoin"
    EXIT = "exit"
    _LADDER = (RESEEK, REJOIN, EXIT)

    def __init__(self) -> None:
        #: Per partition: the offset it was last stuck at and the cures it had there.
        #: Kept while the partition is not (yet again) judged stuck: each cure restarts
        #: its clock, so between verdicts it is absent from them.
        self._tried: dict[tuple[str, int], tuple[int, int]] = {}

    def next(self, stuck: dict[tuple[str, int], int]) -> dict[str, dict[tuple[str, int], int]]:
        """The partitions of ``stuck`` (with their offsets) by the cure each gets now: one
        step up from its last cure at the same offset, the first at a new one."""
        plan: dict[str, dict[tuple[str, int], int]] = {}
        for tp, offset in stuck.items():
            at, count = self._tried.get(tp, (offset, 0))
            count = count if at == offset else 0  # it moved, then stuck again: start over
            step = self._LADDER[min(count, len(self._LADDER) - 1)]
            plan.setdefault(step, {})[tp] = offset
            self._tried[tp] = (offset, count + 1)
        return plan


class StallWatchdog:
    """Decides, from the broker's offsets, whether this worker has stalled."""

    def __init__(self, settings: Settings, stall_timeout_s: float) -> None:
        self._settings = settings
        self._stall_timeout_s = stall_timeout_s
        # Per partition: its last committed offset and since when it is stuck there
        # with records beyond it.
        self._seen: dict[tuple[str, int], tuple[int, float]] = {}
        self._consumer: Consumer | None = None
        #: The group's committed offsets as :meth:`stalled` last read them.
        self.committed: dict[tuple[str, int], int] = {}

    def stalled(self, owned: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The ``owned`` partitions (with their committed offsets) that have had records
        beyond their committed offset, and that offset has not moved, for
        ``stall_timeout_s``; empty when the worker is fine.

        Blocking (broker round trips): run it in an executor.
        """
        tps = [TopicPartition(topic, partition) for topic, partition in owned]
        if not tps:
            self._seen.clear()
            return {}
        try:
            committed, ends = self._offsets(tps)
        except KafkaException as exc:  # the broker is away: readiness reports that
            log.debug("watchdog cannot read offsets: %s", exc)
            self._seen.clear()  # an outage is not a stall: judge afresh once it is back
            self.committed = {}
            return {}
        self.committed = committed
        now = time.monotonic()
        stuck: dict[tuple[str, int], int] = {}
        seen: dict[tuple[str, int], tuple[int, float]] = {}
        for tp, offset in committed.items():
            lagging = ends.get(tp, 0) > max(offset, 0)
            previous = self._seen.get(tp)
            since = previous[1] if previous and previous[0] == offset and lagging else now
            seen[tp] = (offset, since)
            if lagging and now - since >= self._stall_timeout_s:
                stuck[tp] = offset
        self._seen = seen
        if stuck:
            log.error(
                "no progress for %.0fs on lagging partitions %s",
                self._stall_timeout_s,
                sorted(stuck),
            )
        return stuck

    def restart_clock(self, tps: Iterable[tuple[str, int]]) -> None:
        """Judge ``tps`` afresh from now (after the worker re-read them)."""
        for tp in tps:
            self._seen.pop(tp, None)

    def start_offset(self, topic: str, partition: int) -> int:
        """Where the group reads ``topic[partition]`` from: its committed offset, or the
        partition's first offset when it has none. Blocking: run it in an executor."""
        return self.start_offsets([(topic, partition)])[(topic, partition)]

    def start_offsets(self, tps: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """:meth:`start_offset` of each of ``tps``, with one request for the commits."""
        consumer = self._offsets_consumer()
        wanted = [TopicPartition(topic, partition) for topic, partition in tps]
        if not wanted:
            return {}
        starts = {}
        for committed in consumer.committed(wanted, timeout=10):
            tp = (committed.topic, committed.partition)
            if committed.offset >= 0:
                starts[tp] = int(committed.offset)
            else:
                starts[tp] = int(consumer.get_watermark_offsets(committed, timeout=10)[0])
        return starts

    def end_offsets(self, tps: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Each partition's end offset (high watermark). Blocking."""
        consumer = self._offsets_consumer()
        return {
            (topic, partition): int(
                consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
            )
            for topic, partition in tps
        }

    def _offsets_consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    "bootstrap.servers": self._settings.kafka_bootstrap_servers,
                    "group.id": self._settings.app_id,  # reads the group's commits, never joins
                    "enable.auto.commit": False,
                }
            )
        return self._consumer

    def _offsets(
        self, tps: list[TopicPartition]
    ) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        consumer = self._offsets_consumer()
        committed = {
            (tp.topic, tp.partition): tp.offset for tp in consumer.committed(tps, timeout=10)
        }
        return committed, self.end_offsets((tp.topic, tp.partition) for tp in tps)
