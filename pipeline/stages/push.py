"""The push channel: each route ends published to the client gateway, expired, or
dead-lettered with its history; and the gateway's reports of dead device tokens.

A push route becomes one FlatBuffers Notification (schemas/notification.fbs): the
type's body table filled from the intent payload, the display texts from the type's
push templates in the route's locale, the user's device tokens. It is published to the
gateway topic keyed by user_id (the gateway fans it out to all of the user's sessions),
with the ids in headers. A route past its deadline (the type's push_ttl_s after the
event) is not published but recorded ``expired``. Publication failures are classified
(pipeline.providers.gateway): transient ones wait in the push delay tiers (budget 3 by
default), permanent ones and the last attempt go to the push DLQ.

Routes of one batch are published together when the batch closes
(:class:`Publications`: their ``publishing`` entries in one write, then their pushes
in one write to the gateway topic) and their status events written once all are
acknowledged (see BatchRun). The delivery registry (pipeline.stages.deliveries) keeps
a restarted worker from publishing a route again. Before publishing, the channel
writes (and waits for) a ``publishing`` registry entry: a route that a killed or
revoked worker left in that state is in doubt, and its new owner looks for it in the
gateway topic (by route_id header, from the entry's time on) before publishing it, so
a crash between the gateway's acknowledgement and the registry's cannot publish twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pipeline import metrics
from pipeline.contracts.push import BODY_TABLES, Display, PushPayload, body_from_variables, encode
from pipeline.contracts.records import ChannelRequest, Recipient, UserProfile
from pipeline.errors import DecodeError, HeraldError, PushPayloadError, TransientError
from pipeline.logs import route_fields
from pipeline.providers.gateway import GatewayPublisher, PublishReceipt, Push
from pipeline.rendering import variables_of
from pipeline.runtime.batches import then
from pipeline.runtime.records import Out, RawRecord, Write
from pipeline.stages.channel import Address
from pipeline.stages.context import StageContext
from pipeline.stages.deliveries import Deliveries, registry_entry
from pipeline.stages.outputs import malformed
from pipeline.topology import TypeSpec
from pipeline.topology.partitioning import partition_for

log = logging.getLogger(__name__)

#: How far before its ``publishing`` entry the gateway topic is searched for a route in
#: doubt (the entry's time is this host's clock; record timestamps are the broker's).
DOUBT_MARGIN_MS = 30_000

#: Publication failures that leave no record on the gateway topic.
NOT_SENT = frozenset({"gateway_topic_missing", "gateway_unauthorized", "gateway_unreachable"})


class PushChannel:
    """Decisions and publication for one push route (see the module docstring)."""

    def __init__(self, ctx: StageContext, gateway: GatewayPublisher, write: Write) -> None:
        settings, catalog, clock = ctx.settings, ctx.catalog, ctx.clock
        self._catalog = catalog
        #: Routes this process is publishing right now (a second copy waits for none).
        self._in_flight: set[str] = set()
        #: Routes whose publication this process started but never saw end (cancelled),
        #: with the wall-clock ms it started.
        self._in_doubt: dict[str, int] = {}
        self._templates_for = ctx.templates_for
        self._gateway = gateway
        self._publications = Publications(write, gateway)
        self._clock = clock
        self._max_bytes = settings.push_max_payload_bytes
        self._deliveries = Deliveries(ctx, "push")
        self.registry_topic = self._deliveries.registry_topic
        self.requests_topic = settings.topic(ctx.topology.channel("push").lanes["bulk"])
        unmapped = sorted(
            spec.name for spec in catalog.using("push") if spec.push_payload not in BODY_TABLES
        )
        if unmapped:
            log.error(
                "push types without a FlatBuffers table (their pushes will dead-letter as "
                "push_type_unmapped): %s",
                unmapped,
            )

    def handle(
        self, raw: RawRecord, registry: MutableMapping[bytes, Any]
    ) -> list[Out] | Awaitable[list[Out]]:
        """The outputs for one route: at once when it needs no publication, else an
        awaitable that publishes it (so that a batch's publications overlap)."""
        now = self._clock.now_ms()
        deliveries = self._deliveries
        request = deliveries.accept(raw, registry, now)
        if not isinstance(request, ChannelRequest):
            return request
        if request.route_id in self._in_flight:
            log.info("push route %s is being published; copy skipped", request.route_id)
            return []
        entry = registry_entry(registry.get(request.route_id.encode("utf-8")))
        started = self._in_doubt.get(request.route_id)
        if started is None and entry is not None:
            if entry.get("state") == "publishing":
                started = int(entry.get("wall", 0))
            elif entry.get("state") == "retrying" and "doubt" in entry:
                started = int(entry["doubt"])
        if started is not None:
            self._in_flight.add(request.route_id)
            return self._resolve_doubt(raw, registry, request, started)
        return self._decide(raw, registry, request, now)

    async def _resolve_doubt(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        started_ms: int,
    ) -> list[Out]:
        """A route whose publication began at ``started_ms`` (wall clock) and may have
        landed: record it if the gateway topic has it, else go on."""
        since_ms = max(started_ms - DOUBT_MARGIN_MS, 0)
        try:
            receipt = await self._gateway.find(
                (request.user_id or "").encode("utf-8"), request.route_id, since_ms
            )
        except HeraldError as exc:
            # Could not look: still in doubt at the next attempt.
            self._in_flight.discard(request.route_id)
            if exc.server_unavailable:  # the broker is away: not the push's fault
                return self._waits(raw, request, exc)
            attempt = request.attempt + 1
            return self._deliveries.failed(raw, registry, request, attempt, exc, started_ms)
        except BaseException:
            self._in_flight.discard(request.route_id)
            raise
        self._in_flight.discard(request.route_id)
        self._in_doubt.pop(request.route_id, None)
        if receipt is None:  # after an await: this route's batch may have closed already
            outputs = self._decide(raw, registry, request, self._clock.now_ms(), at_once=True)
            return list(await outputs) if isinstance(outputs, Awaitable) else outputs
        log.info(
            "push route %s was published before a restart (%s[%d]@%d); not again",
            request.route_id,
            self._gateway.topic,
            receipt.partition,
            receipt.offset,
            extra=route_fields(request),
        )
        return self._published(raw, registry, request, request.attempt + 1, receipt)

    def _decide(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        now: int,
        *,
        at_once: bool = False,
    ) -> list[Out] | Awaitable[list[Out]]:
        deliveries = self._deliveries
        attempt = request.attempt + 1
        if request.deadline_ms and now >= request.deadline_ms:
            deadline = datetime.fromtimestamp(request.deadline_ms / 1000, tz=UTC)
            detail = f"deadline {deadline.isoformat(timespec='seconds')} passed before publication"
            return [
                deliveries.status(request, "expired", now, request.attempt, detail=detail),
                deliveries.record(registry, raw, request, "expired", request.attempt, now),
                *deliveries.fallback(raw, request, "expired"),
            ]
        try:
            value = self.payload(request)
        except HeraldError as exc:
            return deliveries.failed(raw, registry, request, attempt, exc)
        self._in_flight.add(request.route_id)
        return self._publish(raw, registry, request, attempt, value, at_once)

    def payload(self, request: ChannelRequest) -> bytes:
        """The FlatBuffers bytes of ``request``'s push; a permanent error when the type
        has no table, the payload does not fit it, or the result is over the size cap."""
        spec = self._catalog.get(request.notification_type)
        table = spec.push_payload if spec else None
        if table is None or table not in BODY_TABLES:
            raise PushPayloadError(
                f"notification type {request.notification_type!r} has no FlatBuffers table: "
                "map it with push_payload in topologies/catalog.yaml to a table of "
                "schemas/notification.fbs",
                reason="push_type_unmapped",
            )
        variables = variables_of(request.variables_json)
        display = self._templates_for(request.template_id, request.template_version).render_push(
            request.template_id, request.locale, variables, spec.required if spec else ()
        )
        value = encode(
            PushPayload(
                notification_type=request.notification_type,
                notification_id=request.notification_id,
                route_id=request.route_id,
                user_id=request.user_id or "",
                body_table=table,
                body=body_from_variables(table, variables),
                display=Display(display.title, display.body, display.image_url, display.link),
                occurred_at_ms=request.occurred_at_ms,
                locale=display.locale,
                expires_at_ms=request.deadline_ms,
                priority=request.priority,
                device_tokens=request.device_tokens,
                trace_id=request.trace_id,
            )
        )
        if len(value) > self._max_bytes:
            raise PushPayloadError(
                f"push payload is {len(value)} bytes, over the {self._max_bytes}-byte cap "
                "(HERALD_PUSH_MAX_PAYLOAD_BYTES)",
                reason="payload_too_large",
            )
        return value

    def flush(self) -> None:
        """Start the publications of the routes handled since the last call (the
        stage's batch closes)."""
        self._publications.start()

    def _publish(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        attempt: int,
        value: bytes,
        at_once: bool,
    ) -> asyncio.Future[list[Out]]:
        headers = [
            ("notification_type", request.notification_type.encode()),
            ("notification_id", request.notification_id.encode()),
            ("route_id", request.route_id.encode()),
            ("trace_id", (request.trace_id or "").encode()),  # empty: the producer sent none
        ]
        now, wall = self._clock.now_ms(), int(time.time() * 1000)
        ahead = self._deliveries.record(
            registry, raw, request, "publishing", attempt, now, wall=str(wall)
        )
        push = ((request.user_id or "").encode("utf-8"), value, headers)
        publication = self._publications.publish(ahead, push)
        if at_once:
            self._publications.start()

        def outcome(receipt: PublishReceipt | BaseException) -> list[Out]:
            if isinstance(receipt, PublishReceipt):
                return self._published(raw, registry, request, attempt, receipt)
            if isinstance(receipt, HeraldError):
                if receipt.server_unavailable:
                    # No answer from Kafka (a broker restart): no attempt spent. The
                    # publishing entry stays, so the retry looks for the push first.
                    return self._waits(raw, request, receipt)
                # A broker error may hide a record that lands later: the retry looks
                # for it first. A refused or unroutable push went nowhere.
                landed = receipt.transient and receipt.reason not in NOT_SENT
                doubt = wall if landed else None
                return self._deliveries.failed(raw, registry, request, attempt, receipt, doubt)
            log.error(  # a publisher bug must not lose the route: it retries
                "unexpected failure publishing push route %s",
                request.route_id,
                exc_info=receipt,
                extra=route_fields(request, attempt),
            )
            error = TransientError(f"{type(receipt).__name__}: {receipt}", reason="internal_error")
            return self._deliveries.failed(raw, registry, request, attempt, error)

        def ended(future: asyncio.Future[list[Out]]) -> None:
            self._in_flight.discard(request.route_id)
            if future.cancelled():  # the partition was revoked mid-publication
                self._in_doubt[request.route_id] = wall  # it may have gone out: look next time

        outputs = then(publication, outcome)
        outputs.add_done_callback(ended)
        return outputs

    def _waits(self, raw: RawRecord, request: ChannelRequest, exc: HeraldError) -> list[Out]:
        """The route back in the delay tiers with its attempts unchanged (the broker did
        not answer; issue 14: a broker restart must not dead-letter pushes)."""
        log.info(
            "push route %s waits for the broker (%s: %s)",
            request.route_id,
            exc.reason,
            exc.detail[:200],
            extra=route_fields(request, request.attempt),
        )
        return self._deliveries.deferred(raw, request, self._clock.now_ms(), 0.0, exc.reason)

    def _published(
        self,
        raw: RawRecord,
        registry: MutableMapping[bytes, Any],
        request: ChannelRequest,
        attempt: int,
        receipt: PublishReceipt,
    ) -> list[Out]:
        now = self._clock.now_ms()
        where = f"{self._gateway.topic}[{receipt.partition}]@{receipt.offset}"
        return [
            self._deliveries.status(request, "published", now, attempt, detail=where),
            self._deliveries.record(registry, raw, request, "published", attempt, now),
        ]


class Publications:
    """The publications of a batch's routes, made together: every route's
    ``publishing`` entry in one acknowledged write, then every push in one write to
    the gateway topic (two round trips per batch instead of two per route).
    """

    def __init__(self, write: Write, gateway: GatewayPublisher) -> None:
        self._write = write
        self._gateway = gateway
        self._waiting: list[tuple[Out, Push, asyncio.Future[PublishReceipt | BaseException]]] = []
        self._running: set[asyncio.Task[None]] = set()

    def publish(self, ahead: Out, push: Push) -> asyncio.Future[PublishReceipt | BaseException]:
        """Queue ``push`` behind its ``publishing`` entry ``ahead`` until :meth:`start`:
        its receipt, or the error that stopped it."""
        future: asyncio.Future[PublishReceipt | BaseException] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting.append((ahead, push, future))
        return future

    def start(self) -> None:
        """Publish what is queued."""
        if not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)  # a task nobody awaits must be kept referenced
        task.add_done_callback(self._running.discard)

    async def _run(
        self, batch: list[tuple[Out, Push, asyncio.Future[PublishReceipt | BaseException]]]
    ) -> None:
        try:
            await self._write([ahead for ahead, _, future in batch if not future.cancelled()])
            # A route cancelled meanwhile (its partition was revoked) is not published:
            # its new owner finds the publishing entry and looks before publishing.
            batch = [item for item in batch if not item[2].cancelled()]
            if not batch:
                return
            started = time.monotonic()
            results: Sequence[PublishReceipt | BaseException] = await self._gateway.publish_many(
                [push for _, push, _ in batch]
            )
            elapsed = time.monotonic() - started
        except Exception as exc:  # a publisher bug: each route of the batch retries
            results, elapsed = [exc] * len(batch), 0.0
        except BaseException:
            for _, _, future in batch:
                future.cancel()
            raise
        for (_, _, future), result in zip(batch, results, strict=True):
            failed = result if isinstance(result, BaseException) else None
            metrics.observe(metrics.GATEWAY_SECONDS, elapsed, failed)
            if not future.done():
                future.set_result(result)


