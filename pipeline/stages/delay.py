"""Delay tiers: how a record waits (retries, late users, quiet hours) without blocking.

A record that must wait goes, unchanged, to one of its stage's tier topics
(``notification.<stage>.retry.<tier>``) with three headers: where it goes next, when
it is due and its attempt number. Every record in a tier topic waits the same time,
so each partition is a FIFO queue: the tier agent holds the head record until it is
due (at most the tier's delay), then forwards it, or, if it is due later than one
more tier allows (a quiet-hours window of several hours), places it in a tier again.
Only the tier topic's partition waits; the stream the record came from never does.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.runtime.records import Out, RawRecord, header
from pipeline.settings import Settings
from pipeline.stages.context import StageContext
from pipeline.stages.outputs import malformed
from pipeline.topology import RetryPolicy

TARGET = "herald-target"
DUE_AT = "herald-due-at-ms"
ATTEMPT = "herald-attempt"
#: Released this much early rather than sent round a tier again for a few ms.
_EARLY_MS = 50


def attempt_of(headers: Sequence[tuple[str, bytes]]) -> int:
    """The attempt number a delayed record carries (0 when it never waited)."""
    value = header(headers, ATTEMPT)
    return int(value) if value else 0


@dataclass(frozen=True, slots=True)
class DelayTiers:
    """One stage's tier topics, physical names, shortest delay first."""

    policy: RetryPolicy
    topics: tuple[str, ...]

    @classmethod
    def of(cls, policy: RetryPolicy, settings: Settings) -> DelayTiers:
        return cls(policy, tuple(settings.topic(t) for t in policy.tier_topics))

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential backoff from the first tier, capped at the last, with full jitter
        over the upper half so that a burst of failures does not return as a burst."""
        base = self.policy.tiers[0] * float(2 ** max(attempt - 1, 0))
        capped = min(base, self.policy.tiers[-1])
        if rng is None:
            return capped
        return capped / 2 + rng.random() * capped / 2

    def tier_for(self, delay_s: float) -> int:
        """The longest tier that does not overshoot ``delay_s`` (the shortest if all do)."""
        chosen = 0
        for index, tier in enumerate(self.policy.tiers):
            if tier <= delay_s:
                chosen = index
        return chosen

    def schedule(
        self,
        key: bytes | None,
        value: bytes | None,
        target: str,
        due_at_ms: int,
        attempt: int,
        now_ms: int,
        extra: tuple[tuple[str, bytes], ...] = (),
    ) -> Out:
        """The record that makes ``value`` reach ``target`` at ``due_at_ms``, with the
        ``extra`` headers (kept through every hop)."""
        index = self.tier_for(max(due_at_ms - now_ms, 0) / 1000)
        headers = (
            (TARGET, target.encode()),
            (DUE_AT, str(due_at_ms).encode()),
            (ATTEMPT, str(attempt).encode()),
            *extra,
        )
        return Out(self.topics[index], key, value, headers=headers)


class DelayRelease:
    """The decision of one tier topic: hold the head record until it is due (at most
    the tier's delay), then the record that forwards it (or places it in a tier
    again); the runtime runs it over the tier's stream, one record at a time."""

    def __init__(self, ctx: StageContext, tiers: DelayTiers, tier_index: int) -> None:
        self._clock = ctx.clock
        self._contracts = ctx.contracts
        self._tiers = tiers
        self._delay_ms = int(tiers.policy.tiers[tier_index] * 1000)
        self._malformed_topic = ctx.settings.topic("notification.malformed")

    async def release(self, raw: RawRecord) -> Out:
        """Wait until ``raw`` is due or its hold ends, then its next record."""
        target = header(raw.headers, TARGET)
        due = header(raw.headers, DUE_AT)
        if target is None or due is None:
            # Only a foreign writer puts a record here without them: keep it, with why.
            return malformed(
                self._contracts,
                self._malformed_topic,
                raw,
                "missing_delay_headers",
                f"no {TARGET}/{DUE_AT} headers on a delay tier topic",
                self._clock.now_ms(),
            )
        due_at_ms = int(due)
        # Due times are on Herald's clock; the tier's hold is on the real clock, from
        # the broker's timestamp of the record.
        until_due_s = (due_at_ms - self._clock.now_ms()) / 1000
        real_now_ms = time.time() * 1000
        until_hold_ends_s = (
            (raw.timestamp_ms or real_now_ms) + self._delay_ms - real_now_ms
        ) / 1000
        wait_s = min(until_due_s, until_hold_ends_s)
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        now = self._clock.now_ms()
        if due_at_ms > now + _EARLY_MS:  # due beyond this tier's reach: wait in a tier again
            extra = tuple((k, v) for k, v in raw.headers if k not in (TARGET, DUE_AT, ATTEMPT))
            return self._tiers.schedule(
                raw.key, raw.value, target.decode(), due_at_ms, attempt_of(raw.headers), now, extra
            )
        headers = tuple((k, v) for k, v in raw.headers if k not in (TARGET, DUE_AT))
        return Out(target.decode(), raw.key, raw.value, headers=headers)
