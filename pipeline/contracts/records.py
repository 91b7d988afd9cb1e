"""The records Herald reads and writes, one dataclass per Avro schema in schemas/.

Field names and order follow the .avsc files exactly, so ``to_avro`` and
``from_avro`` are plain dict conversions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Self

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Field names of each record class, in schema order.
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


class AvroRecord:
    """Mixin: conversion to and from the dicts fastavro reads and writes."""

    __slots__ = ()
    #: File in schemas/ that describes this record.
    SCHEMA_FILE: ClassVar[str]

    def to_avro(self) -> dict[str, Any]:
        """The record as a dict for fastavro."""
        names = _FIELD_NAMES.get(type(self))
        if names is None:  # dataclasses.fields() per record costs more than the dict
            names = _FIELD_NAMES[type(self)] = tuple(
                f.name
                for f in dataclasses.fields(self)  # type: ignore[arg-type]
            )
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        """Build the record from a dict fastavro decoded with this record's schema."""
        return cls(**data)


@dataclass(slots=True, kw_only=True)
class Intent(AvroRecord):
    """A producer's request to notify recipients (schemas/intent.avsc)."""

    SCHEMA_FILE: ClassVar[str] = "intent.avsc"

    notification_type: str
    """Catalog type, e.g. ``game.turn.ready``."""
    producer: str
    """Stable id of the publishing service."""
    audience_kind: str
    """``user`` or ``admin_email``."""
    idempotency_key: str
    """Unique per producer for one logical notification."""
    occurred_at_ms: int
    """When the domain event happened (epoch ms)."""
    recipient_user_ids: list[str] = field(default_factory=list)
    """User ids for audience ``user``; empty for ``admin_email``."""
    request_id: str | None = None
    """Caller's request id (not fingerprinted)."""
    trace_id: str | None = None
    """Trace id (not fingerprinted)."""
    tenant_id: str | None = None
    """Tenant that owns the notification."""
    priority: str = "normal"
    """critical, high, normal or low."""
    payload_json: str = "{}"
    """The type's variables as a JSON object."""
    schema_version: int = 1
    """Envelope version."""

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        occurred = data["occurred_at_ms"]
        if isinstance(occurred, datetime):  # fastavro applies the timestamp-millis type
            data = {**data, "occurred_at_ms": (occurred - _EPOCH) // timedelta(milliseconds=1)}
        return cls(**data)

    @property
    def idempotency_id(self) -> str:
        """The idempotency table key and the Kafka key of the intent."""
        return intent_key(self.producer, self.idempotency_key)


def intent_key(producer: str, idempotency_key: str) -> str:
    """Kafka key of an intent. Unambiguous because producer ids cannot contain ':'."""
    return f"{producer}:{idempotency_key}"


@dataclass(slots=True, kw_only=True)
class Recipient(AvroRecord):
    """One accepted intent for one recipient (schemas/recipient.avsc)."""

    SCHEMA_FILE: ClassVar[str] = "recipient.avsc"

    notification_id: str
    """Deterministic id of the accepted intent."""
    notification_type: str
    """Catalog type."""
    audience_kind: str
    """``user``, or ``admin_email`` for the admin route."""
    producer: str
    """Publishing service."""
    idempotency_key: str
    """Producer's key."""
    occurred_at_ms: int
    """When the domain event happened."""
    accepted_at_ms: int
    """When intake accepted the intent."""
    payload_json: str
    """Validated variables (JSON object)."""
    user_id: str | None = None
    """The recipient; None on the admin route."""
    produced_at_ms: int = 0
    """Kafka timestamp of the intent record."""
    priority: str = "normal"
    """critical, high, normal or low."""
    request_id: str | None = None
    """Caller's request id."""
    trace_id: str | None = None
    """Trace id."""
    tenant_id: str | None = None
    """Tenant."""


@dataclass(slots=True, kw_only=True)
class StatusEvent(AvroRecord):
    """One state change of a notification or route (schemas/status_event.avsc)."""

    SCHEMA_FILE: ClassVar[str] = "status_event.avsc"

    event_id: str
    """Deterministic id of the change; consumers dedupe on it."""
    status: str
    """The new state (see docs/status-vocabulary in README)."""
    at_ms: int
    """When it happened."""
    notification_id: str | None = None
    """The notification, when one was accepted."""
    notification_type: str | None = None
    """Catalog type."""
    producer: str | None = None
    """Publishing service."""
    idempotency_key: str | None = None
    """Producer's key."""
    route_id: str | None = None
    """Route, for route-level changes."""
    channel: str | None = None
    """email or push, for route-level changes."""
    user_id: str | None = None
    """Recipient user id."""
    attempt: int = 0
    """Delivery attempt number."""
    reason: str | None = None
    """Machine-readable reason."""
    detail: str | None = None
    """Human-readable detail."""
    request_id: str | None = None
    """Caller's request id."""
    trace_id: str | None = None
    """Trace id."""
    tenant_id: str | None = None
    """The tenant that owns the notification, when Herald is shared."""
    template_version: str | None = None
    """The template version (content hash) a route rendered, on its rendered, sent and
    published events."""

    @classmethod
    def of_route(
        cls,
        request: ChannelRequest,
        status: str,
        at_ms: int,
        *,
        event_id: str,
        attempt: int = 0,
        reason: str | None = None,
        detail: str | None = None,
        template_version: str | None = None,
    ) -> StatusEvent:
        """An event about one route, carrying the route's ids (detail cut to 2,000)."""
        return cls(
            event_id=event_id,
            status=status,
            at_ms=at_ms,
            notification_id=request.notification_id,
            notification_type=request.notification_type,
            route_id=request.route_id,
            channel=request.channel,
            user_id=request.user_id,
            attempt=attempt,
            reason=reason,
            detail=detail[:2000] if detail else None,
            request_id=request.request_id,
            trace_id=request.trace_id,
            tenant_id=request.tenant_id,
            template_version=template_version,
        )


@dataclass(slots=True, kw_only=True)
class Malformed(AvroRecord):
    """A record Herald could not accept, with its bytes, reason and origin."""

    SCHEMA_FILE: ClassVar[str] = "malformed.avsc"

    reason: str
    """Machine-readable reason."""
    detail: str
    """Human-readable explanation."""
    origin_topic: str
    """Topic it was read from."""
    origin_partition: int
    """Its partition."""
    origin_offset: int
    """Its offset."""
    recorded_at_ms: int
    """When Herald recorded it."""
    origin_timestamp_ms: int = 0
    """Its Kafka timestamp."""
    raw_key: bytes | None = None
    """Its key as received."""
    raw_value: bytes | None = None
    """Its value as received."""
    producer: str | None = None
    """Producer, if it decoded far enough."""
    idempotency_key: str | None = None
    """Idempotency key, if it decoded far enough."""
    notification_type: str | None = None
    """Type, if it decoded far enough."""


@dataclass(slots=True, kw_only=True)
class PushDevice:
    """A device registered for push."""

    token: str
    """Device push token."""
    platform: str = "unknown"
    """ios, android, web or unknown."""


@dataclass(slots=True, kw_only=True)
class DeviceFeedback(AvroRecord):
    """The gateway's report that a push token no longer works (schemas/device_feedback.avsc)."""

    SCHEMA_FILE: ClassVar[str] = "device_feedback.avsc"

    user_id: str
    """The user the token was registered for."""
    token: str
    """The device push token."""
    reason: str = "invalid_token"
    """invalid_token, unregistered, expired, or the push service's own code."""
    platform: str | None = None
    """ios, android, web or unknown."""
    reported_at_ms: int = 0
    """When the gateway learned it."""


@dataclass(slots=True, kw_only=True)
class QuietHours:
    """A daily window, in the user's timezone, when non-critical routes wait."""

    start: str
    """Local start, HH:MM."""
    end: str
    """Local end, HH:MM; earlier than start means overnight."""


@dataclass(slots=True, kw_only=True)
class UserProfile(AvroRecord):
    """A user as the user service publishes it (schemas/user_profile.avsc)."""

    SCHEMA_FILE: ClassVar[str] = "user_profile.avsc"

    user_id: str
    """The user."""
    email: str | None = None
    """Email address; None means no email channel."""
    preferred_language: str | None = None
    """BCP 47 language; unsupported or None falls back to en."""
    timezone: str | None = None
    """IANA timezone; None means UTC."""
    tenant_id: str | None = None
    """Tenant."""
    push_devices: list[PushDevice] = field(default_factory=list)
    """Devices registered for push."""
    channels_disabled: list[str] = field(default_factory=list)
    """Channels turned off entirely."""
    opt_outs: list[str] = field(default_factory=list)
    """Opted-out types or categories, optionally per channel (``email:game``)."""
    quiet_hours: QuietHours | None = None
    """Quiet window, or None."""
    updated_at_ms: int = 0
    """When the user service changed the profile."""
    contacts: dict[str, str] = field(default_factory=dict)
    """Addresses of the other channels by channel name (sms, webhook, slack)."""

    def to_avro(self) -> dict[str, Any]:
        data = AvroRecord.to_avro(self)
        data["push_devices"] = [dataclasses.asdict(d) for d in self.push_devices]
        data["quiet_hours"] = dataclasses.asdict(self.quiet_hours) if self.quiet_hours else None
        return data

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        data = dict(data)
        data["push_devices"] = [PushDevice(**d) for d in data.get("push_devices", [])]
        quiet = data.get("quiet_hours")
        data["quiet_hours"] = QuietHours(**quiet) if quiet else None
        return cls(**data)


@dataclass(slots=True, kw_only=True)
class ChannelRequest(AvroRecord):
    """One route on one channel, self-sufficient for delivery (schemas/channel_request.avsc)."""

    SCHEMA_FILE: ClassVar[str] = "channel_request.avsc"

    route_id: str
    """Deterministic id of (notification, channel, recipient)."""
    notification_id: str
    """The accepted notification."""
    notification_type: str
    """Catalog type."""
    channel: str
    """email or push."""
    template_id: str
    """Template directory (== notification_type)."""
    user_id: str | None = None
    """Recipient user; None on the admin route."""
    address: str | None = None
    """Email address (email routes)."""
    device_tokens: list[str] = field(default_factory=list)
    """Push tokens (push routes)."""
    locale: str = "en"
    """Resolved locale."""
    locale_fallback: bool = False
    """True when en replaced an unsupported preferred language."""
    variables_json: str = "{}"
    """Template variables (JSON object)."""
    priority: str = "normal"
    """critical, high, normal or low."""
    deadline_ms: int = 0
    """After this the route is expired (0: none)."""
    due_at_ms: int = 0
    """Not to be attempted before this moment."""
    attempt: int = 0
    """Attempts made so far."""
    occurred_at_ms: int = 0
    """When the domain event happened."""
    produced_at_ms: int = 0
    """When the intent was produced."""
    request_id: str | None = None
    """Caller's request id."""
    trace_id: str | None = None
    """Trace id."""
    tenant_id: str | None = None
    """Tenant."""
    payload_mode: str = "template"
    """``template`` (render template_id with variables) or ``rendered`` (use content)."""
    content: RenderedContent | None = None
    """The mail itself, for payload_mode ``rendered``."""
    attachments: list[Attachment] = field(default_factory=list)
    """Files attached to the mail (both modes)."""
    attempts: list[Attempt] = field(default_factory=list)
    """Every attempt so far, oldest first."""
    replay_of: str | None = None
    """The dead letter this route was replayed from, if any."""
    template_version: str | None = None
    """Render this template version (a resend of what the original rendered, from the
    template archive); None: the version deployed now."""

    def record_key(self) -> bytes:
        """The key of this route's records: its user_id, or (routes without a user) its
        lower-cased address, so every copy of a route shares a partition."""
        return (self.user_id or (self.address or "").strip().lower()).encode("utf-8")

    def to_avro(self) -> dict[str, Any]:
        data = AvroRecord.to_avro(self)
        data["content"] = dataclasses.asdict(self.content) if self.content else None
        data["attachments"] = [dataclasses.asdict(a) for a in self.attachments]
        data["attempts"] = [dataclasses.asdict(a) for a in self.attempts]
        return data

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        data = dict(data)
        content = data.get("content")
        data["content"] = RenderedContent(**content) if content else None
        data["attachments"] = [Attachment(**a) for a in data.get("attachments", [])]
        data["attempts"] = [Attempt(**a) for a in data.get("attempts", [])]
        return cls(**data)


@dataclass(slots=True, kw_only=True)
class RenderedContent:
    """A mail its producer rendered already (payload_mode ``rendered``)."""

    subject: str
    """Subject line; line breaks are folded into spaces."""
    text: str
    """Plain-text body."""
    html: str | None = None
    """Optional HTML body (sent as multipart/alternative with the text)."""


@dataclass(slots=True, kw_only=True)
class Attachment:
    """A file attached to a mail."""

    filename: str
    """File name shown to the recipient."""
    data: bytes
    """The file's bytes."""
    content_type: str = "application/octet-stream"
    """MIME type."""


@dataclass(slots=True, kw_only=True)
class Attempt:
    """One delivery attempt of a route."""

    number: int
    """1 for the first attempt."""
    at_ms: int
    """When the attempt ended (epoch ms)."""
    outcome: str
    """accepted, suppressed, transient or permanent."""
    reason: str
    """Machine-readable reason (smtp_deferred, smtp_rejected, render_failed, ...)."""
    code: int | None = None
    """SMTP reply code, when there was one."""
    message: str = ""
    """The server's reply or the error, truncated."""


@dataclass(slots=True, kw_only=True)
class DeadLetter(AvroRecord):
    """A route Herald gave up on, with its history (schemas/dead_letter.avsc)."""

    SCHEMA_FILE: ClassVar[str] = "dead_letter.avsc"

    dead_letter_id: str
    """Deterministic id (route and final attempt); replay tools dedupe on it."""
    channel: str
    """email or push."""
    route_id: str
    """The route."""
    notification_id: str
    """The notification."""
    notification_type: str
    """Catalog type."""
    reason: str
    """``permanent_failure`` or ``budget_exhausted``."""
    error_class: str
    """Last attempt's class: transient or permanent."""
    last_reason: str
    """Last attempt's machine-readable reason."""
    last_error: str
    """Last error message."""
    dead_lettered_at_ms: int
    """When the route was dead-lettered."""
    origin_topic: str
    """The lane topic the route was read from (where a replay sends it)."""
    request: bytes
    """The ChannelRequest in the Confluent wire format, history included."""
    user_id: str | None = None
    """Recipient user (None on admin routes)."""
    address: str | None = None
    """Email address (email routes)."""
    last_code: int | None = None
    """Last SMTP reply code, when there was one."""
    attempts: list[Attempt] = field(default_factory=list)
    """Every attempt, oldest first."""
    truncated: str | None = None
    """What was cut so that the letter fits its topic (None: nothing); the carried
    request lacks it."""

    def to_avro(self) -> dict[str, Any]:
        data = AvroRecord.to_avro(self)
        data["attempts"] = [dataclasses.asdict(a) for a in self.attempts]
        return data

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        data = dict(data)
        data["attempts"] = [Attempt(**a) for a in data.get("attempts", [])]
        return cls(**data)
