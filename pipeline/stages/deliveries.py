"""What every channel shares: the per-route delivery registry, status
events, and the path of a failed attempt (a wait in the channel's delay tiers, or the
channel's DLQ with the route's whole history).

The registry (a Faust table on ``herald.<channel>.deliveries.changelog``) maps
route_id to the route's state. A channel writes each entry's changelog record itself,
in the same acknowledged write as the route's status event, so a restarted or
rebalanced worker knows what was already delivered and does not deliver it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import Attempt, ChannelRequest, DeadLetter, StatusEvent
from pipeline.errors import DecodeError, HeraldError, InDoubtError
from pipeline.logs import route_fields
from pipeline.runtime.records import Out, RawRecord
from pipeline.runtime.tables import encode_json
from pipeline.stages.context import StageContext
from pipeline.stages.delay import DelayTiers
from pipeline.stages.outputs import malformed, status_out

log = logging.getLogger(__name__)

#: The header of a record on notification.recipients.rejoin that is a route which ended
#: without reaching its user: the route stage tries the type's next channel.
FALLBACK = "herald-fallback"
#: Registry states after which a route is never attempted again.
DONE = frozenset({"sent", "suppressed", "published", "expired", "cancelled"})
#: The events that name the template version a route rendered.
RENDERED = frozenset({"rendered", "sent", "published"})


def registry_entry(value: bytes | None) -> dict[str, Any] | None:
    """A delivery registry value, decoded (None when absent or unreadable)."""
    if value is None:
        return None
    try:
        entry = json.loads(value)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def already_handled(entry: dict[str, Any] | None, request: ChannelRequest) -> bool:
    """Whether the registry shows this route (this copy of it) was dealt with."""
    if entry is None:
        return False
    if entry.get("state") in DONE:
        return True
    if entry.get("state") in ("publishing", "sending"):
        return False  # in doubt: the channel decides (stages.push, stages.email)
    if entry.get("replay_of") != request.replay_of:
        return False  # a replay starts a fresh chain of attempts
    # Dead-lettered, or a later attempt already made: this is a stale copy.
    return entry.get("state") == "dead_lettered" or int(entry.get("attempts", 0)) > request.attempt


def expired_entries(
    registry: MutableMapping[bytes, Any], registry_topic: str, window_ms: int, now_ms: int
) -> list[Out]:
    """Tombstones for registry entries older than ``window_ms``; drops them locally."""
    tombstones = []
    for key, value in list(registry.items()):
        entry = registry_entry(value)
        if entry is None or now_ms - int(entry.get("at", 0)) >= window_ms:
            partition = int(entry.get("p", 0)) if entry else None
            tombstones.append(Out(registry_topic, key, None, partition=partition))
            del registry[key]
    return tombstones


class Deliveries:
    """One channel's records about its routes: decoding them, registry entries, status
    events, retries and dead letters."""

    def __init__(self, ctx: StageContext, channel: str) -> None:
        settings = ctx.settings
        self.channel = channel
        self._contracts = ctx.contracts
        self._clock = ctx.clock
        self.tiers = DelayTiers.of(ctx.topology.retry[channel], settings)
        self._rng = random.Random()
        self._status_topic = settings.topic("notification.status")
        spec = ctx.topology.channel(channel)
        self._dlq_topic = settings.topic(spec.dlq)
        self._max_letter_bytes = settings.dead_letter_max_bytes
        self._malformed_topic = settings.topic("notification.malformed")
        self._rejoin_topic = settings.topic("notification.recipients.rejoin")
        self._catalog = ctx.catalog
        self._cancellations = ctx.cancellations
        self._template_version = ctx.template_version
        self.registry_topic = settings.topic(spec.registry)

    def accept(
        self, raw: RawRecord, registry: MutableMapping[bytes, Any], now_ms: int
    ) -> ChannelRequest | list[Out]:
        """The route in ``raw`` if it is due for an attempt; else the outputs that
        settle it (malformed record, ``cancelled``) or none (already handled)."""
        try:
            request = self._contracts.channel_request.decode(raw.value)
        except DecodeError as exc:
            return [self.malformed(raw, exc.reason, exc.detail, now_ms)]
        if request.channel != self.channel:
            return [self.malformed(raw, "wrong_channel", f"channel {request.channel!r}", now_ms)]
        if already_handled(registry_entry(registry.get(request.route_id.encode("utf-8"))), request):
            log.info(
                "%s route %s already handled; skipped",
                self.channel,
                request.route_id,
                extra=route_fields(request),
            )
            return []
        if (by := self._cancellations.reason(request.notification_id)) is not None:
            return [
                self.status(request, "cancelled", now_ms, request.attempt, detail=f"by {by}"),
                self.record(registry, raw, request, "cancelled", request.attempt, now_ms),
            ]
        return request

    def failed(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        attempt: int,
        exc: HeraldError,
        doubt_since: int | None = None,
    ) -> list[Out]:
        """A failed attempt: retry in the delay tiers while the error is transient and the
        budget allows, else dead-letter the route with its history. ``doubt_since``
        (wall-clock ms): the attempt may have delivered after all (a timeout), so the
        retry checks first (see agents.push)."""
        now = self._clock.now_ms()
        history = [
            *request.attempts,
            Attempt(
                number=attempt,
                at_ms=now,
                outcome="transient" if exc.transient else "permanent",
                reason=exc.reason,
                code=exc.code,
                message=exc.detail[:500],
            ),
        ]
        outputs = [
            self.status(
                request,
                "failed",
                now,
                attempt,
                reason=exc.reason,
                detail=exc.detail,
                error_class="transient" if exc.transient else "permanent",
            )
        ]
        if exc.transient and attempt < self.tiers.policy.budget:
            wait_s = max(self.tiers.backoff_s(attempt, self._rng), exc.retry_after_s or 0.0)
            due = now + int(wait_s * 1000)
            retry = dataclasses.replace(request, attempt=attempt, attempts=history, due_at_ms=due)
            value = self._contracts.channel_request.encode(retry)
            due_text = datetime.fromtimestamp(due / 1000, tz=UTC).isoformat(timespec="seconds")
            log.info(
                "%s route %s attempt %d failed (%s: %s); retry due %s",
                self.channel,
                request.route_id,
                attempt,
                exc.reason,
                exc.detail[:200],
                due_text,
                extra=route_fields(request, attempt),
            )
            return [
                *outputs,
                self.tiers.schedule(raw.key, value, raw.topic, due, attempt, now),
                self.status(request, "retry_scheduled", now, attempt, detail=f"due {due_text}"),
                self.record(
                    registry,
                    raw,
                    request,
                    "retrying",
                    attempt,
                    now,
                    **({} if doubt_since is None else {"doubt": str(doubt_since)}),
                ),
            ]
        log.warning(
            "%s route %s dead-lettered after %d attempt(s): %s",
            self.channel,
            request.route_id,
            attempt,
            exc,
            extra=route_fields(request, attempt),
        )
        final = dataclasses.replace(request, attempt=attempt, attempts=history)
        letter = DeadLetter(
            dead_letter_id=deterministic_id(
                request.route_id, "dead_letter", request.replay_of or "", attempt
            ),
            channel=self.channel,
            route_id=request.route_id,
            notification_id=request.notification_id,
            notification_type=request.notification_type,
            user_id=request.user_id,
            address=request.address,
            reason="budget_exhausted" if exc.transient else "permanent_failure",
            error_class="transient" if exc.transient else "permanent",
            last_reason=exc.reason,
            last_code=exc.code,
            last_error=exc.detail[:2000],
            attempts=history,
            dead_lettered_at_ms=now,
            origin_topic=raw.topic,
            request=self._contracts.channel_request.encode(final),
        )
        # A route held in doubt says so: the operator's listing of held routes
        # (status dead_lettered, reason in_doubt) finds it.
        held = isinstance(exc, InDoubtError)
        return [
            *outputs,
            Out(self._dlq_topic, request.route_id.encode("utf-8"), self._fit(letter, final)),
            self.status(
                request, "dead_lettered", now, attempt, reason="in_doubt" if held else letter.reason
            ),
            self.record(registry, raw, request, "dead_lettered", attempt, now),
            # A route held in doubt may have reached the user: no fallback for it.
            *(self.fallback(raw, request, "dead_lettered") if not held else []),
        ]

    def fallback(self, raw: RawRecord, request: ChannelRequest, status: str) -> list[Out]:
        """The record that makes the route stage try the next channel of the route's
        type, when the type falls back after ``status`` (the route's end); else none."""
        spec = self._catalog.get(request.notification_type)
        if spec is None or status not in spec.fallback_when:
            return []
        if not spec.next_channels(request.channel) or request.user_id is None:
            return []
        return [
            Out(
                self._rejoin_topic,
                request.user_id.encode("utf-8"),
                self._contracts.channel_request.encode(request),
                partition=raw.partition,  # the user's (the users group is copartitioned)
                headers=((FALLBACK, request.channel.encode()),),
            )
        ]

    def _fit(self, letter: DeadLetter, final: ChannelRequest) -> bytes:
        """The encoded dead letter, within ``dead_letter_max_bytes``: a route whose mail
        is near the 1 MB limit (attachments) could not be dead-lettered whole, and would
        then never reach a final state. The history is kept; what is cut, biggest
        first (attachment data, then the rendered texts and the variables, capped), is
        named in ``truncated``."""
        encode = self._contracts.dead_letter.encode
        value = encode(letter)
        if len(value) <= self._max_letter_bytes:
            return value
        cut: list[str] = []
        if final.attachments:
            size = sum(len(a.data) for a in final.attachments)
            final = dataclasses.replace(
                final, attachments=[dataclasses.replace(a, data=b"") for a in final.attachments]
            )
            cut.append(f"the data of {len(final.attachments)} attachment(s) ({size} bytes)")
        # What is left to cut is text: split what the letter may still take between
        # the texts, so that the cut is the same on every run (deterministic ids, the
        # same dead letter each time).
        share = max(self._max_letter_bytes // 8, 1024)
        content = final.content
        if content is not None:
            capped = dataclasses.replace(
                content,
                text=_capped(content.text, share),
                html=None if content.html is None else _capped(content.html, share),
            )
            if capped != content:
                final = dataclasses.replace(final, content=capped)
                cut.append(f"the rendered texts, each to {share} characters")
        if len(final.variables_json) > share:
            cut.append(f"the variables ({len(final.variables_json)} characters)")
            final = dataclasses.replace(final, variables_json="{}")
        letter = dataclasses.replace(
            letter,
            address=None if letter.address is None else _capped(letter.address, 320),
            request=self._contracts.channel_request.encode(final),
            truncated="; ".join(cut) or "nothing that could be cut",
        )
        return encode(letter)

    def deferred(
        self, raw: RawRecord, request: ChannelRequest, now_ms: int, wait_s: float, reason: str
    ) -> list[Out]:
        """The route waits in the delay tiers without an attempt being spent (its server
        is known to be down): back on its lane after ``wait_s`` (at least the shortest
        tier), spread by up to 10 % so the waiting routes do not return all at once."""
        wait_s = max(wait_s, self.tiers.policy.tiers[0])
        due = now_ms + int(wait_s * (1 + 0.1 * self._rng.random()) * 1000)
        again = dataclasses.replace(request, due_at_ms=due)
        due_text = datetime.fromtimestamp(due / 1000, tz=UTC).isoformat(timespec="seconds")
        return [
            self.tiers.schedule(
                raw.key,
                self._contracts.channel_request.encode(again),
                raw.topic,
                due,
                request.attempt,
                now_ms,
            ),
            self.status(
                request,
                "deferred",
                now_ms,
                request.attempt,
                reason=reason,
                detail=f"due {due_text}",
                repeat=due,
            ),
        ]

    def record(
        self,
        registry: MutableMapping[bytes, Any],
        raw: RawRecord,
        request: ChannelRequest,
        state: str,
        attempts: int,
        now_ms: int,
        **extra: str,
    ) -> Out:
        """The registry entry: set in the local view, and the changelog record that makes
        it durable (on the route's own partition, so whoever owns it recovers it)."""
        entry = {
            "state": state,
            "attempts": attempts,
            "at": now_ms,
            "p": raw.partition,
            "replay_of": request.replay_of,
            **extra,
        }
        key = request.route_id.encode("utf-8")
        value = encode_json(entry)
        registry[key] = value
        return Out(self.registry_topic, key, value, partition=raw.partition)

    def status(
        self,
        request: ChannelRequest,
        status: str,
        now_ms: int,
        attempt: int,
        *,
        reason: str | None = None,
        detail: str | None = None,
        error_class: str = "",
        repeat: int | None = None,
    ) -> Out:
        """A status event about ``request`` (deterministic id: a repeat is recognisable;
        ``repeat`` tells apart events that may happen more than once per attempt)."""
        parts: tuple[object, ...] = () if repeat is None else (repeat,)
        event = StatusEvent.of_route(
            request,
            status,
            now_ms,
            event_id=deterministic_id(
                request.route_id, status, attempt, request.replay_of or "", *parts
            ),
            attempt=attempt,
            reason=reason,
            detail=detail,
            # What reached the user, for a resend of the same (docs/channels.md).
            template_version=(self._template_version(request) if status in RENDERED else None),
        )
        latency_s = None
        if status in ("sent", "published") and request.produced_at_ms:
            latency_s = (now_ms - request.produced_at_ms) / 1000
        return status_out(
            self._contracts,
            self._status_topic,
            event,
            error_class=error_class,
            latency_s=latency_s,
        )

    def malformed(self, raw: RawRecord, reason: str, detail: str, now_ms: int) -> Out:
        """A record for the malformed topic about an unusable input."""
        return malformed(self._contracts, self._malformed_topic, raw, reason, detail, now_ms)


def _capped(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    return text if len(text) <= limit else text[: limit - 20] + " [... cut for the DLQ]"
