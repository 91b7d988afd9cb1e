"""What every agent shares: the raw record it reads, the records it writes, and the
sink that writes them and waits until Kafka has acknowledged every one.

Agents read raw bytes and decode inside the agent, so one bad record never crashes
a stream; and they ack (let Faust commit) an input only after its outputs are
acknowledged, so no accepted work is lost between hops.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline import metrics
from pipeline.contracts import Contracts
from pipeline.contracts.records import Malformed, StatusEvent

log = logging.getLogger(__name__)


class Clock:
    """Herald's notion of now: wall-clock time, optionally shifted (tests and drills).

    Only decisions use it (quiet hours, TTLs, due times, windows); how long a delay
    tier holds a record is measured on the real clock against broker timestamps.
    """

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        """Epoch milliseconds, shifted by the offset."""
        return int(time.time() * 1000) + self.offset_ms


def normalize_headers(headers: Any) -> tuple[tuple[str, bytes], ...]:
    """Kafka headers as (name, bytes) pairs, from a list of pairs or a mapping."""
    if not headers:
        return ()
    items = headers.items() if hasattr(headers, "items") else headers
    return tuple((str(k), bytes(v)) for k, v in items if v is not None)


def header(headers: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    """The first header called ``name``, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


class OffsetSet:
    """The offsets of one partition an agent has handled, as merged intervals.

    Offsets arrive mostly in order, so this stays a handful of intervals; a gap stays
    a gap, so a record that was skipped once (faust can drop one in-process around a
    rebalance and hand it over again after its seek) is still handled when it comes.
    """

    __slots__ = ("_spans",)

    def __init__(self) -> None:
        self._spans: list[list[int]] = []  # sorted, disjoint, non-adjacent [first, last]

    def add(self, offset: int) -> bool:
        """Record ``offset``; False if it was already there."""
        spans = self._spans
        if spans and spans[-1][1] + 1 == offset:  # the common case: the next offset
            spans[-1][1] = offset
            return True
        index = bisect.bisect_right(spans, [offset, float("inf")])
        if index and spans[index - 1][1] >= offset:
            return False
        joins_left = bool(index) and spans[index - 1][1] + 1 == offset
        joins_right = index < len(spans) and spans[index][0] - 1 == offset
        if joins_left and joins_right:
            spans[index - 1][1] = spans[index][1]
            del spans[index]
        elif joins_left:
            spans[index - 1][1] = offset
        elif joins_right:
            spans[index][0] = offset
        else:
            spans.insert(index, [offset, offset])
        return True


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A Kafka record as an agent received it, before any decoding."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Out:
    """One record an agent wants written."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    """Explicit partition; None lets the (murmur2) partitioner choose from the key."""
    headers: tuple[tuple[str, bytes], ...] = ()
    note: metrics.Note | None = None
    """What the record means for the metrics, counted once Kafka acknowledged it."""


#: Writes records and waits for Kafka's acknowledgement (AckedSink.deliver): for a
#: channel that must record an outcome before it goes on.
Write = Callable[[Sequence[Out]], Awaitable[None]]


def status_out(
    contracts: Contracts,
    topic: str,
    event: StatusEvent,
    *,
    key: bytes | None = None,
    error_class: str = "",
    latency_s: float | None = None,
) -> Out:
    """The record of a status event, keyed by its notification unless ``key`` says
    otherwise, noted for the metrics."""
    note = metrics.Note(
        "status",
        event.status,
        event.channel or "",
        event.reason or "",
        error_class,
        latency_s,
    )
    if key is None:
        key = (event.notification_id or event.event_id).encode("utf-8")
    return Out(topic, key, contracts.status.encode(event), note=note)


def malformed(
    contracts: Contracts,
    topic: str,
    raw: RawRecord,
    reason: str,
    detail: str,
    now_ms: int,
    **decoded: str | None,
) -> Out:
    """A record for the malformed topic: raw bytes, reason and origin, keyed as received."""
    record = Malformed(
        reason=reason,
        detail=detail[:2000],
        origin_topic=raw.topic,
        origin_partition=raw.partition,
        origin_offset=raw.offset,
        origin_timestamp_ms=raw.timestamp_ms,
        raw_key=raw.key,
        raw_value=raw.value,
        recorded_at_ms=now_ms,
        **decoded,
    )
    note = metrics.Note("malformed", reason, raw.topic)
    return Out(topic, raw.key, contracts.malformed.encode(record), note=note)


class SendFn(Protocol):
    """Enqueue one record; the returned awaitable resolves when Kafka acknowledged it."""

    def __call__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> Awaitable[Awaitable[Any]]: ...


class AckedSink:
    """Writes records and returns only when every one is acknowledged (acks=all).

    A record Kafka refuses is sent again after a pause, for as long as it takes: the
    agent's input stays unacknowledged meanwhile, which is exactly what keeps the
    promise that nothing accepted is lost. Resending is safe because every id Herald
    writes is deterministic, so a repeat is absorbed downstream.
    """

    def __init__(
        self, send: SendFn, *, max_backoff_s: float = 5.0, ack_timeout_s: float = 30.0
    ) -> None:
        self._send = send
        self._max_backoff_s = max_backoff_s
        self._ack_timeout_s = ack_timeout_s
        #: True while a write keeps failing (for the readiness check still to come).
        self.stalled = False

    async def deliver(self, records: Sequence[Out]) -> None:
        """Write ``records``; return when all are acknowledged."""
        pending = list(records)
        backoff = 0.1
        while pending:
            futures = [
                asyncio.ensure_future(
                    await self._send(r.topic, r.key, r.value, r.partition, r.headers)
                )
                for r in pending
            ]
            _, waiting = await asyncio.wait(futures, timeout=self._ack_timeout_s)
            for future in waiting:
                # A send Kafka never answered (seen after a worker restart): give up on it
                # and send the record again rather than wait forever.
                future.cancel()
            results = [
                TimeoutError(f"no acknowledgement in {self._ack_timeout_s}s")
                if future in waiting
                else future.exception() or future.result()
                for future in futures
            ]
            failed = [
                (record, result)
                for record, result in zip(pending, results, strict=True)
                if isinstance(result, BaseException)
            ]
            if not failed:
                self.stalled = False
                metrics.count(r.note for r in records)
                return
            self.stalled = True
            record, error = failed[0]
            log.warning(
                "Kafka refused %d record(s) (first: topic %s: %r); retrying in %.1fs",
                len(failed),
                record.topic,
                error,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
            pending = [record for record, _ in failed]


_DELETED = object()


class WriteBehind(MutableMapping[bytes, Any]):
    """A table view whose writes reach the table only on :meth:`commit`.

    An agent commits after its outputs are acknowledged: had the table entry been
    written first, a crash in between would make the re-delivered input look like
    a duplicate of work whose outputs never reached Kafka.
    """

    def __init__(self, table: MutableMapping[bytes, Any]) -> None:
        self._table = table
        self._pending: dict[bytes, Any] = {}

    def __getitem__(self, key: bytes) -> Any:
        if key in self._pending:
            value = self._pending[key]
            if value is _DELETED:
                raise KeyError(key)
            return value
        return self._table[key]

    def __setitem__(self, key: bytes, value: Any) -> None:
        self._pending[key] = value

    def __delitem__(self, key: bytes) -> None:
        self._pending[key] = _DELETED

    def __iter__(self) -> Iterator[bytes]:
        yield from (k for k, v in self._pending.items() if v is not _DELETED)
        yield from (k for k in self._table if k not in self._pending)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, key: bytes, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def commit(self) -> None:
        """Write the pending entries (and deletions) to the table."""
        for key, value in self._pending.items():
            if value is _DELETED:
                self._table.pop(key, None)
            else:
                self._table[key] = value
        self._pending.clear()
