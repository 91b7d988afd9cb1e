"""`herald bench` runs end to end on a small scale and prints its figures (the figures
themselves are not asserted: they are for docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.settings import Settings
from tests.support import HERALD, settings_env

pytestmark = pytest.mark.integration


def test_the_benchmark_prints_every_figure(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.model_copy(update={"state_dir": tmp_path})
    shown = subprocess.run(
        [
            HERALD,
            "bench",
            "--intents",
            "300",
            "--rate",
            "200",
            "--duration",
            "1",
            "--email-intents",
            "40",
            "--http-rate",
            "100",
            "--http-duration",
            "1",
        ],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
    figures = ("saturation, backlog drain", "saturation, pipelined", "latency at 200 intents/s")
    pipeline = [f"{channel}, 1 worker: {run}" for channel in ("push", "email") for run in figures]
    for name in ["raw confluent-kafka passthrough", "minimal Faust passthrough agent", *pipeline]:
        assert name in shown.stdout, name
    assert "pipeline rates as shares of the passthroughs" in shown.stdout
    (written,) = (tmp_path / "bench").glob("*/figures.json")
    runs = {run["name"]: run for run in json.loads(written.read_text())}
    assert runs["push, 1 worker: latency at 200 intents/s"]["count"] == 200
    assert runs["push, 1 worker: latency at 200 intents/s"]["p99_ms"] is not None
    assert runs["push, 1 worker: saturation, pipelined"]["count"] == 300
    assert runs["push, 1 worker: saturation, backlog drain"]["peak_rss_mb"] > 0
    for name in pipeline:  # every pipeline figure as a share of both baselines
        assert runs[name]["of_faust"] > 0, name
        assert runs[name]["of_raw"] > 0, name
    # The HTTP intake beside its baseline: every request answered, as it should be.
    assert "P99 of the POST:" in shown.stdout
    assert runs["POST /api/v1/notifications"]["answers"] == {"202": 100}
    assert runs["GET /healthz (the same server, baseline)"]["answers"] == {"200": 100}
