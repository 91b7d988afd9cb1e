"""The stall watchdog's cures that reach into Faust, against the real broker: a worker
that rejoins its group, and one whose fetch loop ended by itself, keep delivering
every intent exactly once (pipeline.runtime.watchdog)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.settings import Settings
from tests.smtp import ScriptedSmtp
from tests.support import WorkerProcess, publish, wait_for_deliveries

pytestmark = pytest.mark.integration


def worker_that(action: str) -> list[str]:
    """A `herald worker` that runs ``action`` (Python statements, indented by four
    spaces, with ``worker`` and ``seam`` at hand) once it is ready, then goes on."""
    script = f"""
import asyncio
from pipeline.settings import Settings
from pipeline.worker import Worker

worker = Worker(Settings())

async def once_ready() -> None:
    seam = worker.runtime.seam
    while not (seam.streaming() and seam.tables_recovered()):
        await asyncio.sleep(0.2)
{action}

worker.runtime.task(once_ready)
worker.run()
"""
    return [sys.executable, "-c", script]


#: Asks for the cure, as the watchdog does.
REJOINING = """
    await seam.rejoin()
    print("herald-test: rejoin requested", flush=True)"""

#: Ends the fetch loop outside a rebalance: Faust's Fetcher swallows the
#: CancelledError and reads nothing more, until the watchdog starts it again.
ENDING_THE_FETCH_LOOP = """
    for task in list(worker.app._fetcher._futures):
        task.cancel()
    print("herald-test: fetch loop cancelled", flush=True)"""


@pytest.fixture
def smtp() -> Iterator[ScriptedSmtp]:
    with ScriptedSmtp() as server:
        yield server


def test_a_worker_that_rejoins_its_group_goes_on_delivering_each_intent_once(
    isolated: Settings, smtp: ScriptedSmtp, tmp_path: Path
) -> None:
    settings = isolated.model_copy(update={"smtp_port": smtp.port})
    worker = WorkerProcess(settings, tmp_path / "worker.log", command=worker_that(REJOINING))
    worker.start()
    try:
        before = publish(settings, 20)  # in flight while the group rebalances
        deadline = time.monotonic() + 120
        # A second recovery ending ("Worker ready"): the rejoin's rebalance is over.
        while worker.log().count("Worker ready") < 2:
            assert time.monotonic() < deadline, "the rejoin never completed"
            assert worker.alive(), worker.log()[-3000:]
            time.sleep(0.5)
        assert "herald-test: rejoin requested" in worker.log()
        after = publish(settings, 20)
        mails, pushes = wait_for_deliveries(settings, smtp, before + after)
        assert worker.alive()
    finally:
        worker.stop()
    assert mails == Counter(before + after)
    assert pushes == Counter(before + after)


def test_a_fetch_loop_that_ended_by_itself_is_started_again(
    isolated: Settings, smtp: ScriptedSmtp, tmp_path: Path
) -> None:
    settings = isolated.model_copy(update={"smtp_port": smtp.port})
    worker = WorkerProcess(
        settings, tmp_path / "worker.log", command=worker_that(ENDING_THE_FETCH_LOOP)
    )
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while "herald-test: fetch loop cancelled" not in worker.log():
            assert time.monotonic() < deadline, "the worker never got ready"
            assert worker.alive(), worker.log()[-3000:]
            time.sleep(0.5)
        ids = publish(settings, 20)
        mails, pushes = wait_for_deliveries(settings, smtp, ids)
        assert worker.alive()
        assert "fetch loop ended by itself; starting it again" in worker.log()
    finally:
        worker.stop()
    assert mails == Counter(ids)
    assert pushes == Counter(ids)
