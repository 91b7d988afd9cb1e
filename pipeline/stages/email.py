"""The email channel: each route ends sent, suppressed, or dead-lettered with its history.

Per lane (bulk and priority), up to HERALD_SMTP_CONNECTIONS routes at once, one per
SMTP connection: render (template or pre-rendered mode), build the MIME message, hand
it to the provider, classify the outcome.
A transient failure waits in the email delay tiers and comes back to the lane it
left; a permanent one, or the last allowed attempt, goes to the email DLQ.

Never twice: the delivery registry (see pipeline.stages.deliveries) records every
route's state. As soon as a route is done, the agent writes its registry entry to the
changelog itself, together with the route's status event, and waits for Kafka's
acknowledgement before the route's input may be committed; so once SMTP accepted a
route, a restart, crash or rebalance can only resend it if it struck in the
milliseconds between the server's 250 and that acknowledgement. The resend then carries the
same Message-ID (derived from route_id), which receivers use to drop the copy.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from pipeline import metrics
from pipeline.contracts.records import ChannelRequest
from pipeline.errors import HeraldError, RenderError, TransientError
from pipeline.logs import route_fields
from pipeline.providers import EmailProvider
from pipeline.providers.breaker import CircuitBreaker
from pipeline.providers.mime import MailWriter
from pipeline.rendering import RenderedMail, one_line, variables_of
from pipeline.runtime.records import Out, RawRecord, Write
from pipeline.stages.context import StageContext
from pipeline.stages.deliveries import Deliveries, registry_entry
from pipeline.views import SuppressionList

log = logging.getLogger(__name__)

#: Rejections that say the mailbox does not exist (RFC 5321): suppress the address.
HARD_BOUNCE_CODES = frozenset({550, 551, 553})
LANES = {"bulk": "notification.email.requested", "priority": "notification.email.priority"}


class EmailChannel:
    """Decisions and delivery for one email route (see the module docstring)."""

    def __init__(
        self,
        ctx: StageContext,
        provider: EmailProvider,
        suppressions: SuppressionList,
        breaker: CircuitBreaker,
        write: Write,
    ) -> None:
        self._settings = ctx.settings
        self._catalog = ctx.catalog
        self._templates = ctx.templates
        self._mails = MailWriter(ctx.settings)
        self._provider = provider
        self._suppressions = suppressions
        self._breaker = breaker
        self._write = write
        #: Routes being sent right now (a second copy in the same batch waits for none).
        self._in_flight: set[str] = set()
        self._clock = ctx.clock
        self._deliveries = Deliveries(ctx, "email")
        self.registry_topic = self._deliveries.registry_topic

    async def handle(self, raw: RawRecord, registry: MutableMapping[bytes, Any]) -> list[Out]:
        """Deal with one route; ``registry`` maps route_id to its entry.

        A lane sends up to HERALD_SMTP_CONNECTIONS routes at once (a window: the next
        starts when the oldest is done), and each route's outputs (status events, the
        registry entry) are written as soon as it is done, not with its batch: the
        window in which a crash could send it twice stays one route's, not a batch's."""
        now = self._clock.now_ms()
        request = self._deliveries.accept(raw, registry, now)
        if not isinstance(request, ChannelRequest):
            return request
        if request.route_id in self._in_flight:
            log.info("email route %s is being sent; copy skipped", request.route_id)
            return []
        entry = registry_entry(registry.get(request.route_id.encode("utf-8")))
        in_doubt = entry is not None and entry.get("state") == "sending"
        self._in_flight.add(request.route_id)
        try:
            outputs = await self._deliver(raw, registry, request, now)
            if in_doubt:
                # Its SMTP transaction began (the write-ahead below) but no outcome was
                # recorded: a worker died mid-send. It goes again, with the same
                # Message-ID; the event (and its metric) lets an operator see every
                # possible duplicate (issue 18).
                doubt = self._deliveries.status(
                    request,
                    "in_doubt",
                    now,
                    request.attempt + 1,
                    detail="an earlier owner started its SMTP transaction; outcome unknown",
                )
                outputs.insert(0, doubt)
            await self._write(outputs)
        finally:
            self._in_flight.discard(request.route_id)
        return []

    async def _deliver(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        now: int,
    ) -> list[Out]:
        deliveries = self._deliveries
        attempt = request.attempt + 1
        await self._suppressions.ready.wait()
        reason = self._suppressions.reason(request.address) if request.address else None
        if reason is not None:
            return [
                deliveries.status(request, "suppressed", now, request.attempt, reason=reason),
                deliveries.record(registry, raw, request, "suppressed", request.attempt, now),
            ]
        gate = self._breaker.gate()
        if gate == "wait" or (gate == "probe" and not await self._probe()):
            wait_s = self._breaker.wait_s()
            return deliveries.deferred(raw, request, now, wait_s, "circuit_open")
        outputs: list[Out] = []
        try:
            rendered = self._render(request)
            if attempt == 1:
                outputs.append(
                    deliveries.status(request, "rendered", now, attempt, detail=rendered.locale)
                )
            message = self._mails.build(
                route_id=request.route_id,
                notification_id=request.notification_id,
                notification_type=request.notification_type,
                to=request.address or "",
                subject=rendered.subject,
                text=rendered.text,
                html=rendered.html,
                locale=rendered.locale,
                attachments=request.attachments,
                now_ms=now,
            )
            # Write-ahead: a route whose transaction starts is recorded as such, so a
            # new owner after a crash knows it is in doubt (see handle).
            await self._write([deliveries.record(registry, raw, request, "sending", attempt, now)])
            receipt = await metrics.timed(metrics.SMTP_SECONDS, self._provider.send(message))
        except HeraldError as exc:
            if exc.server_unavailable:
                self._breaker.failed()
            elif exc.code is not None:
                self._breaker.succeeded()  # the server answered, if only to refuse
            return outputs + self._failed(raw, registry, request, attempt, exc)
        except Exception as exc:  # a provider bug must not lose the route: it retries
            log.exception(
                "unexpected failure sending route %s",
                request.route_id,
                extra=route_fields(request, attempt),
            )
            error = TransientError(f"{type(exc).__name__}: {exc}", reason="internal_error")
            return outputs + self._failed(raw, registry, request, attempt, error)
        self._breaker.succeeded()
        now = self._clock.now_ms()
        detail = f"{receipt.code} {receipt.message}"[:500]
        outputs.append(deliveries.status(request, "sent", now, attempt, detail=detail))
        outputs.append(
            deliveries.record(
                registry, raw, request, "sent", attempt, now, message_id=message.message_id
            )
        )
        return outputs

    async def _probe(self) -> bool:
        """The circuit's one probe: does the server take connections again?"""
        try:
            await self._provider.probe()
        except HeraldError as exc:
            self._breaker.failed()
            log.info("%s circuit probe failed: %s", self._breaker.name, exc)
            return False
        except BaseException:
            self._breaker.failed()  # never leave the circuit half-open for good
            raise
        self._breaker.succeeded()
        return True

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
        outputs = self._deliveries.failed(raw, registry, request, attempt, exc)
        # A hard bounce is permanent, so the route above was dead-lettered.
        if (
            self._settings.suppress_hard_bounces
            and exc.reason == "recipient_rejected"
            and exc.code in HARD_BOUNCE_CODES
            and request.address
        ):
            now = self._clock.now_ms()
            outputs.append(
                self._suppressions.entry(request.address, "hard_bounce", f"smtp {exc.code}", now)
            )
        return outputs
