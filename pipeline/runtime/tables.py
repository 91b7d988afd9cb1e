"""Table views for stages: reads see the batch's own writes, which reach the table
only once the batch's outputs are acknowledged."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from pipeline.runtime.records import Out
from pipeline.topology.partitioning import partition_for

_DELETED = object()


def encode_json(value: Any) -> bytes:
    """A JSON table value as Faust's ``json`` serializer reads it back on recovery."""
    return json.dumps(value, separators=(",", ":")).encode()


def encode_raw(value: Any) -> bytes:
    """A raw (bytes) table value."""
    return bytes(value)


@dataclass(frozen=True, slots=True)
class Changelog:
    """Where a table's entries are made durable: the records the runtime writes with
    each batch's outputs (acknowledged with them), each on its key's partition."""

    topic: str
    """Physical changelog topic."""
    partitions: int
    """Its partition count (the copartition group's)."""
    encode: Callable[[Any], bytes]
    """Value to changelog bytes, as the table's Faust serializer decodes them."""

    def record(self, key: bytes, value: Any) -> Out:
        """The changelog record of ``key`` set to ``value`` (None or deleted: a tombstone)."""
        data = None if value is None or value is _DELETED else self.encode(value)
        return Out(self.topic, key, data, partition=partition_for(key, self.partitions))


@dataclass(frozen=True, slots=True)
class StageTable:
    """A table as stages use it: the local store, and (when the runtime writes it) the
    changelog. A table without one (the delivery registries) gets its changelog
    records from its stage, which writes each entry when it must be durable."""

    store: MutableMapping[bytes, Any]
    """The table's local data (Faust's store), read and written directly."""
    changelog: Changelog | None = None
    """Its changelog, when the runtime writes it with each batch."""


class WriteBehind(MutableMapping[bytes, Any]):
    """A table view whose writes reach the table only on :meth:`commit`.

    An agent commits after its outputs are acknowledged: had the table entry been
    written first, a crash in between would make the re-delivered input look like
    a duplicate of work whose outputs never reached Kafka.
    """

    def __init__(
        self, table: MutableMapping[bytes, Any], changelog: Changelog | None = None
    ) -> None:
        self._table = table
        self._changelog = changelog
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

    def changelog_records(self) -> list[Out]:
        """The changelog records of the pending writes (none without a changelog)."""
        changelog = self._changelog
        if changelog is None:
            return []
        return [changelog.record(key, value) for key, value in self._pending.items()]

    def commit(self) -> None:
        """Write the pending entries (and deletions) to the table."""
        for key, value in self._pending.items():
            if value is _DELETED:
                self._table.pop(key, None)
            else:
                self._table[key] = value
        self._pending.clear()
