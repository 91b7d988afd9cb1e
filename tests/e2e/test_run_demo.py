"""The path `make run` takes: a worker process and `herald demo` against it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.settings import Settings
from tests.smtp import ScriptedSmtp, smtp_server
from tests.support import HERALD, WorkerProcess, settings_env


@pytest.fixture
def smtp() -> Iterator[ScriptedSmtp]:
    yield from smtp_server()


def test_demo_shows_intake_routing_and_delivery(
    isolated: Settings, smtp: ScriptedSmtp, tmp_path: Path
) -> None:
    settings = isolated.model_copy(update={"smtp_port": smtp.port})
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        result = subprocess.run(
            [HERALD, "demo", "--timeout", "90"],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        worker.stop()
    assert result.returncode == 0, result.stdout + result.stderr + worker.log()[-3000:]
    lines = result.stdout.splitlines()
    statuses = sorted(line.split()[1] for line in lines if line.startswith("status"))
    assert statuses == ["accepted", "duplicate", "rejected_conflict"]
    assert sorted(line.split()[1] for line in lines if line.startswith("recipient")) == [
        "demo-alice",
        "demo-bob",
    ]
    routes = sorted(tuple(line.split()[1:4]) for line in lines if line.startswith("route "))
    assert routes == [
        ("routed", "email", "demo-alice"),
        ("routed", "email", "demo-bob"),
        ("routed", "push", "demo-alice"),
        ("skipped", "push", "demo-bob"),
    ]
    [malformed] = [line for line in lines if line.startswith("malformed")]
    assert "reason=undecodable" in malformed
    assert f"origin={isolated.topic('notification.intents')}[" in malformed
    mailed = sorted(tuple(line.split()[1:3]) for line in lines if line.startswith("email "))
    assert mailed == [("sent", "demo-alice"), ("sent", "demo-bob")]
    pushed = [line.split()[1:3] for line in lines if line.startswith("push ")]
    assert pushed == [["published", "demo-alice"]]
    [gateway] = [line for line in lines if line.startswith("gateway ")]
    assert "demo-alice GameTurnReady" in gateway
    assert "Zug 42 ist bereit" in gateway
    subjects = sorted(str(message["Subject"]) for _, message in smtp.received)
    assert subjects == ["Andromeda: Zug 42 ist bereit", "Andromeda: turn 42 is ready"]
