"""Token buckets: how Herald spends a rate (topologies/limits.yaml)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
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


class SharedRate:
    """This worker's part of a rate all workers of the group share: the part that its
    share of the channel's partitions is (``share()``, read at most once a second), so
    the parts add up to the whole rate across the group. Lanes wait for a token,
    the most urgent first: a waiting lower rank never takes a token while a more
    urgent one waits."""

    def __init__(
        self,
        per_second: float,
        burst: int,
        share: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_second = per_second
        self._burst = burst
        self._share = share
        self._clock = clock
        self._part = 0.0
        self._part_at = -1e9
        self._tokens = 0.0
        self._at = clock()
        self._waiting: Counter[int] = Counter()

    def _refresh(self, now: float) -> float:
        if now - self._part_at >= 1.0:
            self._part, self._part_at = max(0.0, min(1.0, self._share())), now
        return self._part

    def _poll(self, rank: int) -> float:
        """Take a token for ``rank`` (0.0), or the seconds to wait before asking again."""
        now = self._clock()
        part = self._refresh(now)
        rate, size = self._per_second * part, max(1.0, self._burst * part)
        self._tokens = min(size, self._tokens + (now - self._at) * rate)
        self._at = now
        more_urgent = any(n for r, n in self._waiting.items() if r < rank)
        if self._tokens >= 1.0 and not more_urgent:
            self._tokens -= 1.0
            return 0.0
        if rate <= 0:
            return 0.1  # no partition of the channel here (yet): ask again later
        return max((1.0 - self._tokens) / rate, 0.001)

    async def take(self, rank: int) -> float:
        """Wait for one call's token (rank 0 most urgent); the seconds it waited."""
        started = self._clock()
        while wait := self._poll(rank):
            self._waiting[rank] += 1
            try:
                await asyncio.sleep(wait)
            finally:
                self._waiting[rank] -= 1
        return self._clock() - started
