"""Table views for stages: reads see the batch's own writes, which reach the table
only once the batch's outputs are acknowledged."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

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
