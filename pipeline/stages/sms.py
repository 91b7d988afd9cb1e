"""The SMS channel: each route is one text to the user's phone.

The number is the user's ``contacts["sms"]``, checked and written in E.164 when the
profile arrives (a profile with a number that is not one is refused, like one with an
invalid mailbox: pipeline.stages.users) and again when routed. The text comes from
``templates/<type>/<locale>/sms.j2`` and is counted in segments
(pipeline.providers.sms): a text longer than the type's ``sms_max_segments`` (3 by
default) is not sent but dead-lettered (``sms_too_long``, permanent), since providers
bill per segment and a cut text could lose what matters. The provider is Twilio's API
(or a service speaking it) or the stub (HERALD_SMS_PROVIDER); one circuit breaker
guards it, as for SMTP.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from pipeline.contracts.records import ChannelRequest, Recipient, UserProfile
from pipeline.errors import ConfigurationError, InvalidAddressError, RenderError
from pipeline.providers.breaker import CircuitBreaker
from pipeline.providers.sms import SmsProvider, Unconfigured, e164, sms_provider, sms_size
from pipeline.runtime.records import Write
from pipeline.stages.channel import Address, PlainTransport, Prepared, Sent, templated_types
from pipeline.stages.context import StageContext
from pipeline.topology import TypeSpec
from pipeline.values import value_class

NAME = "sms"


class SmsRouting:
    """The SMS channel to the route stage: the user's phone number."""

    name = NAME

    def address(self, profile: UserProfile, spec: TypeSpec) -> Address | str:
        number = profile.contacts.get(NAME)
        if not number:
            return "no_phone_number"
        try:
            return Address(e164(number))
        except InvalidAddressError:
            return "invalid_phone_number"

    def deadline_ms(self, recipient: Recipient, spec: TypeSpec) -> int:
        return 0


@value_class
class Text:
    """One SMS."""

    to: str
    """The number, E.164."""
    text: str
    """The message."""
    message_id: str
    """Herald's id of it (the route_id)."""


class SmsTransport(PlainTransport):
    """Renders a route's sms.j2, checks its length, hands it to the provider."""

    def __init__(self, ctx: StageContext, provider: SmsProvider, breaker: CircuitBreaker) -> None:
        super().__init__(ctx)
        self._provider = provider
        self.breaker = breaker

    def prepare(self, request: ChannelRequest, now_ms: int) -> Prepared[Text]:
        spec = self._catalog.get(request.template_id)
        text, locale = self.render(request, NAME)
        if not text:
            raise RenderError("the sms template rendered nothing")
        size = sms_size(text)
        limit = spec.sms_max_segments if spec else 1
        if size.segments > limit:
            raise RenderError(
                f"the text takes {size.segments} {size.encoding} segments; the type allows {limit}",
                reason="sms_too_long",
            )
        return Prepared(Text(request.address or "", text, request.route_id), locale)

    async def send(self, message: Text) -> Sent:
        receipt = await self._provider.send(message.to, message.text, message.message_id)
        return Sent(
            f"{receipt.status} {receipt.provider_id}", (("provider_id", receipt.provider_id),)
        )

    # probe: an HTTP API has no connection to test; the next route is the probe.


class SmsKind:
    """The SMS channel's parts, for the worker: one provider and one circuit."""

    def __init__(self, ctx: StageContext) -> None:
        self._ctx = ctx
        users = templated_types(ctx, NAME)
        for spec in users:
            if spec.sms_max_segments < 1:
                raise ConfigurationError(f"type {spec.name!r}: sms_max_segments must be >= 1")
        settings = ctx.settings
        # Built now, so that a missing credential stops the start-up, not a delivery; a
        # worker whose catalog sends no SMS starts without one (a route replayed to it
        # then dead-letters with the reason).
        try:
            self._provider: SmsProvider = sms_provider(settings)
        except ConfigurationError as exc:
            if users:
                raise
            self._provider = Unconfigured(exc.detail)
        self._breaker = CircuitBreaker(
            "sms",
            settings.smtp_breaker_threshold,
            settings.smtp_breaker_cooldown_s,
            settings.smtp_breaker_max_cooldown_s,
        )
        self.window = settings.sms_connections

    def transport(self, write: Write) -> SmsTransport:
        return SmsTransport(self._ctx, self._provider, self._breaker)

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return []
