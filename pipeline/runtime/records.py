"""The records a stage reads and writes, free of any framework.

A stage gets a :class:`RawRecord` (bytes as Kafka stored them: it decodes them
itself, so one bad record never crashes a stream) and returns :class:`Out` records;
the runtime writes those and waits for Kafka's acknowledgement before it lets the
input's offset be committed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pipeline import metrics
from pipeline.values import value_class


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


@value_class
class RawRecord:
    """A Kafka record as an agent received it, before any decoding."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@value_class
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
