"""A circuit breaker for a delivery server (the SMTP server).

Without it, a server that is down gets every route's every attempt, and each of those
attempts spends a unit of the route's retry budget: an outage longer than the delay
tiers sends healthy mail to the DLQ. With it, after ``threshold`` consecutive
connection failures or timeouts the circuit opens: routes wait in the retry tiers
without an attempt being spent and the server is left alone. After a cooldown one
caller probes the server (a connection, no mail); success closes the circuit,
failure opens it again for twice as long (up to a cap).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from pipeline import metrics
from pipeline.settings import Settings

log = logging.getLogger(__name__)

Gate = Literal["call", "probe", "wait"]


class CircuitBreaker:
    """Closed (calls go through), open (nobody calls until the cooldown ends) or
    half-open (one probe in flight). Shared by every lane that talks to the server."""

    def __init__(
        self,
        name: str,
        threshold: int,
        cooldown_s: float,
        max_cooldown_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._threshold = threshold
        self._base_cooldown_s = cooldown_s
        self._max_cooldown_s = max(max_cooldown_s, cooldown_s)
        self._monotonic = monotonic
        self._state: Literal["closed", "open", "half_open"] = "closed"
        self._failures = 0
        self._cooldown_s = cooldown_s
        self._opens_until = 0.0
        metrics.CIRCUIT_OPEN.labels(name).set(0)

    @classmethod
    def smtp(cls, settings: Settings) -> CircuitBreaker:
        return cls(
            "smtp",
            settings.smtp_breaker_threshold,
            settings.smtp_breaker_cooldown_s,
            settings.smtp_breaker_max_cooldown_s,
        )

    @property
    def state(self) -> str:
        return self._state

    def gate(self) -> Gate:
        """``call`` the server, ``probe`` it first (this caller is the one probe), or
        ``wait`` (open, or someone else is probing)."""
        if self._state == "closed":
            return "call"
        if self._state == "open" and self._monotonic() >= self._opens_until:
            self._state = "half_open"
            return "probe"
        return "wait"

    def wait_s(self) -> float:
        """Seconds until the next probe is due (0 when closed)."""
        if self._state == "closed":
            return 0.0
        return max(self._opens_until - self._monotonic(), 0.0)

    def succeeded(self) -> None:
        """The server answered: close the circuit."""
        if self._state != "closed":
            log.info("%s circuit closed: the server answers again", self.name)
            metrics.CIRCUIT_OPEN.labels(self.name).set(0)
        self._state = "closed"
        self._failures = 0
        self._cooldown_s = self._base_cooldown_s

    def failed(self) -> None:
        """The server was unreachable or did not answer."""
        if self._state == "half_open":
            self._cooldown_s = min(self._cooldown_s * 2, self._max_cooldown_s)
            self._open("the probe failed")
            return
        self._failures += 1
        if self._state == "closed" and self._failures >= self._threshold:
            self._open(f"{self._failures} consecutive failures")

    def _open(self, why: str) -> None:
        self._state = "open"
        self._opens_until = self._monotonic() + self._cooldown_s
        metrics.CIRCUIT_OPEN.labels(self.name).set(1)
        log.warning(
            "%s circuit open (%s): no calls for %.0f s, routes wait in the retry tiers",
            self.name,
            why,
            self._cooldown_s,
        )
