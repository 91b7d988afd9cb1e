"""The loop every Herald agent runs: handle records one by one, write and ack in batches.

A batch is written (and its inputs acknowledged, so Faust may commit them) when it
holds ``batch_max`` records, when no further record is waiting, or at the latest
``linger_s`` after it was opened, whatever the stream does meanwhile.

A handle may return an awaitable (a channel's delivery): it starts at once, the next
record is handled meanwhile, and the batch is written when all of its awaitables are
done; so a batch's deliveries overlap (push, and email over its connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from pipeline.agents.base import (
    AckedSink,
    Clock,
    OffsetSet,
    Out,
    RawRecord,
    WriteBehind,
    normalize_headers,
)

log = logging.getLogger(__name__)

#: Handles one record: its outputs, computed at once or awaited (the channels).
Handle = Callable[[RawRecord, WriteBehind], Sequence[Out] | Awaitable[Sequence[Out]]]
OnError = Callable[[RawRecord, Exception, int], Out]


def raw_record_of(message: Any) -> RawRecord:
    """The RawRecord of a Faust message."""
    return RawRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else 0,
        key=message.key,
        value=message.value,
        headers=normalize_headers(message.headers),
    )


#: A partition sought back over a hole whose records past the hole keep coming this
#: long after is sought again.
REWIND_AGAIN_S = 3.0


class Continuity:
    """Catches records a stream skipped, and has them read again.

    faust-streaming can drop records of a partition around a rebalance (seen after a
    worker was killed: a survivor's stream jumped from offset 55 to 65 of a partition
    it had just taken over), acks records it skips, and commits the highest run of
    acknowledged offsets without checking where that run starts: the records were
    lost. Two guards, for Herald's stream topics (not compacted, no transactions, so
    no holes of their own):

    - :meth:`guard` wraps the consumer's ack: only acks of records a run handled
      (:meth:`allow`) count, and :meth:`guard_gaps` stops Faust from filling a jump in
      the offsets it read as if acked, so the commit cannot pass a record nobody
      handled;
    - each run's :class:`SequenceTracker` expects every partition's next offset; past
      a hole it drops (does not handle, does not acknowledge) that partition's records
      until the consumer, sought back, brings the first missing one.
    """

    def __init__(
        self,
        gapless: Callable[[str], bool],
        start: Callable[[str, int], Awaitable[int]],
        seek: Callable[[str, int, int], Awaitable[None]],
    ) -> None:
        self._gapless = gapless
        self._start = start
        self._seek = seek
        self._allowed: set[tuple[str, int, int]] = set()
        #: Bumped per partition at each assignment: an expectation from an older
        #: ownership does not hold (someone else may have moved the partition on).
        self.epochs: dict[tuple[str, int], int] = {}

    def assigned(self, partitions: Iterable[tuple[str, int]]) -> None:
        for tp in partitions:
            self.epochs[tp] = self.epochs.get(tp, 0) + 1

    def gapless(self, topic: str) -> bool:
        return self._gapless(topic)

    async def start(self, topic: str, partition: int) -> int:
        """Where this ownership of the partition starts: the group's committed offset,
        or the partition's first offset when the group never committed one."""
        return await self._start(topic, partition)

    async def rewind(self, topic: str, partition: int, offset: int) -> None:
        await self._seek(topic, partition, offset)

    def allow(self, topic: str, partition: int, offset: int) -> None:
        """The next ack of this record is a run's own (see :meth:`guard`)."""
        if self._gapless(topic):
            self._allowed.add((topic, partition, offset))

    def guard(self, ack: Callable[[Any], bool]) -> Callable[[Any], bool]:
        """``ack`` (the Faust consumer's) letting through only the acks of records a
        run handled. A Faust stream acks the records it skips (a stale generation
        after a rebalance, flow control off), which would let the commit pass them."""

        def guarded(message: Any) -> bool:
            key = (message.topic, message.partition, message.offset)
            if self._gapless(message.topic) and key not in self._allowed:
                log.debug("ack of unhandled %s[%d]@%d withheld", *key)
                return False
            self._allowed.discard(key)
            return ack(message)

        return guarded

    def guard_gaps(
        self, add_gap: Callable[[Any, int, int], Awaitable[None]]
    ) -> Callable[[Any, int, int], Awaitable[None]]:
        """``add_gap`` (the Faust consumer's) ignoring gaps in Herald's stream topics.
        Faust fills a jump in the offsets it reads (meant for compacted topics) as if
        those records had been acked; in a stream topic the jump is records it lost."""

        async def guarded(tp: Any, offset_from: int, offset_to: int) -> None:
            if self._gapless(tp.topic):
                log.debug(
                    "gap %s[%d] %d..%d not filled", tp.topic, tp.partition, offset_from, offset_to
                )
                return
            await add_gap(tp, offset_from, offset_to)

        return guarded

    def tracker(self) -> SequenceTracker:
        """Hole detection for one agent run."""
        return SequenceTracker(self)


