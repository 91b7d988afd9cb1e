"""The Faust internals Herald's runtime relies on, pinned against the installed release."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest
from faust.transport.consumer import Consumer

from pipeline.errors import FaustSeamError
from pipeline.runtime.app import task_stacks
from pipeline.runtime.faust import FAUST_VERSION, ConsumerSeam, check_faust


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
