"""The loop every Herald stage runs: handle records one by one, write and ack in batches.

Records come from a :class:`Source` a fetched batch at a time (the runtime's inbox,
pipeline.runtime.faust.Inbox), not through Faust's per-record stream machinery.

A batch is written (and its inputs acknowledged, so Faust may commit them) when it
holds ``batch_max`` records, when no further record is waiting, or at the latest
``linger_s`` after it was opened, whatever the stream does meanwhile.

A handle may return an awaitable (a channel's delivery): it starts at once, the next
record is handled meanwhile, and the batch is written when all of its awaitables are
done; so a batch's deliveries overlap (push, and email over its connections).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pipeline.runtime.continuity import Continuity, OffsetSet
from pipeline.runtime.records import Out, RawRecord, normalize_headers
from pipeline.runtime.sink import AckedSink
from pipeline.runtime.tables import Layer, WriteBehind
from pipeline.times import Clock
from pipeline.tracing import StageTracing, end, settle

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Handles one record: its outputs, computed at once or awaited (the channels).
Handle = Callable[[RawRecord, WriteBehind], Sequence[Out] | Awaitable[Sequence[Out]]]
OnError = Callable[[RawRecord, Exception, int], Out]

#: Records handled between two turns of the event loop: a fetched batch can hold
#: hundreds, and the writes, acks and other stages must not wait for all of them.
YIELD_EVERY = 50


class Source(Protocol):
    """A stage's records as the fetch loop hands them over (Faust messages)."""

    def batches(self) -> AsyncIterator[Sequence[Any]]:
        """Each handed-over list of records, until the stage stops."""
        ...

    def empty(self) -> bool:
        """True when no further records wait."""
        ...

    def ack(self, message: Any) -> None:
        """The record is handled: its offset may be committed."""
        ...


def then(source: asyncio.Future[T], result: Callable[[T], R]) -> asyncio.Future[R]:
    """A future of ``result(source's result)``, failing or cancelled as ``source`` is;
    cancelling it cancels ``source`` (a stage's delivery without a task of its own)."""
    chained: asyncio.Future[R] = source.get_loop().create_future()

    def done(source: asyncio.Future[T]) -> None:
        if chained.done():
            return
        if source.cancelled():
            chained.cancel()
        elif (error := source.exception()) is not None:
            chained.set_exception(error)
        else:
            try:
                chained.set_result(result(source.result()))
            except Exception as exc:  # the stage's own code failed: its batch says so
                chained.set_exception(exc)

    def cancelled(chained: asyncio.Future[R]) -> None:
        if chained.cancelled():
            source.cancel()

    source.add_done_callback(done)
    chained.add_done_callback(cancelled)
    return chained


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


@dataclass(slots=True)
class _Batch:
    """A batch on its way out: its inputs, outputs, deliveries and table writes."""

    messages: list[Any] = field(default_factory=list)
    outputs: list[Out] = field(default_factory=list)
    pending: list[tuple[RawRecord, asyncio.Future[Sequence[Out]]]] = field(default_factory=list)
    layer: Layer = field(default_factory=dict)
    opened: float = 0.0


