"""The benchmark's arithmetic: summed worker memory, and every pipeline rate as a share
of the same bench run's passthroughs (the runs themselves: tests/integration)."""

from __future__ import annotations

import pytest

from pipeline.ops.bench import Run, _label, _line, _ratios


def test_peak_rss_is_summed_over_the_workers_and_each_is_shown() -> None:
    run = Run("push, 2 workers: saturation, pipelined", 1000, 2.0, peak_rss_each_mb=[120, 130])

    assert run.rate == 500
    assert run.peak_rss_mb == 250
    assert run.as_dict()["peak_rss_each_mb"] == [120, 130]
    assert "peak RSS 250 MiB (120 + 130)" in _line(run)
    assert Run("raw", 10, 1.0).peak_rss_mb is None


def test_the_label_says_the_worker_count() -> None:
    assert _label("push", 1) == "push, 1 worker"
    assert _label("push", 3) == "push, 3 workers"


def test_every_pipeline_rate_is_a_share_of_both_baselines() -> None:
    runs = [
        Run("raw confluent-kafka passthrough", 10000, 1.0),
        Run("minimal Faust passthrough agent", 1000, 1.0),
        Run("push, 1 worker: saturation, backlog drain", 500, 1.0),
        Run("push, 1 worker: latency at 100 intents/s", 100, 1.0),
    ]
    shown: list[str] = []

    shares = _ratios(runs, shown.append)

    assert shares == {
        "push, 1 worker: saturation, backlog drain": {"of_faust": 0.5, "of_raw": 0.05},
        "push, 1 worker: latency at 100 intents/s": {"of_faust": 0.1, "of_raw": 0.01},
    }
    assert len(shown) == 3
    assert "50.00% of Faust" in shown[1]
    assert "5.00% of raw" in shown[1]


@pytest.mark.parametrize("baselines", [[], [Run("raw confluent-kafka passthrough", 0, 0.0)]])
def test_no_shares_without_a_measured_baseline(baselines: list[Run]) -> None:
    shown: list[str] = []
    runs = [*baselines, Run("push, 1 worker: saturation, pipelined", 5, 1.0)]

    assert _ratios(runs, shown.append) == {}
    assert shown == []
