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
_MISSING = object()


#: Compact JSON (json.dumps with arguments builds an encoder per call).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def encode_json(value: Any) -> bytes:
    """A JSON table value as Faust's ``json`` serializer reads it back on recovery."""
    return _compact_json(value).encode()


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


#: The writes of one batch, sealed when the batch is written (key -> value or deleted).
Layer = dict[bytes, Any]


class WriteBehind(MutableMapping[bytes, Any]):
    """A table view whose writes reach the table only once their batch is acknowledged.

    A stage commits a batch's writes after its outputs are acknowledged: had the
    table entry been written first, a crash in between would make the re-delivered
    input look like a duplicate of work whose outputs never reached Kafka. Several
    batches may be in flight at once (:meth:`seal`): reads see the newest write of
    the current batch, then of the sealed ones, then the table; sealed layers reach
    the table oldest first.
    """

    def __init__(
        self,
        table: MutableMapping[bytes, Any],
        changelog: Changelog | None = None,
        attached: dict[str, WriteBehind] | None = None,
    ) -> None:
        self._table = table
        self._changelog = changelog
        self._pending: Layer = {}
        self._sealed: list[Layer] = []
        #: Views of further tables one stage writes, sealed and committed with this one.
        self._attached = attached or {}

    def attached(self, name: str) -> WriteBehind:
        """The view of the stage's further table ``name`` (same batches as this one)."""
        return self._attached[name]

    def __getitem__(self, key: bytes) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: bytes, value: Any) -> None:
        self._pending[key] = value

    def __delitem__(self, key: bytes) -> None:
        self._pending[key] = _DELETED

    def __iter__(self) -> Iterator[bytes]:
        merged: Layer = {k: None for k in self._table}
        for layer in (*self._sealed, self._pending):
            merged.update(layer)
        yield from (k for k, v in merged.items() if v is not _DELETED)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, key: bytes, default: Any = None) -> Any:
        # Without exceptions: most lookups (a new notification's key) find nothing.
        value = self._pending.get(key, _MISSING)
        if value is _MISSING:
            for layer in reversed(self._sealed):
                value = layer.get(key, _MISSING)
                if value is not _MISSING:
                    break
            else:
                return self._table.get(key, default)
        return default if value is _DELETED else value

    def seal(self) -> Layer:
        """Close the current batch's writes (to :meth:`commit` once it is written)."""
        layer, self._pending = self._pending, {}
        self._sealed.append(layer)
        for view in self._attached.values():
            view.seal()
        return layer

    def changelog_records(self, layer: Layer | None = None) -> list[Out]:
        """The changelog records of ``layer`` (default: the current writes); none
        without a changelog."""
        records = []
        if self._attached:  # their layers were sealed with this one: same position
            index = None if layer is None else self._position(layer)
            for view in self._attached.values():
                records += view.changelog_records(None if index is None else view._sealed[index])
        changelog = self._changelog
        if changelog is None:
            return records
        writes = self._pending if layer is None else layer
        return records + [changelog.record(key, value) for key, value in writes.items()]

    def _position(self, layer: Layer) -> int:
        for index, sealed in enumerate(self._sealed):
            if sealed is layer:
                return index
        raise RuntimeError("not a sealed layer of this view")

    def commit(self, layer: Layer | None = None) -> None:
        """Write ``layer`` (the oldest sealed one) to the table; without one, every
        sealed layer and the current writes."""
        if layer is None:
            self.seal()
            while self._sealed:
                self.commit(self._sealed[0])
            return
        if not self._sealed or self._sealed[0] is not layer:
            raise RuntimeError("table layers must be committed in the order they were sealed")
        self._sealed.pop(0)
        for view in self._attached.values():
            view.commit(view._sealed[0])
        for key, value in layer.items():
            if value is _DELETED:
                self._table.pop(key, None)
            else:
                self._table[key] = value