class BatchRun:
    """One run of a stage over its stream (a restarted actor gets a fresh one).

    While Kafka acknowledges up to ``in_flight`` batches, the next one is handled (0:
    each batch is written before the next record is handled). Each batch's table
    writes and input acks still happen only after its outputs are acknowledged, and
    in the order the batches were opened.
    """

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
        in_flight: int = 0,
        continuity: Continuity | None = None,
        on_flush: Callable[[], None] | None = None,
        tracing: StageTracing | None = None,
    ) -> None:
        self._clock = clock
        self._tracing = tracing
        self._on_flush = on_flush
        self._handle = handle
        self._on_error = on_error
        self._sink = sink
        self._view = view
        self._batch_max = batch_max
        self._linger_s = linger_s
        self._in_flight = in_flight
        self._batch = _Batch()
        #: Batches being written, oldest first.
        self._writing: collections.deque[asyncio.Task[None]] = collections.deque()
        self._lock = asyncio.Lock()
        # Offsets handled per partition in this run. Faust may resume a stream before
        # it seeks to the committed offsets (faust-streaming #216) and so hand over
        # records twice; one already handled has its outputs in a batch, so it is only
        # acknowledged. Exact offsets, not a high mark: a record faust skipped the first
        # time must still be handled when the seek brings it back.
        self._handled: dict[tuple[str, int], OffsetSet] = {}
        self._continuity = continuity
        self._sequence = continuity.tracker() if continuity else None

    async def run(self, source: Source) -> None:
        """Consume ``source`` until it ends (worker shutdown or rebalance cancel)."""
        lingering = asyncio.ensure_future(self._linger(source))
        try:
            async for messages in source.batches():
                async with self._lock:
                    since_yield = 0
                    for message in messages:
                        await self._take(message)
                        if len(self._batch.messages) >= self._batch_max:
                            await self._flush(source)
                        since_yield += 1
                        if since_yield >= YIELD_EVERY:
                            since_yield = 0
                            await asyncio.sleep(0)
                    if source.empty():
                        await self._flush(source)
            async with self._lock:  # the source ended (shutdown): write what was handled
                await self._flush(source)
            while self._writing:
                await self._writing.popleft()
        finally:
            lingering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lingering
            # Cancelled mid-batch: the unwritten batches' inputs are re-read.
            for _, delivery in self._batch.pending:
                delivery.cancel()
            for writing in self._writing:
                writing.cancel()

    async def _take(self, message: Any) -> None:
        sequence = self._sequence
        if sequence and not await sequence.admits(message.topic, message.partition, message.offset):
            return  # past a hole: dropped unacknowledged, read again after the seek
        batch = self._batch
        if not batch.messages:
            batch.opened = time.monotonic()
        batch.messages.append(message)
        seen = self._handled.setdefault((message.topic, message.partition), OffsetSet())
        if not seen.add(message.offset):
            return
        raw = raw_record_of(message)
        try:
            if self._tracing is None:
                outputs = self._handle(raw, self._view)
            else:
                outputs = self._traced(raw, self._tracing)
            if inspect.isawaitable(outputs):
                batch.pending.append((raw, asyncio.ensure_future(outputs)))
            else:
                batch.outputs.extend(outputs)
        except Exception as exc:  # one record must never stop the stream
            batch.outputs.append(self._failed(raw, exc))

    def _traced(
        self, raw: RawRecord, tracing: StageTracing
    ) -> Sequence[Out] | asyncio.Future[Sequence[Out]]:
        """The handle of ``raw`` in a span of its own (pipeline.tracing)."""
        span = tracing.start(raw)
        outputs = tracing.run(span, lambda: self._handle(raw, self._view))
        if isinstance(outputs, asyncio.Future):
            outputs.add_done_callback(functools.partial(settle, span))
            return then(outputs, functools.partial(end, span))
        return end(span, outputs)

    def _failed(self, raw: RawRecord, exc: Exception) -> Out:
        log.error(
            "unexpected failure on %s[%d]@%d",
            raw.topic,
            raw.partition,
            raw.offset,
            exc_info=exc,
        )
        return self._on_error(raw, exc, self._clock.now_ms())

    async def _flush(self, source: Source) -> None:
        """Send the current batch on its way; wait while more than ``in_flight`` are."""
        batch = self._batch
        if not batch.messages:
            return
        if self._on_flush is not None:  # e.g. start the batch's publications together
            self._on_flush()
        batch.layer = self._view.seal()
        self._batch = _Batch()
        previous = self._writing[-1] if self._writing else None
        self._writing.append(asyncio.ensure_future(self._write(batch, previous, source)))
        while len(self._writing) > self._in_flight or (self._writing and self._writing[0].done()):
            await self._writing.popleft()

    async def _write(
        self, batch: _Batch, previous: asyncio.Task[None] | None, source: Source
    ) -> None:
        for raw, delivery in batch.pending:
            try:
                batch.outputs.extend(await delivery)
            except Exception as exc:
                batch.outputs.append(self._failed(raw, exc))
        # The table entries' changelog goes with the outputs: acknowledged together.
        await self._sink.deliver([*batch.outputs, *self._view.changelog_records(batch.layer)])
        if previous is not None:
            await asyncio.shield(previous)  # the table takes the batches in order
        try:
            self._view.commit(batch.layer)
        except Exception:  # outputs are out; a lost entry only costs a re-accept
            log.exception("could not record a batch in the table")
        continuity = self._continuity
        for message in batch.messages:
            if continuity is not None:
                continuity.allow(message.topic, message.partition, message.offset)
            source.ack(message)

    async def _linger(self, source: Source) -> None:
        while True:
            await asyncio.sleep(self._linger_s / 2)
            batch = self._batch
            if batch.messages and time.monotonic() - batch.opened >= self._linger_s:
                async with self._lock:
                    await self._flush(source)


#: Releases one record of a delay tier topic (pipeline.stages.delay): waits, then the
#: record to write.
Release = Callable[[RawRecord], Awaitable[Out]]


class HoldRun:
    """The loop of a delay tier topic: one record at a time, each held until due,
    written and acknowledged before the next (a tier partition is a FIFO queue)."""

    def __init__(
        self, release: Release, sink: AckedSink, continuity: Continuity | None = None
    ) -> None:
        self._release = release
        self._sink = sink
        self._continuity = continuity

    async def run(self, stream: Any) -> None:
        unacked = stream.noack()
        handled: dict[tuple[str, int], OffsetSet] = {}  # see BatchRun: Faust may re-deliver
        continuity = self._continuity
        sequence = continuity.tracker() if continuity else None
        async for event in unacked.events():
            message = event.message
            tp = (message.topic, message.partition)
            if sequence and not await sequence.admits(*tp, message.offset):
                continue  # past a hole the stream left (see Continuity)
            seen = handled.setdefault(tp, OffsetSet())
            if seen.add(message.offset):
                if continuity:
                    continuity.holding.add(message.topic)
                try:
                    released = await self._release(raw_record_of(message))
                finally:
                    if continuity:
                        continuity.holding.discard(message.topic)
                await self._sink.deliver([released])
            if continuity:
                continuity.allow(*tp, message.offset)
            await unacked.ack(event)
