"""Intake: decode, validate, drop duplicates, fan out one record per recipient.

The decisions live in :class:`Intake` and work on any mutable mapping, so they are
unit-tested without Kafka; :mod:`pipeline.worker` runs them in a Faust agent
over the idempotency table.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, MutableMapping
from typing import Any

from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import Intent, Recipient, StatusEvent
from pipeline.errors import DecodeError, ValidationError
from pipeline.runtime.records import Out, RawRecord
from pipeline.settings import Settings
from pipeline.stages.context import StageContext
from pipeline.stages.outputs import malformed, status_out
from pipeline.topology import Catalog, TypeSpec, payload_type_error
from pipeline.topology.partitioning import partition_for
from pipeline.values import value_class

_PRODUCER_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_MAX_KEY_LEN = 256
_MAX_USER_ID_LEN = 128


@value_class
class ValidIntent:
    """An intent that passed validation, normalised for fingerprinting."""

    intent: Intent
    """The decoded envelope."""
    spec: TypeSpec
    """Its catalog entry."""
    recipients: tuple[str, ...]
    """Recipient user ids, de-duplicated, in the producer's order."""
    payload: dict[str, Any]
    """The parsed payload object."""
    priority: str
    """Effective priority (the type may raise it)."""


def validate(intent: Intent, catalog: Catalog, settings: Settings) -> ValidIntent:
    """Check ``intent`` against the contract and the catalog; ValidationError says why
    (the first rule it breaks)."""
    valid, problems = _check(intent, catalog, settings, every=False)
    if valid is None:
        raise problems[0]
    return valid


def check_all(
    intent: Intent, catalog: Catalog, settings: Settings
) -> tuple[ValidIntent | None, list[ValidationError]]:
    """The valid intent (None if any) and every rule ``intent`` breaks, for callers that
    answer at once (the HTTP intake); a rule that needs the type is checked only if it
    is known."""
    return _check(intent, catalog, settings, every=True)


class _FirstProblemError(Exception):
    """Stops the checks at the first problem when only the first is wanted."""


def _check(
    intent: Intent, catalog: Catalog, settings: Settings, *, every: bool
) -> tuple[ValidIntent | None, list[ValidationError]]:
    found: list[ValidationError] = []

    def fail(reason: str, detail: str) -> None:
        found.append(ValidationError(detail, reason=reason))
        if not every:
            raise _FirstProblemError

    try:
        spec = _check_envelope(intent, catalog, settings, fail)
        recipients = _check_recipients(intent, settings, fail)
        payload = _check_payload(intent, spec, settings, fail)
    except _FirstProblemError:
        return None, found
    if found or spec is None or payload is None:
        return None, found
    priority = spec.effective_priority(intent.priority)
    return ValidIntent(intent, spec, recipients, payload, priority), found


def _check_envelope(
    intent: Intent, catalog: Catalog, settings: Settings, fail: Callable[[str, str], None]
) -> TypeSpec | None:
    if not _PRODUCER_RE.match(intent.producer):
        fail("invalid_producer", f"producer {intent.producer!r} must match {_PRODUCER_RE.pattern}")
    if not intent.idempotency_key or len(intent.idempotency_key) > _MAX_KEY_LEN:
        fail("invalid_idempotency_key", f"idempotency_key must be 1..{_MAX_KEY_LEN} characters")
    spec = catalog.get(intent.notification_type)
    if spec is None:
        fail("unknown_notification_type", f"{intent.notification_type!r} is not in the catalog")
    elif intent.audience_kind not in spec.channels:
        fail(
            "audience_not_allowed",
            f"{spec.name} accepts audience {sorted(spec.channels)}, not {intent.audience_kind!r}",
        )
    if intent.occurred_at_ms <= 0:
        fail("invalid_occurred_at", "occurred_at_ms must be a positive epoch-millisecond time")
    return spec


def _check_recipients(
    intent: Intent, settings: Settings, fail: Callable[[str, str], None]
) -> tuple[str, ...]:
    recipients = tuple(dict.fromkeys(intent.recipient_user_ids))
    if intent.audience_kind == "user":
        if not recipients:
            fail("empty_recipients", "audience user needs at least one recipient_user_id")
        if any(not r or len(r) > _MAX_USER_ID_LEN for r in recipients):
            fail("invalid_recipient", f"recipient ids must be 1..{_MAX_USER_ID_LEN} characters")
        if len(recipients) > settings.max_recipients:
            fail(
                "too_many_recipients",
                f"{len(recipients)} recipients; at most {settings.max_recipients} per intent",
            )
    elif recipients:
        fail("unexpected_recipients", "audience admin_email takes no recipient_user_ids")
    return recipients


