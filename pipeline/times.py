"""Herald's clock, and times as operators type them: ISO-8601 moments or ages
(``30m``, ``2h``, ``7d``)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from pipeline.errors import ConfigurationError

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
#: Seconds per unit of an age or a rate.
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now_ms: int) -> int:
    """Epoch ms from an ISO-8601 time (UTC unless it says otherwise) or an age such as
    ``30m``, ``2h`` or ``7d`` (that long before ``now_ms``)."""
    if match := _AGE.match(text.strip()):
        return now_ms - int(float(match[1]) * UNIT_S[match[2]] * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConfigurationError(f"not a time or an age (30m, 2h, 7d): {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class Clock:
    """Herald's notion of now: wall-clock time, optionally shifted (tests and drills).

    Only decisions use it (quiet hours, TTLs, due times, windows); how long a delay
    tier holds a record is measured on the real clock against broker timestamps.
    """

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        """Epoch milliseconds, shifted by the offset."""
        return int(time.time() * 1000) + self.offset_ms
