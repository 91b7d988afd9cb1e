"""What a channel is to the rest of Herald, and the delivery path of the channels that
hand each route to an outside provider (email, webhook, Slack, SMS).

A channel is one module of pipeline/stages/ with:

- a :class:`ChannelRouting`: what the route stage asks of it (the recipient's address for a
  user, or why there is none) and, for a direct channel, its :class:`Transport`;
- its topics and retry tiers, declared in topologies/topics.yaml (``channels:``);
- its entry in pipeline/stages/channels.py.

Everything else works for it without a special case: the route stage, delay tiers,
budgets, dead letters, the never-twice registry, metrics, the operator API and
``herald dlq`` (docs/channels.md).

:class:`DirectChannel` is the shared path of a direct channel's route: accept it (the
registry says it is not done), ask the transport whether it is blocked (a suppressed
address, a disabled endpoint), render it, write ``sending`` ahead (and wait for it),
call the provider, then record ``sent``, or the failure (a retry in the delay tiers or
a dead letter). A route its previous owner left ``sending`` is in doubt: an
``in_doubt`` event says so, so an operator can see every possible duplicate, and it
goes again, or, when its type says ``in_doubt: hold``, to the DLQ (reason
``in_doubt``) for an operator to replay or not.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any, Generic, Protocol, TypeVar

from pipeline import metrics
from pipeline.contracts.records import ChannelRequest, Recipient, UserProfile
from pipeline.errors import ConfigurationError, HeraldError, InDoubtError, TransientError
from pipeline.logs import route_fields
from pipeline.providers.breaker import CircuitBreaker
from pipeline.rendering import DEFAULT_LOCALE, variables_of
from pipeline.runtime.records import Out, RawRecord, Write
from pipeline.stages.context import StageContext
from pipeline.stages.deliveries import Deliveries, registry_entry
from pipeline.throttle import SharedRate
from pipeline.topology import TypeSpec
from pipeline.topology.model import PRIORITIES
from pipeline.values import value_class

log = logging.getLogger(__name__)

M = TypeVar("M")


@value_class
class Address:
    """Where a user's route of one channel goes."""

    address: str | None = None
    """The mailbox, phone number or URL (None for channels that need none)."""
    tokens: tuple[str, ...] = ()
    """Push device tokens."""


class ChannelRouting(Protocol):
    """What the route stage needs from a channel."""

    name: str
    """The channel's name, as topics.yaml and the catalog spell it."""

    def address(self, profile: UserProfile, spec: TypeSpec) -> Address | str:
        """Where ``profile``'s route of type ``spec`` goes, or why it cannot go (the
        ``skipped`` event's reason, e.g. ``no_email_address``)."""
        ...

    def deadline_ms(self, recipient: Recipient, spec: TypeSpec) -> int:
        """When a route is no longer worth delivering (epoch ms; 0: never)."""
        ...


@value_class
class Prepared(Generic[M]):
    """A route's message, rendered and ready for its provider."""

    message: M
    """What the provider sends (a MIME mail, a JSON body, an SMS text)."""
    locale: str
    """The locale it was rendered in (the ``rendered`` event's detail)."""


@value_class
class Sent:
    """A provider's acceptance of one message."""

    detail: str
    """The provider's answer (the ``sent`` event's detail)."""
    entry: tuple[tuple[str, str], ...] = ()
    """Extra fields of the route's ``sent`` registry entry (e.g. the Message-ID)."""


class Transport(Protocol[M]):
    """A direct channel's provider side: render, send, and what follows a failure."""

    breaker: CircuitBreaker | None
    """The provider's circuit, when one server takes every route (SMTP, an SMS API)."""

    async def ready(self) -> None:
        """Wait until the transport can decide (its followed views are read)."""
        ...

    def blocked(self, request: ChannelRequest) -> str | None:
        """Why ``request`` must not be sent at all (its address is suppressed): it ends
        ``suppressed`` with this reason."""
        ...

    def prepare(self, request: ChannelRequest, now_ms: int) -> Prepared[M]:
        """The message; a permanent HeraldError when it cannot be rendered."""
        ...

    async def send(self, message: M) -> Sent:
        """Hand ``message`` to the provider; a classified HeraldError otherwise."""
        ...

    async def probe(self) -> None:
        """Check that the provider takes connections (the circuit's probe)."""
        ...

    def after_failure(self, request: ChannelRequest, exc: HeraldError, now_ms: int) -> list[Out]:
        """Records a failure calls for besides the retry or dead letter (a hard
        bounce's suppression, a gone endpoint's disabling)."""
        ...