def invalid_tokens(value: bytes | None) -> dict[str, Any]:
    """A user's entry in the invalid push token table: token -> {reason, at, platform}."""
    if not value:
        return {}
    try:
        entry = json.loads(value)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def usable_tokens(tokens: list[str], invalid: Mapping[bytes, Any], user_id: str) -> list[str]:
    """``tokens`` without those the gateway reported dead for ``user_id``."""
    dead = invalid_tokens(invalid.get(user_id.encode("utf-8")))
    return [token for token in tokens if token not in dead]


class PushRouting:
    """The push channel to the route stage: a user's devices, less those the gateway
    reported dead; a route expires ``push_ttl_s`` after its event."""

    name = "push"

    def __init__(self, invalid_tokens: Mapping[bytes, Any]) -> None:
        # Push tokens the gateway reported dead, by user_id (DeviceFeedbackLog).
        self._invalid_tokens = invalid_tokens

    def address(self, profile: UserProfile, spec: TypeSpec) -> Address | str:
        tokens = usable_tokens(
            [d.token for d in profile.push_devices], self._invalid_tokens, profile.user_id
        )
        return Address(tokens=tuple(tokens)) if tokens else "no_push_device"

    def deadline_ms(self, recipient: Recipient, spec: TypeSpec) -> int:
        return recipient.occurred_at_ms + spec.push_ttl_s * 1000 if spec.push_ttl_s else 0


