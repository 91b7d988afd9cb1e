"""The email channel: each route ends sent, suppressed, or dead-lettered with its history.

One route at a time per lane (bulk and priority): render (template or pre-rendered
mode), build the MIME message, hand it to the provider, classify the outcome.
A transient failure waits in the email delay tiers and comes back to the lane it
left; a permanent one, or the last allowed attempt, goes to the email DLQ.

Never twice: the delivery registry (a Faust table on herald.email.deliveries.changelog)
records every route's state. The agent writes the registry entry to the changelog
itself, together with the route's status event, and waits for Kafka's
acknowledgement before it takes the next route; so once SMTP accepted a route,
a restart, crash or rebalance can only resend it if it struck in the milliseconds
between the server's 250 and that acknowledgement. The resend then carries the
same Message-ID (derived from route_id), which receivers use to drop the copy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

from pipeline.agents.base import Clock, Out, RawRecord, malformed
from pipeline.agents.delay import DelayTiers
from pipeline.contracts import Contracts
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import Attempt, ChannelRequest, DeadLetter, StatusEvent
from pipeline.errors import DecodeError, HeraldError, RenderError, TransientError
from pipeline.providers import EmailProvider
from pipeline.providers.mime import build_message
from pipeline.rendering import RenderedMail, TemplateCatalog, one_line, variables_of
from pipeline.settings import Settings
from pipeline.topology import Catalog, Topology
from pipeline.views import SuppressionList

log = logging.getLogger(__name__)

#: Registry states after which a route is never attempted again.
DONE = frozenset({"sent", "suppressed"})
#: Rejections that say the mailbox does not exist (RFC 5321): suppress the address.
HARD_BOUNCE_CODES = frozenset({550, 551, 553})
LANES = {"bulk": "notification.email.requested", "priority": "notification.email.priority"}


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


class EmailChannel:
    """Decisions and delivery for one email route (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        contracts: Contracts,
        catalog: Catalog,
        topology: Topology,
        templates: TemplateCatalog,
        provider: EmailProvider,
        suppressions: SuppressionList,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._contracts = contracts
        self._catalog = catalog
        self._templates = templates
        self._provider = provider
        self._suppressions = suppressions
        self._clock = clock
        self._tiers = DelayTiers.of(topology.retry["email"], settings)
        self._rng = random.Random()
        self._status_topic = settings.topic("notification.status")
        self._dlq_topic = settings.topic("notification.email.dlq")
        self._malformed_topic = settings.topic("notification.malformed")
        self.registry_topic = settings.topic("herald.email.deliveries.changelog")

    async def handle(self, raw: RawRecord, registry: MutableMapping[bytes, Any]) -> list[Out]:
        """Every output for one route; ``registry`` maps route_id to its entry."""
        now = self._clock.now_ms()
        try:
            request = self._contracts.channel_request.decode(raw.value)
        except DecodeError as exc:
            return [self._malformed(raw, exc.reason, exc.detail, now)]
        if request.channel != "email":
            return [self._malformed(raw, "wrong_channel", f"channel {request.channel!r}", now)]
        key = request.route_id.encode("utf-8")
        if already_handled(registry_entry(registry.get(key)), request):
            log.info("route %s already handled; skipped", request.route_id)
            return []
        attempt = request.attempt + 1
        await self._suppressions.ready.wait()
        reason = self._suppressions.reason(request.address) if request.address else None
        if reason is not None:
            return [
                self._status(request, "suppressed", now, request.attempt, reason=reason),
                self._record(registry, raw, request, "suppressed", request.attempt, now),
            ]
        outputs: list[Out] = []
        try:
            mail = self._render(request)
            if attempt == 1:
                outputs.append(self._status(request, "rendered", now, attempt, detail=mail.locale))
            message = build_message(
                self._settings,
                route_id=request.route_id,
                notification_id=request.notification_id,
                notification_type=request.notification_type,
                to=request.address or "",
                subject=mail.subject,
                text=mail.text,
                html=mail.html,
                locale=mail.locale,
                attachments=request.attachments,
                now_ms=now,
            )
            receipt = await self._provider.send(message, request.address or "")
        except HeraldError as exc:
            return outputs + self._failed(raw, registry, request, attempt, exc)
        except Exception as exc:  # a provider bug must not lose the route: it retries
            log.exception("unexpected failure sending route %s", request.route_id)
            error = TransientError(f"{type(exc).__name__}: {exc}", reason="internal_error")
            return outputs + self._failed(raw, registry, request, attempt, error)
        now = self._clock.now_ms()
        detail = f"{receipt.code} {receipt.message}"[:500]
        outputs.append(self._status(request, "sent", now, attempt, detail=detail))
        outputs.append(
            self._record(
                registry, raw, request, "sent", attempt, now, message_id=str(message["Message-ID"])
            )
        )
        return outputs

    def _render(self, request: ChannelRequest) -> RenderedMail:
        if request.payload_mode == "rendered":
            if request.content is None:
                raise RenderError("payload_mode rendered without content")
            return RenderedMail(
                subject=one_line(request.content.subject),
                text=request.content.text,
                html=request.content.html,
                locale=request.locale,
                locale_fallback=False,
            )
        if request.payload_mode != "template":
            raise RenderError(f"unknown payload_mode {request.payload_mode!r}")
        spec = self._catalog.get(request.template_id)
        return self._templates.render_mail(
            request.template_id,
            request.locale,
            variables_of(request.variables_json),
            spec.required if spec else (),
        )

    def _failed(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        attempt: int,
        exc: HeraldError,
    ) -> list[Out]:
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
            self._status(request, "failed", now, attempt, reason=exc.reason, detail=exc.detail)
        ]
        if exc.transient and attempt < self._tiers.policy.budget:
            due = now + int(self._tiers.backoff_s(attempt, self._rng) * 1000)
            retry = dataclasses.replace(request, attempt=attempt, attempts=history, due_at_ms=due)
            value = self._contracts.channel_request.encode(retry)
            due_text = datetime.fromtimestamp(due / 1000, tz=UTC).isoformat(timespec="seconds")
            return [
                *outputs,
                self._tiers.schedule(raw.key, value, raw.topic, due, attempt, now),
                self._status(request, "retry_scheduled", now, attempt, detail=f"due {due_text}"),
                self._record(registry, raw, request, "retrying", attempt, now),
            ]
        log.warning(
            "route %s dead-lettered after %d attempt(s): %s", request.route_id, attempt, exc
        )
        final = dataclasses.replace(request, attempt=attempt, attempts=history)
        letter = DeadLetter(
            dead_letter_id=deterministic_id(
                request.route_id, "dead_letter", request.replay_of or "", attempt
            ),
            channel="email",
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
        outputs += [
            Out(
                self._dlq_topic,
                request.route_id.encode("utf-8"),
                self._contracts.dead_letter.encode(letter),
            ),
            self._status(request, "dead_lettered", now, attempt, reason=letter.reason),
            self._record(registry, raw, request, "dead_lettered", attempt, now),
        ]
        if (
            self._settings.suppress_hard_bounces
            and exc.reason == "recipient_rejected"
            and exc.code in HARD_BOUNCE_CODES
            and request.address
        ):
            outputs.append(
                self._suppressions.entry(request.address, "hard_bounce", f"smtp {exc.code}", now)
            )
        return outputs

    def _record(
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
        value = json.dumps(entry, separators=(",", ":")).encode()
        registry[key] = value
        return Out(self.registry_topic, key, value, partition=raw.partition)

    def _status(
        self,
        request: ChannelRequest,
        status: str,
        now_ms: int,
        attempt: int,
        *,
        reason: str | None = None,
        detail: str | None = None,
    ) -> Out:
        event = StatusEvent(
            event_id=deterministic_id(request.route_id, status, attempt, request.replay_of or ""),
            status=status,
            at_ms=now_ms,
            notification_id=request.notification_id,
            notification_type=request.notification_type,
            route_id=request.route_id,
            channel="email",
            user_id=request.user_id,
            attempt=attempt,
            reason=reason,
            detail=detail[:2000] if detail else None,
            request_id=request.request_id,
            trace_id=request.trace_id,
        )
        return Out(
            self._status_topic,
            request.notification_id.encode("utf-8"),
            self._contracts.status.encode(event),
        )

    def _malformed(self, raw: RawRecord, reason: str, detail: str, now_ms: int) -> Out:
        return malformed(self._contracts, self._malformed_topic, raw, reason, detail, now_ms)