def _check_payload(
    intent: Intent, spec: TypeSpec | None, settings: Settings, fail: Callable[[str, str], None]
) -> dict[str, Any] | None:
    size = len(intent.payload_json.encode("utf-8"))
    if size > settings.payload_max_bytes:
        fail("payload_too_large", f"payload is {size} bytes; cap {settings.payload_max_bytes}")
        return None
    try:
        payload = json.loads(intent.payload_json)
    except ValueError as exc:
        fail("payload_not_json_object", f"payload_json is not JSON: {exc}")
        return None
    if not isinstance(payload, dict):
        fail("payload_not_json_object", "payload_json must be a JSON object")
        return None
    if "\\u" in intent.payload_json and _has_lone_surrogate(payload):
        # Valid JSON, but text no channel can send (it is not encodable as UTF-8).
        fail("payload_not_json_object", "payload_json escapes a lone surrogate (\\ud800-\\udfff)")
        return None
    if spec is None:
        return payload
    missing = [f for f in spec.required if payload.get(f) in (None, "")]
    if missing:
        fail("missing_payload_fields", f"{spec.name} requires {', '.join(missing)}")
    wrong = [
        f"{name} {problem}"
        for name, kind in spec.fields.items()
        if payload.get(name) not in (None, "")
        and (problem := payload_type_error(kind, payload[name])) is not None
    ]
    if wrong:
        fail("payload_field_type", f"{spec.name}: {'; '.join(wrong)}")
    return payload


