"""The HTTP intake behind ``POST /api/v1/notifications``, and its cancel
(docs/http-intake.md).

A producer that cannot speak Kafka posts the intent as JSON: the fields of
schemas/intent.avsc, the key in the ``Idempotency-Key`` header. The API checks it with
intake's own rules (every broken rule in one 400), spends the producer's rate
(topologies/limits.yaml; 429 with Retry-After), and writes the Avro intent to
``notification.intents`` on its home partition. 202 means Kafka acknowledged it
(acks=all): from there on intake accepts it exactly as a Kafka producer's, and the
notification id in the answer is the one intake gives it.

A replay with the same key and content answers the same id without writing again; a
replay with other content answers 409. The API knows a key from what it wrote itself
and from the status view (intake's ``accepted`` events, every replica's); two
replicas racing on one new key within the status view's lag both write, and intake
decides (the second becomes ``duplicate`` or ``rejected_conflict`` on the status
topic, which ``GET /api/v1/notifications?request_id=`` shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.contracts import Contracts
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import Intent, StatusEvent
from pipeline.errors import (
    BrokerUnavailableError,
    IdempotencyConflictError,
    InvalidRequestError,
    RateLimitedError,
    ValidationError,
)
from pipeline.runtime.records import Out
from pipeline.settings import Settings
from pipeline.stages.intake import ValidIntent, check_all, fingerprint
from pipeline.stages.outputs import status_out
from pipeline.throttle import TokenBucket
from pipeline.times import Clock
from pipeline.topology import Catalog, Topology
from pipeline.topology.limits import Limits, Rate
from pipeline.topology.model import PRIORITIES
from pipeline.topology.partitioning import partition_for
from pipeline.views import Cancellations
from pipeline.web.status_store import StatusStore
from pipeline.web.writer import RequestWriter

#: Body fields and the JSON types each takes (schemas/intent.avsc; None: may be null).
_FIELDS: dict[str, tuple[type | None, ...]] = {
    "schema_version": (int,),
    "notification_type": (str,),
    "producer": (str,),
    "audience_kind": (str,),
    "recipient_user_ids": (list,),
    "idempotency_key": (str,),
    "occurred_at_ms": (int,),
    "request_id": (str, None),
    "trace_id": (str, None),
    "tenant_id": (str, None),
    "priority": (str,),
    "payload_json": (str, dict),
}
#: Required as in the Avro schema. occurred_at_ms has no default: it is fingerprinted,
#: so "now" would make a retried POST a conflict.
_REQUIRED = ("notification_type", "occurred_at_ms")
_AUDIENCES = ("user", "admin_email")
#: Keys the API remembers having written itself (beyond: the status view answers).
_REMEMBERED = 100_000


def parse_intent(body: bytes, idempotency_key: str | None, producer: str | None) -> Intent:
    """The intent a request carries; InvalidRequestError lists every field it gets wrong.
    ``producer`` is the one the caller's token sends as (None: the body names it)."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError(
            [ValidationError(f"the body is not JSON: {exc}", reason="invalid_json")]
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError(
            [ValidationError("the body must be a JSON object", reason="invalid_json")]
        )
    found: list[ValidationError] = []

    def fail(reason: str, detail: str) -> None:
        found.append(ValidationError(detail, reason=reason))

    if unknown := sorted(set(data) - set(_FIELDS)):
        fail("unknown_fields", f"fields not in the intent: {', '.join(unknown)}")
    for name, kinds in _FIELDS.items():
        value = data.get(name)
        if name not in data:
            if name in _REQUIRED:
                fail("missing_field", f"{name} is required")
        elif not _of_type(value, kinds):
            names = " or ".join("null" if k is None else _JSON_NAMES[k] for k in kinds)
            fail("field_type", f"{name} must be {names}")
    users = data.get("recipient_user_ids", [])
    if isinstance(users, list) and not all(isinstance(u, str) for u in users):
        fail("field_type", "recipient_user_ids must be a list of strings")
    if data.get("audience_kind", "user") not in _AUDIENCES:
        fail("field_type", f"audience_kind must be one of {', '.join(_AUDIENCES)}")
    if data.get("priority", "normal") not in PRIORITIES:
        fail("field_type", f"priority must be one of {', '.join(PRIORITIES)}")
    if not idempotency_key:
        fail("invalid_idempotency_key", "the Idempotency-Key header is required")
    elif data.get("idempotency_key", idempotency_key) != idempotency_key:
        fail("invalid_idempotency_key", "idempotency_key differs from the Idempotency-Key header")
    if producer is None and not isinstance(data.get("producer"), str):
        fail("invalid_producer", "producer is required")
    elif producer is not None and data.get("producer", producer) != producer:
        fail("invalid_producer", f"this token sends as producer {producer!r} only")
    if found:
        raise InvalidRequestError(found)
    payload = data.get("payload_json", "{}")
    if isinstance(payload, dict):
        payload = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Intent(
        notification_type=data["notification_type"],
        producer=producer or data["producer"],
        audience_kind=data.get("audience_kind", "user"),
        recipient_user_ids=list(users),
        idempotency_key=idempotency_key or "",
        occurred_at_ms=data["occurred_at_ms"],
        request_id=data.get("request_id"),
        trace_id=data.get("trace_id"),
        tenant_id=data.get("tenant_id"),
        priority=data.get("priority", "normal"),
        payload_json=payload,
        schema_version=data.get("schema_version", 1),
    )


