"""The path `make run` takes: a worker process and `herald demo` against it."""

from __future__ import annotations

import subprocess

from pipeline.settings import Settings
from tests.support import HERALD, WorkerProcess, settings_env


def test_demo_shows_intake_and_routing_outcomes(isolated: Settings, worker: WorkerProcess) -> None:
    result = subprocess.run(
        [HERALD, "demo", "--timeout", "90"],
        env=settings_env(isolated),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
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