def templated_types(ctx: StageContext, channel: str) -> list[TypeSpec]:
    """The types on ``channel`` (whose template part is named like it: slack, sms);
    ConfigurationError, at start-up, for one without its ``en`` template."""
    types = ctx.catalog.using(channel)
    for spec in types:
        if not ctx.templates.has(spec.name, DEFAULT_LOCALE, channel):
            raise ConfigurationError(
                f"type {spec.name!r} uses {channel} but has no {DEFAULT_LOCALE}/{channel}.j2"
            )
    return types


class PlainTransport:
    """What most transports share: a template rendering of the route, and nothing to
    wait for, block, probe or add after a failure (override what differs)."""

    breaker: CircuitBreaker | None = None

    def __init__(self, ctx: StageContext) -> None:
        self._catalog = ctx.catalog
        self._templates_for = ctx.templates_for

    async def ready(self) -> None:
        return None

    def blocked(self, request: ChannelRequest) -> str | None:
        return None

    async def probe(self) -> None:
        return None

    def after_failure(self, request: ChannelRequest, exc: HeraldError, now_ms: int) -> list[Out]:
        return []

    def render(self, request: ChannelRequest, part: str) -> tuple[str, str]:
        """(text, locale) of the route's ``part`` template (slack, sms)."""
        return self._templates_for(request.template_id, request.template_version).render_text(
            request.template_id, part, request.locale, *self.variables(request)
        )

    def variables(self, request: ChannelRequest) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The route's template variables, and the ones its type requires."""
        spec = self._catalog.get(request.template_id)
        return variables_of(request.variables_json), spec.required if spec else ()


