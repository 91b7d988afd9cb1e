"""Token buckets: how Herald spends a rate (topologies/limits.yaml)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``per_second`` tokens a second, at most ``burst`` saved up; not thread-safe."""

    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = per_second
        self._size = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._at = clock()

    def take(self, n: int = 1) -> float:
        """Take ``n`` tokens: 0.0 when taken, else the seconds until they would be there
        (nothing is taken then)."""
        now = self._clock()
        self._tokens = min(self._size, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= n:
            self._tokens -= n
            return 0.0
        return (n - self._tokens) / self._rate