def _has_lone_surrogate(payload: dict[str, Any]) -> bool:
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def fingerprint(valid: ValidIntent) -> str:
    """What makes two intents 'the same': everything but request_id, trace_id and the
    envelope version; recipient order and payload key order do not matter."""
    i = valid.intent
    canonical = json.dumps(
        [
            i.notification_type,
            i.producer,
            i.audience_kind,
            sorted(valid.recipients),
            i.idempotency_key,
            i.occurred_at_ms,
            i.tenant_id,
            i.priority,
            valid.payload,
        ],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Intake:
    """The intake decisions for one record (see the module docstring)."""

    def __init__(self, ctx: StageContext) -> None:
        settings = self._settings = ctx.settings
        self._contracts = ctx.contracts
        self._catalog = ctx.catalog
        topology = ctx.topology
        self.intents_topic = settings.topic("notification.intents")
        self.keyed_topic = settings.topic("notification.intents.keyed")
        self._malformed_topic = settings.topic("notification.intents.malformed")
        self._recipients_topic = settings.topic("notification.recipients")
        self._status_topic = settings.topic("notification.status")
        self._partitions = topology.spec("notification.intents").partitions
        self._window_ms = settings.idempotency_window_s * 1000

    def handle(self, raw: RawRecord, table: MutableMapping[bytes, Any], now_ms: int) -> list[Out]:
        """Every output for ``raw``; ``table`` is the idempotency table (key -> entry)."""
        try:
            intent = self._contracts.intent.decode(raw.value)
        except DecodeError as exc:
            return [self._malformed(raw, exc.reason, exc.detail, now_ms)]
        try:
            valid = validate(intent, self._catalog, self._settings)
        except ValidationError as exc:
            # Decoded far enough to say whose it was: the producer also learns of the
            # refusal where it follows its intents (the status topic, the API by
            # request_id), not only operators reading the malformed topic.
            origin = (raw.topic, raw.partition, raw.offset)
            return [
                self._malformed(raw, exc.reason, exc.detail, now_ms, intent),
                self._status(
                    intent, "rejected", None, now_ms, origin, reason=exc.reason, detail=exc.detail
                ),
            ]

        key = intent.idempotency_id.encode("utf-8")
        home = partition_for(key, self._partitions)
        if raw.topic == self.intents_topic and (raw.key != key or raw.partition != home):
            # The idempotency table is partitioned like the canonical key: an intent
            # written with another key or partitioner moves to its home partition first.
            return [Out(self.keyed_topic, key, raw.value, partition=home)]
        return self._deduplicate(raw, valid, key, table, now_ms)

    def _deduplicate(
        self,
        raw: RawRecord,
        valid: ValidIntent,
        key: bytes,
        table: MutableMapping[bytes, Any],
        now_ms: int,
    ) -> list[Out]:
        intent = valid.intent
        fp = fingerprint(valid)
        seen = table.get(key)
        if seen is not None and now_ms - int(seen["at"]) < self._window_ms:
            origin = (raw.topic, raw.partition, raw.offset)
            if seen["fp"] == fp:
                return [
                    self._status(
                        intent,
                        "duplicate",
                        seen["nid"],
                        now_ms,
                        origin,
                        detail="same intent already accepted",
                    )
                ]
            return [
                self._status(
                    intent,
                    "rejected_conflict",
                    None,
                    now_ms,
                    origin,
                    reason="idempotency_conflict",
                    detail=f"key already used by notification {seen['nid']} with different content",
                )
            ]

        nid = deterministic_id(intent.idempotency_id, fp)
        table[key] = {"fp": fp, "nid": nid, "at": now_ms}
        outputs = [self._status(intent, "accepted", nid, now_ms, None)]
        if valid.spec.produces_nothing:
            outputs.append(
                self._status(intent, "ignored", nid, now_ms, None, reason="type_produces_nothing")
            )
            return outputs
        outputs.extend(self._fan_out(raw, valid, nid, now_ms))
        return outputs

    def _fan_out(self, raw: RawRecord, valid: ValidIntent, nid: str, now_ms: int) -> list[Out]:
        intent = valid.intent
        # As the producer wrote it: validated, and equal as JSON to anything re-dumped.
        payload_json = intent.payload_json
        users: tuple[str | None, ...] = (
            valid.recipients if intent.audience_kind == "user" else (None,)
        )
        outputs = []
        for user_id in users:
            record = Recipient(
                notification_id=nid,
                notification_type=intent.notification_type,
                audience_kind=intent.audience_kind,
                user_id=user_id,
                producer=intent.producer,
                idempotency_key=intent.idempotency_key,
                occurred_at_ms=intent.occurred_at_ms,
                accepted_at_ms=now_ms,
                produced_at_ms=raw.timestamp_ms,
                priority=valid.priority,
                request_id=intent.request_id,
                trace_id=intent.trace_id,
                tenant_id=intent.tenant_id,
                payload_json=payload_json,
            )
            # Admin routes have no user: key them by notification so they spread out.
            route_key = (user_id or nid).encode("utf-8")
            outputs.append(
                Out(self._recipients_topic, route_key, self._contracts.recipient.encode(record))
            )
        return outputs

    def _status(
        self,
        intent: Intent,
        status: str,
        nid: str | None,
        now_ms: int,
        origin: tuple[str, int, int] | None,
        *,
        reason: str | None = None,
        detail: str | None = None,
    ) -> Out:
        # Repeats of one input record give one event id; distinct duplicates differ.
        event_id = deterministic_id(intent.idempotency_id, nid, status, *(origin or ()))
        event = StatusEvent(
            event_id=event_id,
            status=status,
            at_ms=now_ms,
            notification_id=nid,
            notification_type=intent.notification_type,
            producer=intent.producer,
            idempotency_key=intent.idempotency_key,
            reason=reason,
            detail=detail,
            request_id=intent.request_id,
            trace_id=intent.trace_id,
            tenant_id=intent.tenant_id,
        )
        key = (nid or intent.idempotency_id).encode("utf-8")
        return status_out(self._contracts, self._status_topic, event, key=key)

    def _malformed(
        self, raw: RawRecord, reason: str, detail: str, now_ms: int, intent: Intent | None = None
    ) -> Out:
        decoded: dict[str, str | None] = {}
        if intent is not None:
            decoded = {
                "producer": intent.producer,
                "idempotency_key": intent.idempotency_key,
                "notification_type": intent.notification_type,
            }
        return malformed(
            self._contracts, self._malformed_topic, raw, reason, detail, now_ms, **decoded
        )

    def expired_keys(self, table: MutableMapping[bytes, Any], now_ms: int) -> list[bytes]:
        """Keys whose window has passed (the sweep deletes them)."""
        return [k for k, v in list(table.items()) if now_ms - int(v["at"]) >= self._window_ms]

    def processing_error(self, raw: RawRecord, exc: Exception, now_ms: int) -> Out:
        """The malformed record for an unexpected failure on one input."""
        return self._malformed(raw, "processing_error", f"{type(exc).__name__}: {exc}", now_ms)
