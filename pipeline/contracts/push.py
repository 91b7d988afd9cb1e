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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from flatbuffers import number_types

from pipeline.contracts.fbs import notification_generated as fbs
from pipeline.errors import DecodeError, PushPayloadError
from pipeline.values import value_class

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


@value_class
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


@value_class
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
    try:
        return _encode(payload, entry[0], _BODY_LAYOUTS[payload.body_table])
    except (struct.error, TypeError, ValueError) as exc:  # e.g. an integer out of range
        raise PushPayloadError(f"{payload.body_table}: {exc}", reason="payload_invalid") from exc


# --- the encoder -------------------------------------------------------------------------
# encode() lays the buffer out itself: flatbuffers.Builder is pure Python and spends
# ~1,100 interpreted calls a push (Prep, Place, enforce_number per value), the push
# stage's largest cost; calling the generated Start/Add functions on it directly saved
# only ~15%. Each field's slot, scalar type and default are still read off those
# generated functions (_layout), so the bindings stay the only code that knows the
# schema; this code knows the FlatBuffers format alone, written front to back:
#
#   root offset, "HRLD" | vtable, Notification | vtable, Display | vtable, body table |
#   device_tokens vector | strings
#
# Offsets point forward (they are unsigned), each vtable precedes its table, every value
# sits at a multiple of its size, and what the Builder leaves out (a None string, a
# scalar equal to its default) is left out too. Everything up to the token vector
# depends only on which fields are there, so it is planned once per such shape (_plan)
# and a call only fills in the values.

#: The Builder method a generated Add function calls -> the field's number type
#: (None: a 4-byte offset to a string, table or vector).
_SLOT_TYPES: dict[str, Any] = {
    "PrependUOffsetTRelativeSlot": None,
    "PrependByteSlot": number_types.Uint8Flags,
    **{
        f"Prepend{name}Slot": getattr(number_types, f"{name}Flags")
        for name in (
            *("Bool", "Uint8", "Uint16", "Uint32", "Uint64"),
            *("Int8", "Int16", "Int32", "Int64", "Float32", "Float64"),
        )
    },
}


