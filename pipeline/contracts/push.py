"""Push payloads on the gateway topic: FlatBuffers (schemas/notification.fbs), typed.

The generated bindings (:mod:`pipeline.contracts.fbs`, from ``make fbs``) are the only
code that knows the wire format; this module gives them types and one rule: a body
field carries the intent payload field of the same name, converted to the field's type.
Body tables hold strings and scalars only (a rule of the schema), so each table's
fields and their kinds can be read off its object-API class: a string field defaults
to None, an integer to 0, a float to 0.0, a bool to False.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import flatbuffers

from pipeline.contracts.fbs import notification_generated as fbs
from pipeline.errors import DecodeError, PushPayloadError

#: The schema's file_identifier: the first thing a reader checks.
FILE_IDENTIFIER = b"HRLD"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _body_tables() -> dict[str, tuple[int, dict[str, type]]]:
    """Union member name -> (union tag, {snake_case field: kind})."""
    tables: dict[str, tuple[int, dict[str, type]]] = {}
    for name, tag in vars(fbs.Body).items():
        if name.startswith("_") or name == "NONE" or not isinstance(tag, int):
            continue
        defaults = vars(getattr(fbs, f"{name}T")())
        kinds = {_snake(a): str if v is None else type(v) for a, v in defaults.items()}
        tables[name] = (tag, kinds)
    return tables


#: Every body table of the schema, by name: its union tag and its fields' kinds.
BODY_TABLES = _body_tables()
_TABLE_BY_TAG = {tag: name for name, (tag, _) in BODY_TABLES.items()}


@dataclass(frozen=True, slots=True)
class Display:
    """What the client shows."""

    title: str
    """One line."""
    body: str
    """The message text."""
    image_url: str | None = None
    """An https image, when the type has one."""
    link: str | None = None
    """Deep link opened on tap, when the type has one."""


@dataclass(frozen=True, slots=True)
class PushPayload:
    """One push: what Herald encodes for the gateway, or what a reader decoded."""

    notification_type: str
    """The catalog type."""
    notification_id: str
    """The accepted notification."""
    route_id: str
    """Herald's delivery id of this push (the gateway deduplicates by it)."""
    user_id: str
    """The recipient, and the record key."""
    body_table: str
    """The body's FlatBuffers table (see BODY_TABLES)."""
    body: dict[str, Any]
    """The body's fields by their schema (snake_case) names."""
    display: Display
    """Title, text, image and link."""
    occurred_at_ms: int = 0
    """When the domain event happened."""
    locale: str = "en"
    """The language of the display texts."""
    expires_at_ms: int = 0
    """When the push goes stale (0: never)."""
    priority: str = "normal"
    """critical, high, normal or low."""
    device_tokens: list[str] = field(default_factory=list)
    """The user's push tokens."""
    trace_id: str | None = None
    """The producer's trace id."""


def body_from_variables(table: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The body fields of ``table`` taken from a route's variables, converted to the
    fields' kinds; PushPayloadError (payload_invalid) when a value does not fit."""
    fields = BODY_TABLES[table][1]
    body: dict[str, Any] = {}
    for name, kind in fields.items():
        if name not in variables or variables[name] is None:
            continue  # optional in the schema; the catalog's required fields were checked
        value = variables[name]
        try:
            body[name] = _convert(value, kind)
        except (TypeError, ValueError) as exc:
            raise PushPayloadError(
                f"{table}.{name}: {value!r} is not {_KIND_NAMES[kind]} ({exc})",
                reason="payload_invalid",
            ) from exc
    return body


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _convert(value: Any, kind: type) -> Any:
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"got {type(value).__name__}")
        return str(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"got {type(value).__name__}")
        return value
    if isinstance(value, bool):
        raise TypeError("got bool")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return int(value)  # a numeric string is accepted, anything else raises
    return float(value)


def encode(payload: PushPayload) -> bytes:
    """The FlatBuffers bytes of ``payload``; PushPayloadError when a value does not fit
    its field (an integer out of range, an unknown body table)."""
    entry = BODY_TABLES.get(payload.body_table)
    if entry is None:
        raise PushPayloadError(
            f"no FlatBuffers table {payload.body_table!r}", reason="push_type_unmapped"
        )
    tag, _ = entry
    body = getattr(fbs, f"{payload.body_table}T")()
    for name, value in payload.body.items():
        setattr(body, _camel(name), value)
    envelope = fbs.NotificationT()
    envelope.type = payload.notification_type
    envelope.notificationId = payload.notification_id
    envelope.routeId = payload.route_id
    envelope.userId = payload.user_id
    envelope.occurredAtMs = payload.occurred_at_ms
    envelope.locale = payload.locale
    envelope.expiresAtMs = payload.expires_at_ms
    envelope.priority = payload.priority
    envelope.display = fbs.DisplayT(
        title=payload.display.title,
        body=payload.display.body,
        imageUrl=payload.display.image_url,
        link=payload.display.link,
    )
    envelope.deviceTokens = list(payload.device_tokens)
    envelope.bodyType = tag
    envelope.body = body
    envelope.traceId = payload.trace_id
    builder = flatbuffers.Builder(512)
    try:
        builder.Finish(envelope.Pack(builder), FILE_IDENTIFIER)
    except (struct.error, TypeError, ValueError) as exc:  # e.g. an integer out of range
        raise PushPayloadError(f"{payload.body_table}: {exc}", reason="payload_invalid") from exc
    return bytes(builder.Output())


def _text(value: str | bytes) -> str:
    # The object API decodes string fields, not strings inside vectors.
    return value.decode("utf-8") if isinstance(value, bytes) else value


def decode(data: bytes | None) -> PushPayload:
    """A gateway record read back; DecodeError when it is not a Herald push."""
    if not data or len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise DecodeError("not a Herald push buffer (file identifier HRLD)", reason="undecodable")
    try:
        envelope = fbs.NotificationT.InitFromPackedBuf(data, 0)
        table = _TABLE_BY_TAG.get(envelope.bodyType)
        if table is None:
            raise DecodeError(f"unknown body type {envelope.bodyType}", reason="undecodable")
        body = {_snake(k): v for k, v in vars(envelope.body).items()}
        display = envelope.display or fbs.DisplayT()
        return PushPayload(
            notification_type=envelope.type,
            notification_id=envelope.notificationId,
            route_id=envelope.routeId,
            user_id=envelope.userId,
            body_table=table,
            body=body,
            display=Display(
                title=display.title or "",
                body=display.body or "",
                image_url=display.imageUrl,
                link=display.link,
            ),
            occurred_at_ms=envelope.occurredAtMs,
            locale=envelope.locale or "",
            expires_at_ms=envelope.expiresAtMs,
            priority=envelope.priority or "",
            device_tokens=[_text(t) for t in envelope.deviceTokens or []],
            trace_id=envelope.traceId,
        )
    except DecodeError:
        raise
    except Exception as exc:  # a corrupt buffer fails in many ways inside the bindings
        raise DecodeError(f"corrupt push buffer: {exc}", reason="undecodable") from exc
