"""The circuit breaker's states, and how a held route waits without spending attempts."""

from __future__ import annotations

from pipeline.contracts import Contracts
from pipeline.errors import (
    SmtpConnectionError,
    SmtpDeferredError,
    SmtpRejectedError,
    SmtpTimeoutError,
)
from pipeline.providers.breaker import CircuitBreaker
from pipeline.runtime.records import RawRecord
from pipeline.settings import Settings
from pipeline.stages.delay import DUE_AT
from pipeline.stages.deliveries import Deliveries
from tests.support import route
from tests.unit.helpers import stage_context


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_probes_after_the_cooldown() -> None:
    clock = FakeTime()
    breaker = CircuitBreaker("smtp", threshold=3, cooldown_s=10, max_cooldown_s=25, monotonic=clock)
    breaker.failed()
    breaker.failed()
    breaker.succeeded()  # not consecutive: the count starts again
    breaker.failed()
    breaker.failed()
    assert breaker.gate() == "call"
    breaker.failed()
    assert (breaker.state, breaker.gate(), breaker.wait_s()) == ("open", "wait", 10)
    clock.now += 10
    assert breaker.gate() == "probe"
    assert breaker.gate() == "wait"  # one probe at a time
    breaker.failed()
    assert (breaker.state, breaker.wait_s()) == ("open", 20)  # the cooldown doubles
    clock.now += 20
    assert breaker.gate() == "probe"
    breaker.failed()
    assert breaker.wait_s() == 25  # up to the cap
    clock.now += 25
    assert breaker.gate() == "probe"
    breaker.succeeded()
    assert (breaker.state, breaker.gate(), breaker.wait_s()) == ("closed", "call", 0)
    for _ in range(3):
        breaker.failed()
    assert breaker.wait_s() == 10  # a closed circuit forgets the longer cooldown


def test_only_an_unreachable_or_silent_server_counts() -> None:
    assert SmtpConnectionError("refused").server_unavailable
    assert SmtpTimeoutError("no reply").server_unavailable
    assert not SmtpDeferredError("421", code=421).server_unavailable
    assert not SmtpRejectedError("550", code=550).server_unavailable


def test_a_held_route_waits_in_the_tiers_with_its_attempts_unchanged() -> None:
    settings = Settings()
    contracts = Contracts(settings)
    deliveries = Deliveries(stage_context(settings), "email")
    request = route("u1", "user1@example.org", attempt=1)
    raw = RawRecord(
        topic=settings.topic("notification.email.requested"),
        partition=2,
        offset=7,
        key=b"u1",
        value=contracts.channel_request.encode(request),
        timestamp_ms=0,
    )
    first = deliveries.deferred(raw, request, 1_000_000, 45.0, "circuit_open")
    again = deliveries.deferred(raw, request, 1_050_000, 45.0, "circuit_open")
    tier, status = first
    held = contracts.channel_request.decode(tier.value or b"")
    assert (held.route_id, held.attempt, held.attempts) == (request.route_id, 1, [])
    due = int(dict(tier.headers)[DUE_AT])
    assert held.due_at_ms == due
    assert 1_045_000 <= due <= 1_049_500
    event = contracts.status.decode(status.value or b"")
    assert (event.status, event.reason, event.attempt) == ("deferred", "circuit_open", 1)
    # Each wait is its own event (a repeated event id would read as a duplicate write).
    assert event.event_id != contracts.status.decode(again[1].value or b"").event_id
    short = deliveries.deferred(raw, request, 1_000_000, 0.0, "circuit_open")[0]
    shortest_tier_ms = int(deliveries.tiers.policy.tiers[0] * 1000)
    assert int(dict(short.headers)[DUE_AT]) >= 1_000_000 + shortest_tier_ms
