"""Shared fixtures for every test layer.

Integration and end-to-end tests run against the real broker: the one named by
KAFKA_BOOTSTRAP_SERVERS, or else the local one that ``scripts/kafka-local start``
fetches and starts. If no broker can be had, those tests fail under CI (CI=true)
and are skipped on a developer's machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.settings import REPO_ROOT, Settings
from pipeline.topology import Topology
from pipeline.topology import admin as topology_admin
from tests.support import WorkerProcess


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        elif f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)


#: Whether a test's call phase failed (read by its teardown).
CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def workers_accounted_for(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose worker exited by itself (a stall, a crash): nothing restarts
    workers in tests, so such an exit is never hidden behind a passing assertion.
    When a test fails, its workers' warnings are printed with the failure (CI keeps
    nothing else of a run)."""
    WorkerProcess.started.clear()
    yield
    started = list(WorkerProcess.started)
    WorkerProcess.started.clear()
    if request.node.stash.get(CALL_FAILED, False):
        for worker in started:
            notable = [
                line
                for line in worker.log().splitlines()
                if any(level in line for level in ("WARNING", "ERROR", "CRITICAL"))
            ]
            print(f"--- {worker.log_path.name}: warnings and errors", file=sys.stderr)
            print("\n".join(notable[-80:]), file=sys.stderr)
    reports = [
        f"{w.log_path.name} exited {status} by itself; its log ends:\n{w.log()[-3000:]}"
        for w, status in ((w, w.unexpected_exit()) for w in started)
        if status is not None
    ]
    if reports:
        pytest.fail("\n".join(reports), pytrace=False)


@pytest.fixture
def settings() -> Settings:
    """Settings with defaults (no environment needed for unit tests)."""
    return Settings()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of a running broker (started here when none is configured)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        return external
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "kafka-local"), "start"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        message = f"no Kafka broker: scripts/kafka-local start failed:\n{result.stderr[-3000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return "127.0.0.1:9092"


@pytest.fixture
def isolated(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: its own topic prefix, consumer group and state folder,
    with every declared topic created on the broker (and deleted afterwards, so the
    broker does not grow by ~30 topics per test)."""
    run = uuid.uuid4().hex[:10]
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=f"t{run}.",
        app_id=f"herald-t{run}",
        state_dir=tmp_path / "state",
        commit_interval_s=0.5,
        stall_timeout_s=20,
        kafka_ack_timeout_s=10,
        metrics_port=0,  # tests that read a worker's metrics pick a free port
    )
    report = topology_admin.apply(settings, Topology.load(settings))
    assert not report.drift, report.drift
    yield settings
    if not os.environ.get("KEEP_TOPICS"):
        topology_admin.delete_prefixed(settings)


@pytest.fixture
def worker(isolated: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A running `herald worker` process for the isolated settings."""
    process = WorkerProcess(isolated, tmp_path / "worker.log")
    process.start()
    yield process
    process.stop()
