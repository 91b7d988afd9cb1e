"""encode() writes FlatBuffers itself rather than through flatbuffers.Builder: every body
table's fields read back unchanged with decode() and with the plain generated readers,
every buffer passes the checks of a FlatBuffers verifier, and values are refused exactly
as the generated object API (the encoder it replaced, kept here as the reference)
refused them."""

from __future__ import annotations

import re
import struct
from dataclasses import asdict, replace
from typing import Any

import flatbuffers
import pytest

from pipeline.contracts import push
from pipeline.contracts.fbs import notification_generated as fbs
from pipeline.contracts.push import BODY_TABLES, Display, PushPayload
from pipeline.errors import PushPayloadError
from pipeline.settings import REPO_ROOT

UNICODE = "Ünïcødé ✓ 日本語 🚀"


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def builder_encode(payload: PushPayload) -> bytes:
    """The encoding encode() replaced: the generated object API on a Builder."""
    if payload.body_table not in BODY_TABLES:
        raise PushPayloadError("no table", reason="push_type_unmapped")
    body = getattr(fbs, f"{payload.body_table}T")()
    for name, value in payload.body.items():
        setattr(body, camel(name), value)
    shown = payload.display
    envelope = fbs.NotificationT(
        type=payload.notification_type,
        notificationId=payload.notification_id,
        occurredAtMs=payload.occurred_at_ms,
        routeId=payload.route_id,
        userId=payload.user_id,
        locale=payload.locale,
        expiresAtMs=payload.expires_at_ms,
        priority=payload.priority,
        display=fbs.DisplayT(shown.title, shown.body, shown.image_url, shown.link),
        deviceTokens=list(payload.device_tokens),
        bodyType=BODY_TABLES[payload.body_table][0],
        body=body,
        traceId=payload.trace_id,
    )
    builder = flatbuffers.Builder(512)
    try:
        builder.Finish(envelope.Pack(builder), push.FILE_IDENTIFIER)
    except (struct.error, TypeError, ValueError) as exc:
        raise PushPayloadError(str(exc), reason="payload_invalid") from exc
    return bytes(builder.Output())


# --- a verifier, from the schema ------------------------------------------------------

SCHEMA = (REPO_ROOT / "schemas" / "notification.fbs").read_text()
WIDTHS = {"bool": 1, "ubyte": 1, "union_type": 1, "uint32": 4, "int64": 8}
UNION, MEMBERS = re.findall(r"^union (\w+) \{(.*?)\}", SCHEMA, re.M | re.S)[0]
#: Union tag -> member table.
UNION_TABLES = dict(enumerate(re.findall(r"\w+", MEMBERS), start=1))


def schema_slots() -> dict[str, list[str]]:
    """Table -> the type in each vtable slot (a union field takes two: tag, table)."""
    tables: dict[str, list[str]] = {}
    for name, block in re.findall(r"^table (\w+) \{(.*?)^\}", SCHEMA, re.M | re.S):
        tables[name] = []
        for kind in re.findall(r"^\s+\w+:\s*([\w\[\]]+)", block, re.M):
            tables[name] += ["union_type", "union"] if kind == UNION else [kind]
    return tables


SLOTS = schema_slots()


