"""Dead letters for operators: find them, read their history, replay them at a rate.

A replay sends the dead-lettered route back to the lane it left
(``DeadLetter.origin_topic``) with a fresh budget (attempt 0, no history) and
``replay_of`` set to the dead letter's id; the channel's delivery registry treats it
as a new chain of attempts, and a route that was meanwhile delivered stays delivered.

Each replay is recorded in the compacted ``herald.dlq.replays`` topic after the route
is acknowledged, and a letter found there is not replayed again, so re-running the same
command (after a crash, or by a second operator) does nothing twice. A crash between
the two writes can replay a letter once more; the registry then drops the copy.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.contracts import Contracts
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import DeadLetter, Malformed, StatusEvent
from pipeline.errors import ConfigurationError, DecodeError
from pipeline.ops.reader import read_topic
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.times import UNIT_S
from pipeline.topology import Topology

REPLAYS_TOPIC = "herald.dlq.replays"
#: Where undecodable or invalid input is kept (logical names).
MALFORMED_TOPICS = {"intents": "notification.intents.malformed", "other": "notification.malformed"}


def parse_rate(text: str) -> float:
    """Records per second from ``50/s``, ``300/m`` or ``50``."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?\s*$", text)
    if not match or float(match[1]) <= 0:
        raise ConfigurationError(f"not a rate (50/s, 300/m): {text!r}")
    return float(match[1]) / UNIT_S[match[2] or "s"]


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """Which dead letters an operator means; every field left None matches all."""

    channel: str | None = None
    """A channel topics.yaml declares (email, push, webhook, ...)."""
    notification_type: str | None = None
    """Catalog type."""
    error_class: str | None = None
    """transient or permanent (the last attempt's class)."""
    reason: str | None = None
    """The last attempt's reason (smtp_deferred, gateway_topic_missing, ...)."""
    since_ms: int | None = None
    """Dead-lettered at or after this moment."""
    until_ms: int | None = None
    """Dead-lettered before this moment."""
    ids: frozenset[str] = frozenset()
    """Only these dead_letter_ids or route_ids (empty: any)."""

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` is selected."""
        return (
            (self.channel is None or letter.channel == self.channel)
            and (
                self.notification_type is None or letter.notification_type == self.notification_type
            )
            and (self.error_class is None or letter.error_class == self.error_class)
            and (self.reason is None or letter.last_reason == self.reason)
            and (self.since_ms is None or letter.dead_lettered_at_ms >= self.since_ms)
            and (self.until_ms is None or letter.dead_lettered_at_ms < self.until_ms)
            and (not self.ids or bool({letter.dead_letter_id, letter.route_id} & self.ids))
        )


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record on a DLQ topic that does not decode as a dead letter (written by another
    tool, or with a schema this deployment does not know)."""

    topic: str
    partition: int
    offset: int
    error: DecodeError
    """Why it does not decode."""

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}: {self.error}"


def read_letters(
    settings: Settings,
    contracts: Contracts,
    selected: LetterFilter,
    on_unreadable: Callable[[Unreadable], None] | None = None,
) -> list[DeadLetter]:
    """Every dead letter that ``selected`` matches, oldest first, each once.

    A record that is not a readable dead letter is passed to ``on_unreadable`` and the
    rest are still read (an operator must see the letters around it); without a
    callback it raises its DecodeError."""
    declared = Topology.load(settings).channels
    channels = [selected.channel] if selected.channel else list(declared)
    letters: dict[str, DeadLetter] = {}
    for channel in channels:
        if channel not in declared:
            raise ConfigurationError(f"unknown channel {channel!r} (one of {', '.join(declared)})")
        topic = settings.topic(declared[channel].dlq)
        for partition, offset, _, _, value in read_topic(settings, topic):
            try:
                letter = contracts.dead_letter.decode(value)
            except DecodeError as exc:
                if on_unreadable is None:
                    raise
                on_unreadable(Unreadable(topic, partition, offset, exc))
                continue
            if selected.matches(letter):
                letters[letter.dead_letter_id] = letter
    return sorted(letters.values(), key=lambda letter: letter.dead_lettered_at_ms)


def replayed(settings: Settings) -> dict[str, dict[str, Any]]:
    """dead_letter_id -> what the replay log says about its replay."""
    log: dict[str, dict[str, Any]] = {}
    for *_, key, value in read_topic(settings, settings.topic(REPLAYS_TOPIC)):
        if key is None:
            continue
        if value is None:
            log.pop(key.decode(), None)
            continue
        try:
            log[key.decode()] = json.loads(value)
        except ValueError:
            continue
    return log


class RateLimiter:
    """Spaces calls to at most ``per_second``, without bursts beyond one."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / per_second
        self._clock = clock
        self._next = clock()

    def wait(self) -> None:
        """Return when the next call is allowed."""
        now = self._clock()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(self._next, now) + self._interval


@dataclass(slots=True)
class ReplayReport:
    """What one replay run did."""

    replayed: list[DeadLetter] = field(default_factory=list)
    """Sent back to their lanes (or, on a dry run, would have been)."""
    already: list[DeadLetter] = field(default_factory=list)
    """Skipped: the replay log shows an earlier replay."""
    truncated: list[DeadLetter] = field(default_factory=list)
    """Skipped: cut to fit the DLQ (``DeadLetter.truncated``); a replay would send what
    remains, e.g. a mail without its attachments. The producer sends it again."""


def replay(
    settings: Settings,
    contracts: Contracts,
    letters: Iterable[DeadLetter],
    *,
    per_second: float,
    dry_run: bool = False,
    operator: str = "herald dlq replay",
    on_progress: Callable[[DeadLetter], None] = lambda letter: None,
) -> ReplayReport:
    """Replay ``letters`` at most ``per_second`` (see the module docstring)."""
    report = ReplayReport()
    done = replayed(settings)
    todo: list[DeadLetter] = []
    for letter in letters:
        if letter.dead_letter_id in done:
            report.already.append(letter)
        elif letter.truncated:
            report.truncated.append(letter)
        else:
            todo.append(letter)
    if dry_run:
        report.replayed = todo
        return report
    limiter = RateLimiter(per_second)
    # Write in chunks of about a second's worth: the routes, acknowledged, then their
    # replay records, so that no letter is logged as replayed before its route exists.
    chunk_size = max(1, int(per_second))
    with HeraldProducer(settings, contracts) as producer:
        for chunk in _chunks(todo, chunk_size):
            for letter in chunk:
                limiter.wait()
                _send_back(settings, contracts, producer, letter, operator)
                on_progress(letter)
            producer.flush()
            for letter in chunk:
                entry = {
                    "route_id": letter.route_id,
                    "channel": letter.channel,
                    "to": letter.origin_topic,
                    "at_ms": int(time.time() * 1000),
                    "by": operator,
                }
                producer.write(
                    settings.topic(REPLAYS_TOPIC),
                    letter.dead_letter_id.encode(),
                    json.dumps(entry).encode(),
                    wait=False,
                )
            producer.flush()
            report.replayed.extend(chunk)
    return report


def _chunks(items: list[DeadLetter], size: int) -> Iterator[list[DeadLetter]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _send_back(
    settings: Settings,
    contracts: Contracts,
    producer: HeraldProducer,
    letter: DeadLetter,
    operator: str,
) -> None:
    request = contracts.channel_request.decode(letter.request)
    fresh = dataclasses.replace(
        request, attempt=0, attempts=[], due_at_ms=0, replay_of=letter.dead_letter_id
    )
    producer.write(
        letter.origin_topic,
        fresh.record_key(),
        contracts.channel_request.encode(fresh),
        wait=False,
    )
    event = StatusEvent.of_route(
        request,
        "replayed",
        int(time.time() * 1000),
        event_id=deterministic_id(request.route_id, "replayed", letter.dead_letter_id),
        reason=letter.last_reason,
        detail=f"dead letter {letter.dead_letter_id} replayed by {operator}",
    )
    producer.write(
        settings.topic("notification.status"),
        request.notification_id.encode(),
        contracts.status.encode(event),
        wait=False,
    )


def letter_summary(letter: DeadLetter, replay_entry: dict[str, Any] | None) -> str:
    """One line about a dead letter, for listings."""
    at = datetime.fromtimestamp(letter.dead_lettered_at_ms / 1000, tz=UTC)
    code = f" {letter.last_code}" if letter.last_code else ""
    replayed_note = "  [replayed]" if replay_entry else ""
    return (
        f"{at.isoformat(timespec='seconds')}  {letter.channel:5} {letter.notification_type:28} "
        f"{letter.dead_letter_id}  {letter.reason}: {letter.last_reason}{code} "
        f"after {len(letter.attempts)} attempt(s)  to {letter.user_id or letter.address}"
        f"{replayed_note}"
    )


def letter_detail(contracts: Contracts, letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as JSON-friendly data: its history and the route it carries."""
    data = letter.to_avro()
    request = contracts.channel_request.decode(letter.request).to_avro()
    data["request"] = request
    return data


def read_malformed(
    settings: Settings, contracts: Contracts, which: Iterable[str], since_ms: int | None
) -> list[Malformed]:
    """Malformed records of the given kinds (intents, other), oldest first."""
    found: list[Malformed] = []
    for kind in which:
        for *_, value in read_topic(settings, settings.topic(MALFORMED_TOPICS[kind])):
            record = contracts.malformed.decode(value)
            if since_ms is None or record.recorded_at_ms >= since_ms:
                found.append(record)
    return sorted(found, key=lambda record: record.recorded_at_ms)


def origin_of(record: Malformed) -> str:
    """``topic[partition]@offset``: where a malformed record was read."""
    return f"{record.origin_topic}[{record.origin_partition}]@{record.origin_offset}"