class _Probe:
    """Stands in for a Builder to record the last call a generated function makes."""

    def __init__(self) -> None:
        self.call: tuple[str, tuple[Any, ...]] = ("", ())

    def __getattr__(self, method: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.call = (method, args)

        return record


@dataclass(frozen=True, slots=True)
class _Layout:
    """One table's fields, as its generated Start/Add functions write them."""

    numfields: int
    children: tuple[tuple[str, int], ...]
    """(object-API attribute, slot) of each table or vector field."""
    texts: tuple[tuple[str, int], ...]
    """(attribute, slot) of each string field."""
    scalars: tuple[tuple[str, int, str, Any, Any], ...]
    """(attribute, slot, struct code, number type, default) of each scalar, widest first."""


def _layout(table: str, children: tuple[str, ...] = ()) -> _Layout:
    probe = _Probe()
    getattr(fbs, f"{table}Start")(probe)
    numfields = probe.call[1][0]
    offsets: list[tuple[str, int]] = []
    scalars: list[tuple[str, int, str, Any, Any]] = []
    for attribute in vars(getattr(fbs, f"{table}T")()):
        getattr(fbs, f"{table}Add{attribute[:1].upper()}{attribute[1:]}")(probe, 0)
        method, (slot, _, default) = probe.call
        kind = _SLOT_TYPES[method]
        if kind is None:
            offsets.append((attribute, slot))
        else:
            scalars.append((attribute, slot, kind.packer_type.format[-1], kind, default))
    scalars.sort(key=lambda scalar: -scalar[3].bytewidth)  # widest first: aligned in turn
    return _Layout(
        numfields,
        tuple(o for o in offsets if o[0] in children),
        tuple(o for o in offsets if o[0] not in children),
        tuple(scalars),
    )


_ENVELOPE = _layout("Notification", children=("display", "deviceTokens", "body"))
_DISPLAY = _layout("Display")
_BODY_LAYOUTS = {name: _layout(name) for name in BODY_TABLES}

_U32 = struct.Struct("<I")
#: A string's NUL terminator and the padding to the next multiple of 4, by length % 4.
_NUL_PAD = (b"\0" * 4, b"\0" * 3, b"\0" * 2, b"\0")
_attribute = lru_cache(maxsize=1024)(_camel)  # body keys repeat: convert each once


def _utf8(value: Any) -> bytes:
    # What Builder.CreateString takes: text, encoded strictly, or bytes as they are.
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise TypeError(f"non-string {type(value).__name__} for a string field")


def _values(
    layout: _Layout,
    given: Mapping[str, Any],
    texts: list[bytes],
    numbers: list[Any],
    shape: list[bool],
) -> None:
    """Adds the fields of ``layout`` from ``given`` (by attribute) to ``texts`` and
    ``numbers`` when written, and to ``shape`` whether they are."""
    for attribute, _ in layout.texts:
        value = given.get(attribute)
        shape.append(value is not None)
        if value is not None:
            texts.append(_utf8(value))
    for attribute, _, _, kind, default in layout.scalars:
        value = given.get(attribute, default)
        # As Builder.Prepend*Slot: the range checked (TypeError, e.g. "bad number -1 for
        # type uint32"), then a default left out.
        number_types.enforce_number(value, kind)
        written = value != default
        shape.append(written)
        if written:
            numbers.append(value)


@dataclass(frozen=True, slots=True)
class _Plan:
    """One shape of push up to its device token vector: a struct and its arguments."""

    head: struct.Struct
    args: tuple[Any, ...]
    """The constants, None where a call's values go."""
    numbers: tuple[int, ...]
    """The argument of each written number, in _values' order."""
    texts: tuple[tuple[int, int], ...]
    """(argument, position) of each string's offset, in _values' order."""


#: Where a call's value goes: ("text", n) or ("number", n), the offset of the nth string or
#: the nth number written; or ("to", table), an offset to a table (or vector) laid out.
_Marker = tuple[str, int | str]


class _Planner:
    """Lays out tables in turn: what goes where, as (struct code, constant or _Marker)
    by position."""

    def __init__(self, shape: tuple[bool, ...]) -> None:
        self.items: dict[int, tuple[str, Any]] = {0: ("I", ("to", "")), 4: ("4s", FILE_IDENTIFIER)}
        self.end = 8
        self.shape = iter(shape)
        self.texts = 0
        self.numbers = 0
        self.tables: dict[str, int] = {}

    def table(self, name: str, layout: _Layout) -> None:
        """Lays out the next table: ``name`` is the envelope field that refers to it ("":
        the root), its fields those ``layout`` has that the shape says are written."""
        refs: list[tuple[int, _Marker]] = [(slot, ("to", a)) for a, slot in layout.children]
        for _, slot in layout.texts:
            if next(self.shape):
                refs.append((slot, ("text", self.texts)))
                self.texts += 1
        scalars = []
        for _, slot, code, _, _ in layout.scalars:
            if next(self.shape):
                scalars.append((slot, code, ("number", self.numbers)))
                self.numbers += 1
        vtable = [0] * (layout.numfields + 2)
        at = 4  # past the table's signed offset to its vtable
        for slot, _ in refs:
            vtable[slot + 2] = at
            at += 4
        first_scalar = at
        for slot, code, _ in scalars:
            vtable[slot + 2] = at
            at += struct.calcsize(code)
        vtable[:2] = [2 * len(vtable), at]
        start = self.end
        for i, entry in enumerate(vtable):
            self.items[start + 2 * i] = ("H", entry)
        # The table at a multiple of 4, its first scalar at a multiple of its width (8 at
        # most): the narrower ones that follow are then aligned too.
        align = max(4, struct.calcsize(scalars[0][1]) if scalars else 4)
        end = start + 2 * len(vtable)
        pos = end + (-(end + first_scalar)) % align
        self.tables[name] = pos
        self.items[pos] = ("i", pos - start)
        for i, (_, marker) in enumerate(refs):
            self.items[pos + 4 + 4 * i] = ("I", marker)
        at = first_scalar
        for _, code, marker in scalars:
            self.items[pos + at] = (code, marker)
            at += struct.calcsize(code)
        self.end = pos + at + (-(pos + at)) % 4

    def plan(self) -> _Plan:
        self.tables["deviceTokens"] = self.end  # the vector follows the tables
        fmt = "<"
        args: list[Any] = []
        filled: dict[_Marker, tuple[int, int]] = {}  # a call's value: (argument, position)
        cursor = 0
        for pos, (code, value) in sorted(self.items.items()):
            fmt += f"{pos - cursor}x{code}"  # the gaps are padding: zeros
            cursor = pos + struct.calcsize(code)
            if isinstance(value, tuple):
                if value[0] == "to":
                    value = self.tables[str(value[1])] - pos
                else:
                    filled[value] = (len(args), pos)
                    value = None
            args.append(value)
        fmt += f"{self.end - cursor}x"
        return _Plan(
            struct.Struct(fmt),
            tuple(args),
            tuple(filled["number", n][0] for n in range(self.numbers)),
            tuple(filled["text", n] for n in range(self.texts)),
        )


@lru_cache(maxsize=1024)
def _plan(table: str, shape: tuple[bool, ...]) -> _Plan:
    """The layout of each push with body ``table`` whose fields are written as ``shape``
    says (envelope, display, then body: _values' order)."""
    planner = _Planner(shape)
    planner.table("", _ENVELOPE)
    planner.table("display", _DISPLAY)
    planner.table("body", _BODY_LAYOUTS[table])
    return planner.plan()


def _encode(payload: PushPayload, tag: int, body: _Layout) -> bytes:
    texts: list[bytes] = []
    numbers: list[Any] = []
    shape: list[bool] = []
    envelope = {
        "type": payload.notification_type,
        "notificationId": payload.notification_id,
        "occurredAtMs": payload.occurred_at_ms,
        "routeId": payload.route_id,
        "userId": payload.user_id,
        "locale": payload.locale,
        "expiresAtMs": payload.expires_at_ms,
        "priority": payload.priority,
        "bodyType": tag,
        "traceId": payload.trace_id,
    }
    _values(_ENVELOPE, envelope, texts, numbers, shape)
    display = payload.display
    shown = {
        "title": display.title,
        "body": display.body,
        "imageUrl": display.image_url,
        "link": display.link,
    }
    _values(_DISPLAY, shown, texts, numbers, shape)
    # As the object API's setattr: the last value for an attribute wins, others are ignored.
    _values(body, {_attribute(k): v for k, v in payload.body.items()}, texts, numbers, shape)
    plan = _plan(payload.body_table, tuple(shape))

    args = list(plan.args)
    for i, value in zip(plan.numbers, numbers, strict=True):
        args[i] = value
    tokens = [_utf8(token) for token in payload.device_tokens]
    vector = plan.head.size
    pos = vector + 4 + 4 * len(tokens)  # where the strings start
    parts: list[bytes] = [b"", b""]  # the head and the vector, once the offsets are known
    for (i, at), data in zip(plan.texts, texts, strict=True):
        args[i] = pos - at
        size = len(data)
        parts += (_U32.pack(size), data, _NUL_PAD[size & 3])
        pos += 8 + size - (size & 3)  # length, bytes, NUL, padding
    offsets = [len(tokens)]
    for at, data in enumerate(tokens, start=vector // 4 + 1):
        offsets.append(pos - 4 * at)
        size = len(data)
        parts += (_U32.pack(size), data, _NUL_PAD[size & 3])
        pos += 8 + size - (size & 3)
    parts[0] = plan.head.pack(*args)
    parts[1] = struct.pack(f"<{len(offsets)}I", *offsets)
    return b"".join(parts)


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
