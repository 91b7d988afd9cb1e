"""The generated Avro writers and readers against fastavro, over every schema in schemas/."""

from __future__ import annotations

import io
import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from pipeline.contracts import Contracts, RecordCodec
from pipeline.contracts.avro import AvroCodec, EmbeddedRegistry, load_schema
from pipeline.contracts.compiled import compile_reader, compile_writer
from pipeline.errors import DecodeError
from pipeline.settings import Settings

SCHEMAS = sorted(Path("schemas").glob("*.avsc"))
_LONGS = [
    0,
    1,
    -1,
    63,
    64,
    -64,
    -65,
    127,
    128,
    8191,
    8192,
    2**31 - 1,
    -(2**31),
    2**63 - 1,
    -(2**63),
]
#: The first and last millisecond fastavro reads as a datetime.
_TIME_EDGES = [-62_135_596_800_000, 253_402_300_799_999]
_TEXTS = ["", "a", "user-123", "grüße", "日本語テキスト", "🎉" * 20, "x" * 63, "y" * 64, "z" * 300]


class Data:
    """Random data of a fastavro-parsed schema (references resolved through ``named``)."""

    def __init__(self, named: dict[str, Any], seed: int) -> None:
        self.named = named
        self.rng = random.Random(seed)

    def of(self, schema: Any) -> Any:
        rng = self.rng
        if isinstance(schema, str) and schema in self.named:
            schema = self.named[schema]
        if isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis":
            return rng.choice([0, 1764600000000, *_TIME_EDGES])
        if isinstance(schema, dict) and schema["type"] not in (
            "record",
            "enum",
            "array",
            "map",
            "fixed",
        ):
            schema = schema["type"]
        if isinstance(schema, list):
            return self.of(rng.choice(schema))
        if schema == "null":
            return None
        if schema == "boolean":
            return rng.random() < 0.5
        if schema == "int":
            return rng.choice([v for v in _LONGS if -(2**31) <= v < 2**31])
        if schema == "long":
            return rng.choice([*_LONGS, rng.randrange(-(2**63), 2**63)])
        if schema in ("float", "double"):
            return rng.choice([0.0, 1.5, -2.25])
        if schema == "string":
            return rng.choice(_TEXTS)
        if schema == "bytes":
            return rng.randbytes(rng.choice([0, 1, 63, 64, 200]))
        kind = schema["type"]
        if kind == "record":
            return {field["name"]: self.of(field["type"]) for field in schema["fields"]}
        if kind == "enum":
            return rng.choice(schema["symbols"])
        if kind == "fixed":
            return rng.randbytes(schema["size"])
        count = rng.choice([0, 1, 2, 3, 70])
        if kind == "array":
            return [self.of(schema["items"]) for _ in range(count)]
        return {f"k{i}": self.of(schema["values"]) for i in range(count)}


def fastavro_bytes(parsed: Any, datum: Any) -> bytes:
    buffer = io.BytesIO()
    schemaless_writer(buffer, parsed, datum)
    return buffer.getvalue()


def fastavro_read(parsed: Any, data: bytes) -> tuple[Any, int]:
    body = io.BytesIO(data)
    datum = schemaless_reader(body, parsed, None)
    return plain(datum), body.tell()


def plain(datum: Any) -> Any:
    """``datum`` with fastavro's logical types turned back into what they encode."""
    if isinstance(datum, datetime):
        return (datum - datetime(1970, 1, 1, tzinfo=datum.tzinfo)) // timedelta(milliseconds=1)
    if isinstance(datum, dict):
        return {key: plain(value) for key, value in datum.items()}
    if isinstance(datum, list):
        return [plain(value) for value in datum]
    return datum