class SequenceTracker:
    """One run's expectation of each partition's next offset (see :class:`Continuity`)."""

    def __init__(self, continuity: Continuity) -> None:
        self._continuity = continuity
        #: Per partition: (assignment epoch, next offset the stream should bring).
        self._next: dict[tuple[str, int], tuple[int, int]] = {}
        #: Partitions sought back over a hole, still waiting for its first record:
        #: when they were sought.
        self._rewinding: dict[tuple[str, int], float] = {}

    async def admits(self, topic: str, partition: int, offset: int) -> bool:
        """False for a record beyond a hole the stream left: the run drops it
        (unhandled, unacknowledged); the consumer, sought back, brings it again."""
        continuity = self._continuity
        if not continuity.gapless(topic):
            return True
        tp = (topic, partition)
        epoch = continuity.epochs.get(tp, 0)
        known = self._next.get(tp)
        expected = known[1] if known and known[0] == epoch else await continuity.start(*tp)
        if offset > expected:
            sought = self._rewinding.get(tp)
            # Records past the hole still coming a while after the seek: a rebalance
            # undid it (Faust seeks on its own then); seek again.
            if sought is None or time.monotonic() - sought > REWIND_AGAIN_S:
                self._rewinding[tp] = time.monotonic()
                log.warning(
                    "%s[%d]: the stream skipped offsets %d..%d; reading them again",
                    topic,
                    partition,
                    expected,
                    offset - 1,
                )
                try:
                    await continuity.rewind(topic, partition, expected)
                except Exception:  # no longer ours (rebalance): its new owner reads it
                    log.warning("could not seek %s[%d] back", topic, partition, exc_info=True)
                    self._rewinding.pop(tp, None)
            self._next[tp] = (epoch, expected)
            return False
        self._rewinding.pop(tp, None)
        self._next[tp] = (epoch, max(offset + 1, expected))
        return True


class BatchRun:
    """One run of an agent over its stream (a restarted actor gets a fresh one)."""

    def __init__(
        self,
        handle: Handle,
        on_error: OnError,
        sink: AckedSink,
        view: WriteBehind,
        *,
        clock: Clock,
        batch_max: int,
        linger_s: float,
        continuity: Continuity | None = None,
    ) -> None:
        self._clock = clock
        self._handle = handle
        self._on_error = on_error
        self._sink = sink
        self._view = view
        self._batch_max = batch_max
        self._linger_s = linger_s
        self._events: list[Any] = []
        self._outputs: list[Out] = []
        self._pending: list[tuple[RawRecord, asyncio.Future[Sequence[Out]]]] = []
        self._opened = 0.0
        self._lock = asyncio.Lock()
        # Offsets handled per partition in this run. Faust may resume a stream before
        # it seeks to the committed offsets (faust-streaming #216) and so hand over
        # records twice; one already handled has its outputs in a batch, so it is only
        # acknowledged. Exact offsets, not a high mark: a record faust skipped the first
        # time must still be handled when the seek brings it back.
        self._handled: dict[tuple[str, int], OffsetSet] = {}
        self._continuity = continuity
        self._sequence = continuity.tracker() if continuity else None

    async def run(self, stream: Any) -> None:
        """Consume ``stream`` until it ends (worker shutdown or rebalance cancel)."""
        unacked = stream.noack()
        lingering = asyncio.ensure_future(self._linger(unacked))
        try:
            async for event in unacked.events():
                async with self._lock:
                    await self._take(event)
                    if len(self._events) >= self._batch_max or unacked.channel.empty():
                        await self._flush(unacked)
            async with self._lock:  # the stream ended (shutdown): write what was handled
                await self._flush(unacked)
        finally:
            lingering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lingering
            for _, delivery in self._pending:  # cancelled mid-batch: its inputs are re-read
                delivery.cancel()

    async def _take(self, event: Any) -> None:
        message = event.message
        sequence = self._sequence
        if sequence and not await sequence.admits(message.topic, message.partition, message.offset):
            return  # past a hole: dropped unacknowledged, read again after the seek
        if not self._events:
            self._opened = time.monotonic()
        self._events.append(event)
        seen = self._handled.setdefault((message.topic, message.partition), OffsetSet())
        if not seen.add(message.offset):
            return
        raw = raw_record_of(message)
        try:
            outputs = self._handle(raw, self._view)
            if inspect.isawaitable(outputs):
                self._pending.append((raw, asyncio.ensure_future(outputs)))
            else:
                self._outputs.extend(outputs)
        except Exception as exc:  # one record must never stop the stream
            self._failed(raw, exc)

    def _failed(self, raw: RawRecord, exc: Exception) -> None:
        log.error(
            "unexpected failure on %s[%d]@%d",
            raw.topic,
            raw.partition,
            raw.offset,
            exc_info=exc,
        )
        self._outputs.append(self._on_error(raw, exc, self._clock.now_ms()))

    async def _flush(self, stream: Any) -> None:
        if not self._events:
            return
        for raw, delivery in self._pending:
            try:
                self._outputs.extend(await delivery)
            except Exception as exc:
                self._failed(raw, exc)
        self._pending.clear()
        await self._sink.deliver(self._outputs)
        try:
            self._view.commit()
        except Exception:  # outputs are out; a lost entry only costs a re-accept
            log.exception("could not record a batch in the table")
        for event in self._events:
            if self._continuity is not None:
                message = event.message
                self._continuity.allow(message.topic, message.partition, message.offset)
            await stream.ack(event)
        self._events.clear()
        self._outputs.clear()

    async def _linger(self, stream: Any) -> None:
        while True:
            await asyncio.sleep(self._linger_s / 2)
            if self._events and time.monotonic() - self._opened >= self._linger_s:
                async with self._lock:
                    await self._flush(stream)
