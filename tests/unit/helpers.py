"""Builders shared by unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web

from pipeline.contracts.records import Intent
from pipeline.runtime.producer import Acks
from pipeline.runtime.records import Out, RawRecord
from pipeline.settings import Settings
from pipeline.stages.context import StageContext
from pipeline.times import Clock
from pipeline.topology import Topology
from pipeline.topology.partitioning import partition_for

TURN_READY_PAYLOAD = {"game_id": "g-1", "game_name": "Andromeda", "turn_number": 7}


def make_intent(**overrides: Any) -> Intent:
    """A valid game.turn.ready intent; keyword arguments replace fields."""
    payload = overrides.pop("payload", TURN_READY_PAYLOAD)
    fields: dict[str, Any] = {
        "notification_type": "game.turn.ready",
        "producer": "game-master",
        "audience_kind": "user",
        "recipient_user_ids": ["u1", "u2"],
        "idempotency_key": "turn-7",
        "occurred_at_ms": 1_700_000_000_000,
        "payload_json": json.dumps(payload),
    }
    fields.update(overrides)
    return Intent(**fields)


def stage_context(settings: Settings, clock: Clock | None = None) -> StageContext:
    """The context stages are built from, on ``settings`` (and ``clock``)."""
    ctx = StageContext.load(settings)
    return ctx if clock is None else dataclasses.replace(ctx, clock=clock)


def raw(
    value: bytes | None,
    *,
    topic: str = "notification.intents",
    partition: int = 0,
    offset: int = 0,
    key: bytes | None = None,
    headers: tuple[tuple[str, bytes], ...] = (),
) -> RawRecord:
    """A raw record as an agent would receive it."""
    return RawRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=1,
        key=key,
        value=value,
        headers=headers,
    )


def users_home(settings: Settings, key: bytes = b"u1") -> int:
    """The users-topic partition ``key`` belongs on (where the directory keeps it)."""
    return partition_for(key, Topology.load(settings).spec("notification.users").partitions)


def profile_record(
    settings: Settings, value: bytes | None, key: bytes = b"u1", partition: int | None = None
) -> RawRecord:
    """A profile (or tombstone) on the users topic, on its home partition unless
    ``partition`` says otherwise."""
    home = users_home(settings, key) if partition is None else partition
    return raw(value, topic="notification.users", key=key, partition=home)


class FakeBroker:
    """Stands in for a producer's send: records what is acknowledged, can refuse the
    first ``failures`` sends to ``refuse_topic`` and can hold every answer back."""

    def __init__(self, failures: int = 0, refuse_topic: str = "", unanswered: int = 0) -> None:
        self.failures = failures
        self.refuse_topic = refuse_topic
        #: The first ``unanswered`` sends get a future that never resolves.
        self.unanswered = unanswered
        self.acked: list[bytes | None] = []
        self.answering = asyncio.Event()
        self.answering.set()

    async def write(self, records: Sequence[Out]) -> Acks:
        await self.answering.wait()
        acks = Acks(len(records))
        for index, record in enumerate(records):
            if self.unanswered > 0:
                self.unanswered -= 1
                continue
            if record.topic == self.refuse_topic and self.failures > 0:
                self.failures -= 1
                acks.report(index, RuntimeError("not enough replicas"), None)
            else:
                self.acked.append(record.value)
                acks.report(index, None, (0, len(self.acked) - 1))
        return acks


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on a free local port for the block; its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
