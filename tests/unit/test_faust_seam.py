"""The Faust internals Herald's runtime relies on, pinned against the installed release."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import faust
import pytest
from faust.transport.consumer import Consumer
from mode import Service

from pipeline.errors import FaustSeamError
from pipeline.runtime.app import task_stacks
from pipeline.runtime.faust import FAUST_VERSION, ConsumerSeam, check_faust, drain_in_batches


def test_the_installed_faust_has_every_internal_the_runtime_uses() -> None:
    check_faust()


def test_a_renamed_internal_stops_the_worker_naming_the_faust_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(Consumer, "_add_gap")
    with pytest.raises(FaustSeamError, match=rf"faust-streaming {FAUST_VERSION}.*_add_gap"):
        check_faust()


def test_a_reshaped_internal_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    async def add_gap(self: Any, tp: Any, offsets: Any) -> None:
        return None

    monkeypatch.setattr(Consumer, "_add_gap", add_gap)
    with pytest.raises(FaustSeamError, match="_add_gap"):
        check_faust()


def test_guarding_a_consumer_without_read_offsets_fails_loudly() -> None:
    class BareConsumer:
        def ack(self, message: Any) -> bool:
            return True

        async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
            return None

    class App:
        consumer = BareConsumer()

    seam = ConsumerSeam(App())  # type: ignore[arg-type]
    with pytest.raises(FaustSeamError, match="_read_offset"):
        seam.guard(lambda ack: ack, lambda add_gap: add_gap, lambda offsets: offsets)


def test_guard_wraps_ack_and_gap_once_per_consumer() -> None:
    class App:
        consumer: Any = None

    app = App()
    seam = ConsumerSeam(app)  # type: ignore[arg-type]
    app.consumer = faust.App("seam-test", broker="kafka://127.0.0.1:1").consumer
    wrapped: list[str] = []

    def wrap(name: str) -> Any:
        def wrapper(original: Any) -> Any:
            wrapped.append(name)
            return original

        return wrapper

    seam.guard(wrap("ack"), wrap("gap"), wrap("read"))
    seam.guard(wrap("ack"), wrap("gap"), wrap("read"))
    assert wrapped == ["ack", "gap", "read"]


def test_describe_reports_the_flow_and_never_fails_on_an_unstarted_consumer() -> None:
    app = faust.App("seam-describe", broker="kafka://127.0.0.1:1")
    report = ConsumerSeam(app).describe([("intents", 0)])
    assert "rebalancing=False" in report
    assert "recovered=False" in report
    # The aiokafka consumer does not exist before the worker starts: read as unknown.
    assert "aiokafka (position, paused)=unknown" in report


async def testtask_stacks_name_each_task_and_its_chain_of_awaits() -> None:
    async def inner() -> None:
        await asyncio.sleep(10)

    async def outer() -> None:
        await inner()

    task = asyncio.create_task(outer(), name="stuck")
    await asyncio.sleep(0)
    report = task_stacks()
    task.cancel()
    assert "stuck: outer (test_faust_seam.py:" in report
    assert "-> inner (test_faust_seam.py:" in report


class FetchLoop(Service):
    """What drain_in_batches reads of a Faust consumer, fed scripted batches."""

    def __init__(self, batches: list[list[int]], callback: Any) -> None:
        super().__init__()
        self.batches = batches
        self.callback = callback
        self.diag = cast(
            Any, SimpleNamespace(set_flag=lambda flag: None, unset_flag=lambda flag: None)
        )
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True))
        self.transport = SimpleNamespace(app=SimpleNamespace(should_stop=False))
        self.consumer_stopped_errors = ()
        self.suspend_flow = asyncio.Event()
        self._commit_every = None
        self._n_acked = 0
        self._read_offset: dict[Any, int | None] = defaultdict(lambda: None)
        self.gaps: list[tuple[int, int]] = []

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        self.gaps.append((offset_from, offset_to))

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:  # noqa: ASYNC109
        self.suspend_flow.clear()  # Faust fetches again only once the rebalance is over
        if not self.batches:
            self._stopped.set()  # the worker stops: the loop ends
            return
        for offset in self.batches.pop(0):
            yield ("t", 0), SimpleNamespace(topic="t", partition=0, offset=offset)


async def test_the_batched_fetch_loop_hands_over_what_faust_would() -> None:
    handed: list[int] = []

    async def callback(message: Any) -> None:
        handed.append(message.offset)

    consumer = FetchLoop([[0, 1, 2], [1, 3, 7, 8]], callback)
    await drain_in_batches(consumer, Service())
    # Offset 1 again is below the read offset once 2 was handed over: dropped.
    assert handed == [0, 1, 2, 3, 7, 8]
    assert consumer.gaps == [(4, 7)]  # the jump 3 -> 7, for Faust's gap bookkeeping
    assert consumer._read_offset[("t", 0)] == 8


async def test_a_rebalance_mid_batch_stops_that_batch_and_the_loop_goes_on() -> None:
    handed: list[int] = []
    consumer: FetchLoop

    async def callback(message: Any) -> None:
        if message.offset == 1:  # a rebalance starts while this record waits
            consumer.suspend_flow.set()
            await asyncio.sleep(10)
        handed.append(message.offset)

    consumer = FetchLoop([[0, 1, 2], [5]], callback)
    await asyncio.wait_for(drain_in_batches(consumer, Service()), timeout=5)
    assert handed == [0, 5]  # 1 was abandoned, 2 never handed over; the next batch came
    assert consumer._read_offset[("t", 0)] == 5