def verify(data: bytes) -> None:
    """What flatbuffers::Verifier checks of a Notification buffer: every offset inside
    the buffer (and pointing forward), every value at a multiple of its width, vtables
    that fit their tables, strings that end in NUL; AssertionError otherwise."""

    def u32(pos: int) -> int:
        assert pos % 4 == 0, f"offset at {pos} misaligned"
        assert 0 <= pos <= len(data) - 4, f"offset at {pos} outside the buffer"
        return int.from_bytes(data[pos : pos + 4], "little")

    def ref(pos: int) -> int:
        target = pos + u32(pos)
        assert pos < target < len(data), f"offset at {pos} points to {target}"
        return target

    def string(pos: int) -> None:
        start = ref(pos)
        end = start + 4 + u32(start)
        assert end < len(data), f"string at {start} overruns"
        assert data[end] == 0, f"string at {start} not NUL-terminated"

    def table(pos: int, name: str) -> None:
        assert pos % 4 == 0, f"{name} at {pos} misaligned"
        assert 0 <= pos <= len(data) - 4, f"{name} at {pos} outside the buffer"
        vtable = pos - struct.unpack_from("<i", data, pos)[0]
        assert vtable % 2 == 0, f"{name} vtable at {vtable} misaligned"
        assert 0 <= vtable <= len(data) - 4, f"{name} vtable at {vtable} outside the buffer"
        vtable_size, size = struct.unpack_from("<HH", data, vtable)
        assert vtable_size % 2 == 0, f"{name} vtable of {vtable_size} bytes"
        assert 4 <= vtable_size <= len(data) - vtable, f"{name} vtable overruns"
        assert 4 <= size <= len(data) - pos, f"{name} of {size} bytes overruns"
        tag = 0
        for slot, kind in enumerate(SLOTS[name][: (vtable_size - 4) // 2]):
            offset = struct.unpack_from("<H", data, vtable + 4 + 2 * slot)[0]
            if not offset:
                continue
            width = WIDTHS.get(kind, 4)  # anything else is a 4-byte offset
            field = pos + offset
            assert offset + width <= size, f"{name} slot {slot} outside its table"
            assert field % width == 0, f"{name} slot {slot} misaligned"
            if kind == "union_type":
                tag = data[field]
            elif kind == "union":
                table(ref(field), UNION_TABLES[tag])
            elif kind == "string":
                string(field)
            elif kind == "[string]":
                vector = ref(field)
                for i in range(u32(vector)):
                    string(vector + 4 + 4 * i)
            elif kind in SLOTS:
                table(ref(field), kind)

    assert data[4:8] == push.FILE_IDENTIFIER
    table(u32(0), "Notification")


# --- payloads -----------------------------------------------------------------------


def full(table: str) -> PushPayload:
    """Every field set, strings of every length % 4 (the padding), unicode, large numbers."""
    kinds = BODY_TABLES[table][1]
    texts = iter(["g-1", UNICODE, "abcd", "ab", "🚀"])
    body = {n: (4_000_000_000 if kind is int else next(texts)) for n, kind in kinds.items()}
    return PushPayload(
        notification_type="game.turn.ready",
        notification_id="0f8e7d6c-5b4a-3928-1716-050403020100",
        route_id="a1b2c3d4-e5f6-5789-8abc-def012345678",
        user_id=f"user-{UNICODE}",
        body_table=table,
        body=body,
        display=Display(
            title=f"{UNICODE}: your turn",
            body="Turn 42 is ready.",
            image_url="https://cdn.example/i.png",
            link="andromeda://games/7",
        ),
        occurred_at_ms=-(2**63),
        locale="pt-BR",
        expires_at_ms=2**63 - 1,
        priority="critical",
        device_tokens=["tok-a", "", UNICODE, "x" * 301],
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )


def sparse(table: str) -> PushPayload:
    """As little as there can be: no body fields, no tokens, None and empty strings."""
    return replace(
        full(table),
        body={},
        display=Display(title="", body=""),
        occurred_at_ms=0,
        locale="",
        expires_at_ms=0,
        priority="",
        device_tokens=[],
        trace_id=None,
    )


def zeros(table: str) -> PushPayload:
    """Body strings empty or None, numbers 0 (left out, as defaults), one token."""
    kinds = BODY_TABLES[table][1]
    strings = [n for n, kind in kinds.items() if kind is str]
    body: dict[str, Any] = {n: 0 for n, kind in kinds.items() if kind is int}
    body |= {n: ("" if i % 2 else None) for i, n in enumerate(strings)}
    shown = Display(title="t", body="", image_url=None, link="")
    return replace(full(table), body=body, display=shown, device_tokens=["é"], trace_id="")


VARIANTS = [full, sparse, zeros]
CASES = [(t, v) for t in sorted(BODY_TABLES) for v in VARIANTS]


def expected(payload: PushPayload) -> PushPayload:
    """``payload`` as decode() reads it back: every body field, defaults for the unset."""
    defaults = {str: None, int: 0, float: 0.0, bool: False}
    kinds = BODY_TABLES[payload.body_table][1]
    body = {
        n: defaults[kind] if payload.body.get(n) is None else payload.body[n]
        for n, kind in kinds.items()
    }
    return replace(payload, body=body)


# --- tests --------------------------------------------------------------------------


def test_the_schema_verifier_knows_every_table_and_refuses_a_broken_buffer() -> None:
    assert set(UNION_TABLES.values()) == set(BODY_TABLES) <= set(SLOTS)
    data = push.encode(full("GameTurnReady"))
    verify(data)
    link = data.index(b"andromeda://games/7")  # a string, after its 4-byte length
    root = int.from_bytes(data[:4], "little")
    vtable = root - struct.unpack_from("<i", data, root)[0]
    for broken in (
        b"\x02" + data[1:],  # the root offset misaligned
        len(data).to_bytes(4, "little") + data[4:],  # the root past the end
        data[:vtable] + b"\xfe\xff" + data[vtable + 2 :],  # the root's vtable overruns
        data[: link - 4] + b"\xff\x00\x00\x00" + data[link:],  # a string overruns
        data[: link + 19] + b"x" + data[link + 20 :],  # a string's NUL overwritten
    ):
        with pytest.raises(AssertionError):
            verify(broken)


@pytest.mark.parametrize(("table", "variant"), CASES, ids=[f"{t}-{v.__name__}" for t, v in CASES])
def test_every_field_round_trips(table: str, variant: Any) -> None:
    payload: PushPayload = variant(table)
    data = push.encode(payload)
    verify(data)
    assert push.decode(data) == expected(payload)
    # The buffer the Builder made reads back the same.
    assert push.decode(builder_encode(payload)) == expected(payload)


@pytest.mark.parametrize(("table", "variant"), CASES, ids=[f"{t}-{v.__name__}" for t, v in CASES])
def test_the_plain_generated_reader_sees_every_field(table: str, variant: Any) -> None:
    payload: PushPayload = variant(table)
    data = push.encode(payload)

    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode()

    assert fbs.Notification.NotificationBufferHasIdentifier(data, 0)
    envelope = fbs.Notification.GetRootAs(data, 0)
    assert text(envelope.Type()) == payload.notification_type
    assert text(envelope.NotificationId()) == payload.notification_id
    assert text(envelope.RouteId()) == payload.route_id
    assert text(envelope.UserId()) == payload.user_id
    assert envelope.OccurredAtMs() == payload.occurred_at_ms
    assert text(envelope.Locale()) == payload.locale
    assert envelope.ExpiresAtMs() == payload.expires_at_ms
    assert text(envelope.Priority()) == payload.priority
    assert text(envelope.TraceId()) == payload.trace_id
    assert not envelope.DeviceTokensIsNone()
    tokens = [envelope.DeviceTokens(i).decode() for i in range(envelope.DeviceTokensLength())]
    assert tokens == payload.device_tokens
    display = envelope.Display()
    assert text(display.Title()) == payload.display.title
    assert text(display.Body()) == payload.display.body
    assert text(display.ImageUrl()) == payload.display.image_url
    assert text(display.Link()) == payload.display.link
    assert envelope.BodyType() == getattr(fbs.Body, table) == BODY_TABLES[table][0]
    body = getattr(fbs, table)()
    union = envelope.Body()
    body.Init(union.Bytes, union.Pos)
    for name, value in expected(payload).body.items():
        read = getattr(body, camel(name)[:1].upper() + camel(name)[1:])()
        assert (text(read) if isinstance(read, bytes) else read) == value, name


def test_payloads_of_every_shape_in_turn_read_back() -> None:
    """Layouts are planned once per shape of push and reused: interleave them."""
    payloads = [variant(table) for variant in VARIANTS for table in sorted(BODY_TABLES)] * 2
    for payload in payloads:
        assert push.decode(push.encode(payload)) == expected(payload)


def outcome(encode: Any, payload: PushPayload) -> tuple[str, Any]:
    try:
        return ("read back", asdict(push.decode(encode(payload))))
    except PushPayloadError as exc:
        return ("refused", exc.reason)


BASE = PushPayload(
    notification_type="game.turn.ready",
    notification_id="n",
    route_id="r",
    user_id="u",
    body_table="GameTurnReady",
    body={},
    display=Display("t", "b"),
)
ODD: list[dict[str, Any]] = [
    {"body": {"turn_number": -1}},
    {"body": {"turn_number": 2**32}},
    {"body": {"turn_number": 2**32 - 1}},
    {"body": {"turn_number": None}},
    {"body": {"turn_number": 4.0}},  # a float is refused by struct...
    {"body": {"turn_number": 0.0}},  # ... unless it equals the default, left out
    {"body": {"turn_number": True}},
    {"body": {"turn_number": "7"}},
    {"body": {"game_id": 7}},
    {"body": {"game_id": b"raw bytes"}},
    {"body": {"game_id": "\ud800"}},  # a lone surrogate: not UTF-8
    {"body": {"game_id": None, "game_name": ""}},
    {"body": {"gameId": "camel", "game_id": "snake"}},  # the last one wins
    {"body": {"unknown": object()}},
    {"body_table": "LobbyInviteExpired", "body": {"turn_number": 5}},
    {"body_table": "NoSuchTable"},
    {"occurred_at_ms": 2**63},
    {"occurred_at_ms": None},
    {"occurred_at_ms": 1.5},
    {"expires_at_ms": -(2**63)},
    {"notification_type": None, "locale": None, "priority": None},
    {"trace_id": 5},
    {"device_tokens": [None]},
    {"device_tokens": ["", "é"]},
    {"display": Display(title=None, body=None)},  # type: ignore[arg-type]
]


@pytest.mark.parametrize("change", ODD, ids=[str(c) for c in ODD])
def test_values_are_taken_or_refused_as_the_object_api_did(change: dict[str, Any]) -> None:
    payload = replace(BASE, **change)
    assert outcome(push.encode, payload) == outcome(builder_encode, payload)
    if outcome(push.encode, payload)[0] == "read back":
        verify(push.encode(payload))


def test_an_out_of_range_integer_names_its_type() -> None:
    with pytest.raises(PushPayloadError, match="bad number -1 for type uint32") as caught:
        push.encode(replace(BASE, body={"turn_number": -1}))
    assert caught.value.reason == "payload_invalid"
