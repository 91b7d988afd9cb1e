"""Herald's Prometheus metrics (prometheus-client, the process's default registry).

Agents do not count as they decide: every status event and malformed record carries a
:class:`Note`, and the acked sink counts the notes of what Kafka acknowledged
(:func:`count`), so the counters say what really happened, once per record written.
Timings of the outside world (SMTP, the gateway topic) are observed where they are
measured. Consumer lag is exported by the API process (pipeline.web.lag) under the
kafka_exporter names, so lag dashboards built for kafka_exporter work unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from pipeline.values import value_class

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

INTENTS = Counter("herald_intents_total", "Intents by intake verdict.", ["outcome"])
MALFORMED = Counter(
    "herald_malformed_total",
    "Records Herald could not use, by origin topic and reason.",
    ["topic", "reason"],
)
ENRICHMENT_MISSES = Counter(
    "herald_enrichment_misses_total", "Recipient lookups that found no user (each lookup)."
)
ROUTES = Counter(
    "herald_routes_total", "Routing decisions by channel and outcome.", ["channel", "status"]
)
ATTEMPTS = Counter(
    "herald_delivery_attempts_total",
    "Delivery attempts by channel and outcome (delivered, transient, permanent).",
    ["channel", "outcome"],
)
OUTCOMES = Counter(
    "herald_deliveries_total",
    "Deliveries that reached a final state, by channel and state.",
    ["channel", "status"],
)
IN_DOUBT = Counter(
    "herald_in_doubt_total",
    "Routes whose delivery an earlier owner started without recording its outcome, by "
    "channel: each is sent again (a possible duplicate) or held for an operator "
    "(in_doubt: hold).",
    ["channel"],
)
RETRIES = Counter("herald_retries_total", "Retries scheduled, by channel.", ["channel"])
DEAD_LETTERS = Counter(
    "herald_dead_letters_total",
    "Routes dead-lettered, by channel and reason.",
    ["channel", "reason"],
)
END_TO_END = Histogram(
    "herald_end_to_end_latency_seconds",
    "From the intent's production to SMTP acceptance / gateway publication.",
    ["channel"],
    buckets=_LATENCY_BUCKETS,
)
GATEWAY_SECONDS = Histogram(
    "herald_gateway_publish_seconds",
    "One publication to the gateway topic, by outcome.",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
)
PROVIDER_SECONDS = Histogram(
    "herald_provider_call_seconds",
    "One call to a direct channel's provider (an SMTP transaction, a webhook POST, ...), "
    "by channel and outcome.",
    ["channel", "outcome"],
    buckets=_LATENCY_BUCKETS,
)

HTTP_INTENTS = Counter(
    "herald_http_intents_total",
    "Intents posted to the HTTP intake, by answer (accepted, replayed, invalid, too_large, "
    "conflict, rate_limited, unavailable, unauthorized).",
    ["outcome"],
)
HTTP_INTENT_SECONDS = Histogram(
    "herald_http_intent_seconds",
    "Time to answer one POST /api/v1/notifications, by answer.",
    ["outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
LIMITED = Counter(
    "herald_limited_total",
    "Decisions of the limits of topologies/limits.yaml that held something back, by limit "
    "and decision.",
    ["limit", "decision"],
)

TENANT_INTENTS = Counter(
    "herald_tenant_intents_total",
    "Intents by tenant and intake verdict: each tenant declared in topologies/limits.yaml "
    "is a label of its own, any other is 'other', an intent without one 'none'.",
    ["tenant", "outcome"],
)
TENANT_DELIVERIES = Counter(
    "herald_tenant_deliveries_total",
    "Deliveries that reached a final state, by tenant (as herald_tenant_intents_total), "
    "channel and state.",
    ["tenant", "channel", "status"],
)
CIRCUIT_OPEN = Gauge(
    "herald_circuit_open",
    "1 while a provider's circuit is open or probing (its server is left alone), by provider.",
    ["provider"],
)

T = TypeVar("T")

_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}
#: The tenants with a label of their own (a tenant id is a producer's to choose: the
#: label set stays as small as the declared list).
_TENANTS: frozenset[str] = frozenset()


def declare_tenants(tenants: Iterable[str]) -> None:
    """The tenants that get a label of their own (topologies/limits.yaml ``tenants:``)."""
    global _TENANTS
    _TENANTS = frozenset(tenants)


def tenant_label(tenant_id: str | None) -> str:
    """The bounded label of ``tenant_id``."""
    if not tenant_id:
        return "none"
    return tenant_id if tenant_id in _TENANTS else "other"


def _child(metric: Counter | Histogram, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once: prometheus-client validates and locks
    on every call, which showed up at a few percent of a busy worker's time."""
    key = (id(metric), labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


def limited(limit: str, decision: str) -> None:
    """Count one decision of a limit that held something back."""
    _child(LIMITED, limit, decision).inc()


def answered(outcome: str, seconds: float) -> None:
    """Count one answer of the HTTP intake and its time."""
    _child(HTTP_INTENTS, outcome).inc()
    _child(HTTP_INTENT_SECONDS, outcome).observe(seconds)
    if outcome == "rate_limited":
        limited("producer", "rejected")


def outcome_of(error: BaseException | None) -> str:
    """A timing's outcome label: ok, or the class of the error (transient, permanent,
    error)."""
    if error is None:
        return "ok"
    transient = getattr(error, "transient", None)
    return "error" if transient is None else "transient" if transient else "permanent"


def observe(
    histogram: Histogram,
    seconds: float,
    error: BaseException | None = None,
    labels: tuple[str, ...] = (),
) -> None:
    """Observe one timing in ``histogram`` under ``labels`` and its outcome
    (:func:`outcome_of`, the last label)."""
    _child(histogram, *labels, outcome_of(error)).observe(seconds)


async def timed(histogram: Histogram, call: Awaitable[T], labels: tuple[str, ...] = ()) -> T:
    """Await ``call``, observing its duration in ``histogram`` by ``labels`` and outcome."""
    started = time.monotonic()
    error: Exception | None = None
    try:
        return await call
    except Exception as exc:
        error = exc
        raise
    finally:
        observe(histogram, time.monotonic() - started, error, labels)


_INTAKE = frozenset({"accepted", "duplicate", "rejected", "rejected_conflict", "ignored"})
_ROUTING = frozenset({"routed", "skipped", "deferred", "recipient_unknown"})
_DELIVERED = frozenset({"sent", "published"})
_FINAL = frozenset(
    {"sent", "published", "suppressed", "expired", "dead_lettered", "cancelled", "digested"}
)


@value_class
class Note:
    """What a written record means for the metrics."""

    kind: str
    """``status``, ``malformed`` or ``enrichment_miss``."""
    status: str = ""
    """The status (status events) or the reason (malformed records)."""
    channel: str = ""
    """The route's channel, when there is one; the origin topic for malformed records."""
    reason: str = ""
    """The event's reason."""
    error_class: str = ""
    """transient or permanent, on ``failed`` events."""
    latency_s: float | None = None
    """Intent produced -> delivered, on delivery events."""
    tenant: str = ""
    """The notification's tenant_id ("" without one)."""


def count(notes: Iterable[Note | None]) -> None:
    """Count the notes of records Kafka acknowledged."""
    for note in notes:
        if note is None:
            continue
        if note.kind == "malformed":
            _child(MALFORMED, note.channel, note.status).inc()
            continue
        if note.kind == "enrichment_miss":
            ENRICHMENT_MISSES.inc()
            continue
        status, channel = note.status, note.channel
        if status in _INTAKE:
            _child(INTENTS, status).inc()
            _child(TENANT_INTENTS, tenant_label(note.tenant), status).inc()
        elif status in _ROUTING and channel:
            _child(ROUTES, channel, status).inc()
        if status in _DELIVERED:
            _child(ATTEMPTS, channel, "delivered").inc()
            if note.latency_s is not None:
                _child(END_TO_END, channel).observe(max(note.latency_s, 0.0))
        elif status == "failed" and channel:
            _child(ATTEMPTS, channel, note.error_class or "permanent").inc()
        elif status == "retry_scheduled":
            _child(RETRIES, channel).inc()
        elif status == "in_doubt":
            _child(IN_DOUBT, channel).inc()
        if status == "deferred" and note.reason == "rate_limited":
            limited("user", "deferred")
        if status == "dead_lettered":
            _child(DEAD_LETTERS, channel, note.reason).inc()
        if status in _FINAL and channel:
            _child(OUTCOMES, channel, status).inc()
            _child(TENANT_DELIVERIES, tenant_label(note.tenant), channel, status).inc()
