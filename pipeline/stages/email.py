"""The email channel: each route ends sent, suppressed, or dead-lettered with its history.

Per lane (bulk, and priority for critical mail), up to HERALD_SMTP_CONNECTIONS routes
at once, one per SMTP connection: render (template or pre-rendered mode), build the
MIME message, hand it to the provider, classify the outcome (the shared path is
pipeline.stages.channel.DirectChannel). A transient failure waits in the email delay
tiers and comes back to the lane it left; a permanent one, or the last allowed
attempt, goes to the email DLQ. A suppressed address is never mailed; a hard bounce
suppresses it.

Never twice: the delivery registry (see pipeline.stages.deliveries) records every
route's state. As soon as a route is done, the channel writes its registry entry to the
changelog itself, together with the route's status event, and waits for Kafka's
acknowledgement before the route's input may be committed; so once SMTP accepted a
route, a restart, crash or rebalance can only resend it if it struck in the
milliseconds between the server's 250 and that acknowledgement. The resend then carries the
same Message-ID (derived from route_id), which receivers use to drop the copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from pipeline.contracts.records import ChannelRequest, Recipient, UserProfile
from pipeline.errors import HeraldError, RenderError
from pipeline.providers import EmailProvider, email_provider
from pipeline.providers.breaker import CircuitBreaker
from pipeline.providers.mime import Mail, MailWriter
from pipeline.rendering import RenderedMail, one_line, variables_of
from pipeline.runtime.records import Out, Write
from pipeline.stages.channel import Address, Prepared, Sent
from pipeline.stages.context import StageContext
from pipeline.topology import TypeSpec
from pipeline.views import SuppressionList

log = logging.getLogger(__name__)

#: Rejections that say the mailbox does not exist (RFC 5321): suppress the address.
HARD_BOUNCE_CODES = frozenset({550, 551, 553})


class EmailRouting:
    """The email channel to the route stage: a user's address is their profile's."""

    name = "email"

    def address(self, profile: UserProfile, spec: TypeSpec) -> Address | str:
        return Address(profile.email) if profile.email else "no_email_address"

    def deadline_ms(self, recipient: Recipient, spec: TypeSpec) -> int:
        return 0


class EmailKind:
    """The email channel's parts, for the worker: one suppression list and one circuit
    (the lanes talk to the same server), and a transport per lane, each with its own
    connections, so login codes never wait behind bulk mail."""

    def __init__(self, ctx: StageContext) -> None:
        self._ctx = ctx
        self.suppressions = SuppressionList(ctx.settings)
        self._breaker = CircuitBreaker.smtp(ctx.settings)
        #: Routes a lane sends at once: one per SMTP connection (docs/email.md).
        self.window = ctx.settings.smtp_connections

    def transport(self, write: Write) -> EmailTransport:
        provider = email_provider(self._ctx.settings)
        return EmailTransport(self._ctx, provider, self.suppressions, self._breaker)

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [self.suppressions.run]


class EmailTransport:
    """Renders a route into a MIME mail and hands it to the SMTP provider."""

    def __init__(
        self,
        ctx: StageContext,
        provider: EmailProvider,
        suppressions: SuppressionList,
        breaker: CircuitBreaker,
    ) -> None:
        self._settings = ctx.settings
        self._catalog = ctx.catalog
        self._templates_for = ctx.templates_for
        self._mails = MailWriter(ctx.settings)
        self._provider = provider
        self._suppressions = suppressions
        self.breaker: CircuitBreaker | None = breaker

    async def ready(self) -> None:
        await self._suppressions.ready.wait()

    def blocked(self, request: ChannelRequest) -> str | None:
        return self._suppressions.reason(request.address) if request.address else None

    def prepare(self, request: ChannelRequest, now_ms: int) -> Prepared[Mail]:
        rendered = self._render(request)
        mail = self._mails.build(
            route_id=request.route_id,
            notification_id=request.notification_id,
            notification_type=request.notification_type,
            to=request.address or "",
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            locale=rendered.locale,
            attachments=request.attachments,
            now_ms=now_ms,
        )
        return Prepared(mail, rendered.locale)

    async def send(self, message: Mail) -> Sent:
        receipt = await self._provider.send(message)
        return Sent(f"{receipt.code} {receipt.message}", (("message_id", message.message_id),))

    async def probe(self) -> None:
        await self._provider.probe()

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
        return self._templates_for(request.template_id, request.template_version).render_mail(
            request.template_id,
            request.locale,
            variables_of(request.variables_json),
            spec.required if spec else (),
        )

    def after_failure(self, request: ChannelRequest, exc: HeraldError, now_ms: int) -> list[Out]:
        # A hard bounce is permanent, so the route was dead-lettered: suppress the address.
        if (
            self._settings.suppress_hard_bounces
            and exc.reason == "recipient_rejected"
            and exc.code in HARD_BOUNCE_CODES
            and request.address
        ):
            return [
                self._suppressions.entry(request.address, "hard_bounce", f"smtp {exc.code}", now_ms)
            ]
        return []
