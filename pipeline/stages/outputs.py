"""Records every stage writes the same way: status events and malformed-input records."""

from __future__ import annotations

from pipeline import metrics
from pipeline.contracts import Contracts
from pipeline.contracts.records import Malformed, StatusEvent
from pipeline.runtime.records import Out, RawRecord


def status_out(
    contracts: Contracts,
    topic: str,
    event: StatusEvent,
    *,
    key: bytes | None = None,
    error_class: str = "",
    latency_s: float | None = None,
) -> Out:
    """The record of a status event, keyed by its notification unless ``key`` says
    otherwise, noted for the metrics."""
    note = metrics.Note(
        "status",
        event.status,
        event.channel or "",
        event.reason or "",
        error_class,
        latency_s,
        event.tenant_id or "",
    )
    if key is None:
        key = (event.notification_id or event.event_id).encode("utf-8")
    return Out(topic, key, contracts.status.encode(event), note=note)


def malformed(
    contracts: Contracts,
    topic: str,
    raw: RawRecord,
    reason: str,
    detail: str,
    now_ms: int,
    **decoded: str | None,
) -> Out:
    """A record for the malformed topic: raw bytes, reason and origin, keyed as received."""
    record = Malformed(
        reason=reason,
        detail=detail[:2000],
        origin_topic=raw.topic,
        origin_partition=raw.partition,
        origin_offset=raw.offset,
        origin_timestamp_ms=raw.timestamp_ms,
        raw_key=raw.key,
        raw_value=raw.value,
        recorded_at_ms=now_ms,
        **decoded,
    )
    note = metrics.Note("malformed", reason, raw.topic)
    return Out(topic, raw.key, contracts.malformed.encode(record), note=note)