def samples(path: Path, count: int, seed: int = 7) -> tuple[Any, list[Any]]:
    named: dict[str, Any] = {}
    schema = json.loads(path.read_text(encoding="utf-8"))
    parsed = parse_schema(schema, named_schemas=named)
    data = Data(named, seed)
    return parsed, [data.of(parsed) for _ in range(count)]


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_every_schema_is_generated_and_writes_fastavros_bytes(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    writer, reader = compile_writer(schema), compile_reader(schema)
    assert writer is not None
    assert reader is not None
    parsed, data = samples(path, 300)
    for datum in data:
        expected = fastavro_bytes(parsed, datum)
        assert writer(datum, b"\x00head") == b"\x00head" + expected
        assert reader(b"xx" + expected, 2) == (
            fastavro_read(parsed, expected)[0],
            2 + len(expected),
        )


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_a_cut_or_damaged_body_is_refused_or_read_as_fastavro_reads_it(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    reader = compile_reader(schema)
    assert reader is not None
    parsed, data = samples(path, 40, seed=11)
    rng = random.Random(5)
    for datum in data:
        good = fastavro_bytes(parsed, datum)
        # A strict prefix runs out of bytes (every one of a short body, 60 of a long one).
        cuts = range(len(good)) if len(good) <= 200 else rng.sample(range(len(good)), 60)
        for cut in cuts:
            with pytest.raises((IndexError, ValueError)):
                reader(good[:cut], 0)
        for _ in range(60):
            damaged = bytearray(good)
            for _ in range(rng.choice([1, 1, 2, 3])):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            try:
                ours = reader(bytes(damaged), 0)
            except (IndexError, ValueError):
                continue  # refused: never a wrong datum
            # Whatever we accept, fastavro reads the same way.
            assert ours == fastavro_read(parsed, bytes(damaged))


def test_arrays_and_maps_in_several_blocks_as_java_writes_them() -> None:
    def long(n: int) -> bytes:
        n = (n << 1) ^ (n >> 63)
        out = bytearray()
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes([*out, n])

    def text(value: str) -> bytes:
        return long(len(value.encode())) + value.encode()

    array = {"type": "array", "items": "string"}
    block = text("a") + text("bc")
    data = long(-2) + long(len(block)) + block + long(1) + text("d") + long(0)
    reader = compile_reader(array)
    assert reader is not None
    assert reader(data, 0) == (["a", "bc", "d"], len(data))
    assert fastavro_read(parse_schema(array), data) == (["a", "bc", "d"], len(data))

    mapping = {"type": "map", "values": "long"}
    data = long(1) + text("x") + long(-5) + long(-1) + long(3) + text("y") + long(300) + long(0)
    reader = compile_reader(mapping)
    assert reader is not None
    assert reader(data, 0) == ({"x": -5, "y": 300}, len(data))


def test_counts_beyond_the_bytes_left_are_refused_before_any_item_is_read() -> None:
    reader = compile_reader({"type": "array", "items": "string"})
    assert reader is not None
    huge = bytes([0xFE, 0xFF, 0xFF, 0xFF, 0x0F])  # 2**31 - 1 items in 0 bytes
    with pytest.raises(ValueError, match="over the rest"):
        reader(huge, 0)


def test_what_is_not_generated_falls_back_to_none() -> None:
    two_types = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "v", "type": ["int", "string"]}],
    }
    assert compile_writer(two_types) is None
    assert compile_reader(two_types) is None
    recursive = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "next", "type": ["null", "Node"]}],
    }
    assert compile_writer(recursive) is None
    assert compile_reader(recursive) is None
    assert compile_reader({"type": "string", "logicalType": "uuid"}) is None
    assert compile_reader({"type": "array", "items": "null"}) is None
    keyword = {"type": "record", "name": "K", "fields": [{"name": "class", "type": "string"}]}
    assert compile_writer(keyword, attributes=True) is None  # not an attribute name
    assert compile_writer(keyword) is not None


def test_writers_refuse_what_the_schema_does_not_allow() -> None:
    schema = load_schema(Path("schemas"), "intent.avsc")
    writer = compile_writer(schema)
    assert writer is not None
    _, (datum, *_) = samples(Path("schemas/intent.avsc"), 1)
    with pytest.raises(ValueError, match="not a symbol of enum"):
        writer({**datum, "priority": "urgent"}, b"")
    with pytest.raises((AttributeError, TypeError)):
        writer({**datum, "producer": None}, b"")
    with pytest.raises(TypeError):
        writer({**datum, "occurred_at_ms": "yesterday"}, b"")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x04", "union index"),  # request_id's union: index 2 of a two-branch union
        (b"\xff", "varint"),  # a varint that never ends
    ],
)
def test_the_codec_turns_a_bad_body_into_a_decode_error(body: bytes, why: str) -> None:
    schema = load_schema(Path("schemas"), "device_feedback.avsc")
    codec = AvroCodec(EmbeddedRegistry(Path("schemas")), schema)
    good = codec.encode(
        {"user_id": "u", "token": "t", "reason": "r", "platform": None, "reported_at_ms": 1}
    )
    assert codec.decode(good)["platform"] is None
    # Replace the platform union's index byte (after three one-char strings).
    offset = 5 + 3 * 2
    with pytest.raises(DecodeError, match="does not match"):
        codec.decode(good[:offset] + body + good[offset + 1 :])
    with pytest.raises(DecodeError, match="trailing bytes"):
        codec.decode(good + b"\x00")
    with pytest.raises(DecodeError):
        codec.decode(good[:5] + b"\x02\xff" + good[7:])  # user_id "\xff": not UTF-8


def test_a_timestamp_is_read_as_its_long() -> None:
    schema = load_schema(Path("schemas"), "intent.avsc")
    parsed, (datum,) = samples(Path("schemas/intent.avsc"), 1)
    reader = compile_reader(schema)
    assert reader is not None
    value, _ = reader(fastavro_bytes(parsed, datum), 0)
    assert value["occurred_at_ms"] == datum["occurred_at_ms"]
    assert isinstance(value["occurred_at_ms"], int)
    for beyond in (_TIME_EDGES[0] - 1, _TIME_EDGES[1] + 1):
        data = fastavro_bytes(parsed, {**datum, "occurred_at_ms": beyond})
        with pytest.raises(ValueError, match="out of range"):
            reader(data, 0)
        with pytest.raises(OverflowError):
            fastavro_read(parsed, data)


def test_a_record_object_is_written_as_its_dict_would_be(settings: Settings) -> None:
    contracts = Contracts(settings)
    codecs = [value for value in vars(contracts).values() if isinstance(value, RecordCodec)]
    assert len(codecs) >= 8
    for codec in codecs:
        path = settings.schemas_dir / codec.record_type.SCHEMA_FILE
        _, data = samples(path, 100, seed=3)
        for datum in data:
            record = codec.record_type.from_avro(datum)
            expected = codec.avro.encode(datum)
            assert codec.avro.encode_object(record) == expected
            assert codec.encode(record) == expected
            assert codec.decode(bytes(bytearray(expected))) == record
