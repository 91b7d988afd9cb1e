"""The DLQ tools' parts that need no broker: times, rates, filters, pacing."""

from __future__ import annotations

import pytest

from pipeline.contracts.records import DeadLetter
from pipeline.errors import ConfigurationError
from pipeline.ops.dlq import LetterFilter, RateLimiter, parse_rate
from pipeline.times import parse_time

NOW = 1_800_000_000_000


def letter(**fields: object) -> DeadLetter:
    values: dict[str, object] = {
        "dead_letter_id": "d-1",
        "channel": "email",
        "route_id": "r-1",
        "notification_id": "n-1",
        "notification_type": "game.turn.ready",
        "reason": "budget_exhausted",
        "error_class": "transient",
        "last_reason": "smtp_deferred",
        "last_error": "421",
        "dead_lettered_at_ms": NOW,
        "origin_topic": "notification.email.requested",
        "request": b"",
    }
    values.update(fields)
    return DeadLetter(**values)  # type: ignore[arg-type]


def test_times_are_iso_or_ages() -> None:
    assert parse_time("2h", NOW) == NOW - 7_200_000
    assert parse_time("1.5d", NOW) == NOW - 129_600_000
    assert parse_time("2027-01-15T12:00:00", NOW) == 1_800_014_400_000
    assert parse_time("2027-01-15T13:00:00+01:00", NOW) == 1_800_014_400_000
    with pytest.raises(ConfigurationError):
        parse_time("yesterday", NOW)


def test_rates() -> None:
    assert parse_rate("50/s") == 50
    assert parse_rate("300/m") == 5
    assert parse_rate("7") == 7
    for bad in ("0/s", "fast", "-1", "5/y"):
        with pytest.raises(ConfigurationError):
            parse_rate(bad)


def test_filters_select_by_every_field() -> None:
    assert LetterFilter().matches(letter())
    assert LetterFilter(channel="email", reason="smtp_deferred").matches(letter())
    assert not LetterFilter(channel="push").matches(letter())
    assert not LetterFilter(notification_type="game.finished").matches(letter())
    assert not LetterFilter(error_class="permanent").matches(letter())
    assert LetterFilter(since_ms=NOW, until_ms=NOW + 1).matches(letter())
    assert not LetterFilter(until_ms=NOW).matches(letter())
    assert LetterFilter(ids=frozenset({"r-1"})).matches(letter())
    assert not LetterFilter(ids=frozenset({"d-2"})).matches(letter())


def test_the_limiter_spaces_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    monkeypatch.setattr("pipeline.ops.dlq.time.sleep", sleep)
    limiter = RateLimiter(4, clock=lambda: now[0])
    for _ in range(5):
        limiter.wait()
    assert slept == [0.25, 0.25, 0.25, 0.25]  # the first call goes at once
    now[0] += 10  # idle: no burst is saved up beyond the next call
    limiter.wait()
    limiter.wait()
    assert slept[-1] == 0.25