class DeviceFeedbackLog:
    """Keeps the invalid push token table from the gateway's device feedback.

    The table is keyed (and partitioned) by user_id like the users table, so the router
    reads a user's profile and dead tokens side by side. An entry is never dropped by
    a later profile from the user service: a token once reported dead stays excluded
    for that user (push services issue a new token when an app is reinstalled).
    """

    def __init__(self, ctx: StageContext) -> None:
        settings, topology = ctx.settings, ctx.topology
        self._contracts = ctx.contracts
        self.feedback_topic = settings.topic("gateway.device-feedback")
        self.keyed_topic = settings.topic("notification.push.feedback.keyed")
        self._malformed_topic = settings.topic("notification.malformed")
        self._partitions = topology.spec("gateway.device-feedback").partitions

    def handle(self, raw: RawRecord, table: MutableMapping[bytes, Any], now_ms: int) -> list[Out]:
        """Record one report in ``table``; outputs only for forwards and errors."""
        if not raw.key:
            return [self._malformed(raw, "missing_key", "feedback is keyed by user_id", now_ms)]
        try:  # before any forward, so that a bad report is kept with its first origin
            report = self._contracts.device_feedback.decode(raw.value)
        except DecodeError as exc:
            return [self._malformed(raw, exc.reason, exc.detail, now_ms)]
        if report.user_id.encode("utf-8") != raw.key:
            detail = f"record key {raw.key!r} differs from user_id {report.user_id!r}"
            return [self._malformed(raw, "key_mismatch", detail, now_ms)]
        home = partition_for(raw.key, self._partitions)
        if raw.topic == self.feedback_topic and raw.partition != home:
            return [Out(self.keyed_topic, raw.key, raw.value, partition=home, headers=raw.headers)]
        entry = invalid_tokens(table.get(raw.key))
        if report.token not in entry:
            log.info(
                "push token ...%s of user %s reported %s; no longer targeted",
                report.token[-6:],
                report.user_id,
                report.reason,
            )
        entry[report.token] = {
            "reason": report.reason,
            "platform": report.platform,
            "reported_at": report.reported_at_ms,
            "at": now_ms,
        }
        table[raw.key] = json.dumps(entry, separators=(",", ":")).encode()
        return []

    def _malformed(self, raw: RawRecord, reason: str, detail: str, now_ms: int) -> Out:
        return malformed(self._contracts, self._malformed_topic, raw, reason, detail, now_ms)