_JSON_NAMES: dict[type, str] = {
    int: "an integer",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _of_type(value: Any, kinds: tuple[type | None, ...]) -> bool:
    if value is None:
        return None in kinds
    # JSON true/false are Python bools, which are ints: not an integer here.
    return not isinstance(value, bool) and any(
        k is not None and isinstance(value, k) for k in kinds
    )


@dataclass(frozen=True, slots=True)
class Accepted:
    """The answer to an accepted (or replayed) intent."""

    notification_id: str
    """The id intake gives the notification."""
    replayed: bool
    """True when the same key and content were accepted before (nothing was written)."""


class ProducerLimits:
    """One token bucket per producer of each tenant (topologies/limits.yaml
    ``producers``), and one per declared tenant with an ``intake`` rate: a producer's
    name in one tenant never spends another tenant's rate."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._buckets: dict[tuple[str, str | None], TokenBucket | None] = {}
        self._tenants: dict[str, TokenBucket | None] = {}

    @property
    def tenants(self) -> tuple[str, ...]:
        """The declared tenants (each a metrics label of its own)."""
        return tuple(self._limits.tenants)

    def spend(self, producer: str, tenant_id: str | None = None) -> None:
        """Take one request from the tenant's, then ``producer``'s rate; RateLimitedError
        when either is spent."""
        if tenant_id is not None and tenant_id not in self._tenants:
            own = self._limits.tenant(tenant_id)
            self._tenants[tenant_id] = self._bucket(None if own is None else own.intake)
        key = (producer, tenant_id)
        if key not in self._buckets:
            self._buckets[key] = self._bucket(self._limits.producer(producer))
        tenant = None if tenant_id is None else self._tenants[tenant_id]
        bucket = self._buckets[key]
        for which, spent in ((f"tenant {tenant_id!r}", tenant), (f"producer {producer!r}", bucket)):
            if spent is not None and (wait := spent.take()):
                raise RateLimitedError(
                    f"{which} is over its rate (topologies/limits.yaml)",
                    retry_after_s=max(1, math.ceil(wait)),
                )

    def _bucket(self, rate: Rate | None) -> TokenBucket | None:
        return None if rate is None else TokenBucket(rate.per_second, rate.burst, self._clock)


class IntentIntake:
    """Accepts intents over HTTP (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        contracts: Contracts,
        store: StatusStore,
        writer: RequestWriter,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._contracts = contracts
        self._catalog = Catalog.load(settings)
        self.limits = ProducerLimits(Limits.load(settings))
        self._store = store
        self._writer = writer
        self._clock = clock
        self._topic = settings.topic("notification.intents")
        self._partitions = Topology.load(settings).spec("notification.intents").partitions
        self._status_topic = settings.topic("notification.status")
        self._window_ms = settings.idempotency_window_s * 1000
        self._written: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def check(self, intent: Intent) -> ValidIntent:
        """The intent validated as intake will; InvalidRequestError with every problem."""
        valid, found = check_all(intent, self._catalog, self._settings)
        if valid is None:
            raise InvalidRequestError(found)
        return valid

    async def submit(self, valid: ValidIntent) -> Accepted:
        """Write ``valid`` once Kafka acknowledges it; IdempotencyConflictError when its
        key was accepted with other content, BrokerUnavailableError when Kafka is away."""
        key = valid.intent.idempotency_id
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                return await self._submit(valid)
        finally:
            if not lock.locked():
                self._locks.pop(key, None)

    async def _submit(self, valid: ValidIntent) -> Accepted:
        intent = valid.intent
        key = intent.idempotency_id
        nid = deterministic_id(key, fingerprint(valid))
        now = self._clock.now_ms()
        known = self._known(intent, now)
        if known is not None:
            if known != nid:
                raise IdempotencyConflictError(
                    f"key already used by notification {known} with different content"
                )
            return Accepted(nid, replayed=True)
        raw_key = key.encode("utf-8")
        await self._writer.deliver(
            [
                Out(
                    self._topic,
                    raw_key,
                    self._contracts.intent.encode(intent),
                    partition=partition_for(raw_key, self._partitions),
                )
            ]
        )
        self._written[key] = (nid, now)
        if len(self._written) > _REMEMBERED:
            self._written.popitem(last=False)
        return Accepted(nid, replayed=False)

    def _known(self, intent: Intent, now_ms: int) -> str | None:
        """The notification id the key was accepted with within the window, if any."""
        key = intent.idempotency_id
        seen = self._written.get(key) or self._store.accepted(
            intent.producer, intent.idempotency_key
        )
        if seen is None or now_ms - seen[1] >= self._window_ms:
            return None
        return seen[0]

    async def record_rejection(
        self, producer: str, idempotency_key: str | None, body: bytes, error: InvalidRequestError
    ) -> None:
        """Write a ``rejected`` status event for a refused request that names a
        request_id, so a lookup by request_id shows it as it shows intake's refusals;
        best effort (the caller has its 400 either way)."""
        fields = _loose_fields(body)
        request_id, trace_id = fields.get("request_id"), fields.get("trace_id")
        tenant_id = fields.get("tenant_id")
        if not isinstance(request_id, str) or not request_id:
            return
        idempotency_key = idempotency_key or ""
        notification_type = fields.get("notification_type")
        event = StatusEvent(
            event_id=deterministic_id(
                producer, idempotency_key, "rejected", hashlib.sha256(body).hexdigest()
            ),
            status="rejected",
            at_ms=self._clock.now_ms(),
            notification_type=notification_type if isinstance(notification_type, str) else None,
            producer=producer,
            idempotency_key=idempotency_key,
            reason=error.reason,
            detail=error.detail[:2000],
            request_id=request_id,
            trace_id=trace_id if isinstance(trace_id, str) else None,
            tenant_id=tenant_id if isinstance(tenant_id, str) else None,
        )
        key = f"{producer}:{idempotency_key}".encode()
        with contextlib.suppress(BrokerUnavailableError):
            await self._writer.deliver(
                [status_out(self._contracts, self._status_topic, event, key=key)]
            )


def _loose_fields(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


#: Delivery states after which a cancel changes nothing.
_FINISHED = frozenset(
    {
        "sent",
        "published",
        "dead_lettered",
        "expired",
        "suppressed",
        "cancelled",
        "skipped",
        "digested",
    }
)


class Cancels:
    """Cancels notifications: a record on notification.cancellations, which every
    worker follows; each route not yet handed to its provider then ends ``cancelled``
    (the route stage, and every channel before it sends)."""

    def __init__(
        self,
        settings: Settings,
        contracts: Contracts,
        store: StatusStore,
        writer: RequestWriter,
        clock: Clock,
    ) -> None:
        self._contracts = contracts
        self._store = store
        self._writer = writer
        self._cancellations = Cancellations(settings)
        self._status_topic = settings.topic("notification.status")
        self._clock = clock

    def producer_of(self, notification_id: str) -> str | None:
        """The producer of a notification the status view knows; LookupError if none."""
        found = self._store.notification(notification_id)
        if found is None:
            raise LookupError(notification_id)
        return found.get("producer")

    async def cancel(self, notification_id: str, by: str) -> dict[str, Any]:
        """Cancel ``notification_id`` once Kafka has the cancel (LookupError when the
        status view does not know it); the answer lists its routes still under way."""
        found = self._store.notification(notification_id)
        if found is None:
            raise LookupError(notification_id)
        now = self._clock.now_ms()
        event = StatusEvent(
            event_id=deterministic_id(notification_id, "cancel_requested"),
            status="cancel_requested",
            at_ms=now,
            notification_id=notification_id,
            notification_type=found.get("notification_type"),
            producer=found.get("producer"),
            idempotency_key=found.get("idempotency_key"),
            detail=f"by {by}",
            request_id=found.get("request_id"),
            tenant_id=found.get("tenant_id"),
        )
        await self._writer.deliver(
            [
                self._cancellations.entry(notification_id, by, now),
                status_out(self._contracts, self._status_topic, event),
            ]
        )
        pending = [d["route_id"] for d in found["deliveries"] if d["status"] not in _FINISHED]
        return {
            "notification_id": notification_id,
            "status": "cancel_requested",
            "pending_routes": pending,
        }
