"""The user directory: the compacted users topic materialised as a table by user_id."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from pipeline.errors import DecodeError
from pipeline.runtime.records import Out, RawRecord
from pipeline.stages.context import StageContext
from pipeline.stages.outputs import malformed
from pipeline.topology.partitioning import partition_for


class UserDirectory:
    """Keeps the users table: the latest profile (Avro bytes) per user, None-free.

    The table is partitioned like the recipients stream (murmur2 of user_id). A
    profile the user service wrote elsewhere (another partitioner) moves to its home
    partition first, through ``notification.users.keyed``.
    """

    def __init__(self, ctx: StageContext) -> None:
        settings, topology = ctx.settings, ctx.topology
        self._contracts = ctx.contracts
        self.users_topic = settings.topic("notification.users")
        self.keyed_topic = settings.topic("notification.users.keyed")
        self._malformed_topic = settings.topic("notification.malformed")
        self._partitions = topology.spec("notification.users").partitions

    def handle(self, raw: RawRecord, table: MutableMapping[bytes, Any], now_ms: int) -> list[Out]:
        """Apply one profile (or tombstone) to ``table``; outputs only for forwards and errors."""
        if not raw.key:
            return [
                self._malformed(raw, "missing_key", "user records are keyed by user_id", now_ms)
            ]
        home = partition_for(raw.key, self._partitions)
        if raw.topic == self.users_topic and raw.partition != home:
            return [Out(self.keyed_topic, raw.key, raw.value, partition=home)]
        if raw.value is None:
            del table[raw.key]
            return []
        try:
            profile = self._contracts.user.decode(raw.value)
        except DecodeError as exc:
            return [self._malformed(raw, exc.reason, exc.detail, now_ms)]
        if profile.user_id.encode("utf-8") != raw.key:
            detail = f"record key {raw.key!r} differs from user_id {profile.user_id!r}"
            return [self._malformed(raw, "key_mismatch", detail, now_ms)]
        table[raw.key] = raw.value
        return []

    def _malformed(self, raw: RawRecord, reason: str, detail: str, now_ms: int) -> Out:
        return malformed(self._contracts, self._malformed_topic, raw, reason, detail, now_ms)