class DirectChannel(Generic[M]):
    """The delivery of one direct channel's routes (see the module docstring)."""

    def __init__(
        self,
        ctx: StageContext,
        channel: str,
        transport: Transport[M],
        write: Write,
        pace: SharedRate | None = None,
    ) -> None:
        self.channel = channel
        self._transport = transport
        #: The channel's provider rate (topologies/limits.yaml ``channels``), if any.
        self._pace = pace
        self._write = write
        self._clock = ctx.clock
        self._catalog = ctx.catalog
        self._deliveries = Deliveries(ctx, channel)
        self._cancellations_ready = ctx.cancellations.ready
        self._timing = (channel,)
        #: Routes being sent right now (a second copy in the same batch waits for none).
        self._in_flight: set[str] = set()
        self.registry_topic = self._deliveries.registry_topic

    async def handle(self, raw: RawRecord, registry: MutableMapping[bytes, Any]) -> list[Out]:
        """Deal with one route; ``registry`` maps route_id to its entry.

        A lane sends several routes at once (a window: the next starts when the oldest
        is done), and each route's outputs (status events, the registry entry) are
        written as soon as it is done, not with its batch: the window in which a crash
        could send it twice stays one route's, not a batch's."""
        # A cancel that reached the topic before this worker started holds here.
        await self._cancellations_ready.wait()
        now = self._clock.now_ms()
        request = self._deliveries.accept(raw, registry, now)
        if not isinstance(request, ChannelRequest):
            return request
        if request.route_id in self._in_flight:
            log.info("%s route %s is being sent; copy skipped", self.channel, request.route_id)
            return []
        entry = registry_entry(registry.get(request.route_id.encode("utf-8")))
        in_doubt = entry is not None and entry.get("state") == "sending"
        self._in_flight.add(request.route_id)
        try:
            if in_doubt and self._holds_doubt(request):
                held = InDoubtError(
                    f"an earlier owner started its {self.channel} delivery; outcome unknown: "
                    "held for an operator (in_doubt: hold)"
                )
                outputs = self._failed(raw, registry, request, request.attempt + 1, held)
            else:
                outputs = await self._deliver(raw, registry, request, now)
            if in_doubt:
                # Its provider call began (the write-ahead below) but no outcome was
                # recorded: a worker died mid-send. It goes again (the same Message-ID
                # or webhook-id); the event (and its metric) lets an operator see every
                # possible duplicate.
                doubt = self._deliveries.status(
                    request,
                    "in_doubt",
                    now,
                    request.attempt + 1,
                    detail=f"an earlier owner started its {self.channel} delivery; outcome unknown",
                )
                outputs.insert(0, doubt)
            await self._write(outputs)
        finally:
            self._in_flight.discard(request.route_id)
        return []

    def _holds_doubt(self, request: ChannelRequest) -> bool:
        """Whether the route's type holds a route in doubt for an operator."""
        spec = self._catalog.get(request.notification_type)
        return spec is not None and spec.in_doubt == "hold"

    async def _deliver(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        now: int,
    ) -> list[Out]:
        deliveries, transport = self._deliveries, self._transport
        attempt = request.attempt + 1
        await transport.ready()
        reason = transport.blocked(request)
        if reason is not None:
            return [
                deliveries.status(request, "suppressed", now, request.attempt, reason=reason),
                deliveries.record(registry, raw, request, "suppressed", request.attempt, now),
                *deliveries.fallback(raw, request, "suppressed"),
            ]
        breaker = transport.breaker
        if breaker is not None:
            gate = breaker.gate()
            if gate == "wait" or (gate == "probe" and not await self._probe(breaker)):
                return deliveries.deferred(raw, request, now, breaker.wait_s(), "circuit_open")
        paced = None
        if self._pace is not None:
            waited_s = await self._pace.take(PRIORITIES.index(request.priority))
            if waited_s > 0:
                metrics.limited("channel", "paced")
                paced = f" (paced {waited_s * 1000:.0f} ms: the channel's provider rate)"
        outputs: list[Out] = []
        try:
            prepared = transport.prepare(request, now)
            if attempt == 1:
                outputs.append(
                    deliveries.status(request, "rendered", now, attempt, detail=prepared.locale)
                )
            # Write-ahead: a route whose delivery starts is recorded as such, so a new
            # owner after a crash knows it is in doubt (see handle).
            await self._write([deliveries.record(registry, raw, request, "sending", attempt, now)])
            sent = await metrics.timed(
                metrics.PROVIDER_SECONDS, transport.send(prepared.message), self._timing
            )
        except HeraldError as exc:
            if breaker is not None:
                if exc.server_unavailable:
                    breaker.failed()
                elif exc.code is not None:
                    breaker.succeeded()  # the server answered, if only to refuse
            return outputs + self._failed(raw, registry, request, attempt, exc)
        except Exception as exc:  # a provider bug must not lose the route: it retries
            log.exception(
                "unexpected failure sending %s route %s",
                self.channel,
                request.route_id,
                extra=route_fields(request, attempt),
            )
            error = TransientError(f"{type(exc).__name__}: {exc}", reason="internal_error")
            return outputs + self._failed(raw, registry, request, attempt, error)
        if breaker is not None:
            breaker.succeeded()
        now = self._clock.now_ms()
        outputs.append(
            deliveries.status(
                request,
                "sent",
                now,
                attempt,
                reason=None if paced is None else "paced",
                detail=sent.detail[:500] + (paced or ""),
            )
        )
        outputs.append(
            deliveries.record(registry, raw, request, "sent", attempt, now, **dict(sent.entry))
        )
        return outputs

    async def _probe(self, breaker: CircuitBreaker) -> bool:
        """The circuit's one probe: does the provider take connections again?"""
        try:
            await self._transport.probe()
        except HeraldError as exc:
            breaker.failed()
            log.info("%s circuit probe failed: %s", breaker.name, exc)
            return False
        except BaseException:
            breaker.failed()  # never leave the circuit half-open for good
            raise
        breaker.succeeded()
        return True

    def _failed(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        attempt: int,
        exc: HeraldError,
    ) -> list[Out]:
        outputs = self._deliveries.failed(raw, registry, request, attempt, exc)
        return outputs + self._transport.after_failure(request, exc, self._clock.now_ms())
