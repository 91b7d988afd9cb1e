"""The Confluent wire-format codec against the embedded and mock registries."""

from __future__ import annotations

import io
import json
import struct
import uuid

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro import parse_schema, schemaless_writer

from pipeline.contracts import Contracts
from pipeline.contracts.avro import EmbeddedRegistry, RemoteRegistry
from pipeline.contracts.ids import HERALD_NS, deterministic_id
from pipeline.contracts.records import Malformed, PushDevice, QuietHours, UserProfile
from pipeline.errors import DecodeError, UnknownSchemaError
from pipeline.settings import Settings
from tests.unit.helpers import make_intent


def test_round_trip_with_pinned_header(settings: Settings) -> None:
    contracts = Contracts(settings)
    data = contracts.intent.encode(make_intent())
    assert data[0] == 0
    assert struct.unpack(">I", data[1:5])[0] == 1  # the intent envelope is pinned at id 1
    assert contracts.intent.decode(data) == make_intent()


def test_the_bytes_just_encoded_decode_without_parsing_and_others_are_parsed(
    settings: Settings,
) -> None:
    contracts = Contracts(settings)
    intent = make_intent()
    data = contracts.intent.encode(intent)
    assert contracts.intent.decode(data) is intent
    copy = bytes(bytearray(data))  # equal bytes, another object: parsed
    assert contracts.intent.decode(copy) == intent
    assert contracts.intent.decode(copy) is not intent
    with pytest.raises(DecodeError):
        contracts.intent.decode(data[:-1])


def test_every_record_type_round_trips(settings: Settings) -> None:
    contracts = Contracts(settings)
    profile = UserProfile(
        user_id="u1",
        email="a@example.org",
        push_devices=[PushDevice(token="t", platform="ios")],
        quiet_hours=QuietHours(start="22:00", end="07:00"),
    )
    assert contracts.user.decode(contracts.user.encode(profile)) == profile
    bad = Malformed(
        reason="undecodable",
        detail="x",
        origin_topic="t",
        origin_partition=1,
        origin_offset=2,
        recorded_at_ms=3,
        raw_value=b"\x00\xff",
    )
    assert contracts.malformed.decode(contracts.malformed.encode(bad)) == bad


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "undecodable"),
        (b"", "undecodable"),
        (b"garbage bytes that are not avro", "undecodable"),
        (b"\x00\x00\x00\x03\xe7" + b"\x02", "unknown_schema_id"),
    ],
)
def test_decode_rejects_with_a_reason(settings: Settings, data: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        Contracts(settings).intent.decode(data)
    assert info.value.reason == reason


def test_truncated_body_and_trailing_bytes_are_rejected(settings: Settings) -> None:
    codec = Contracts(settings).intent
    data = codec.encode(make_intent())
    with pytest.raises(DecodeError):
        codec.decode(data[:-3])
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(data + b"\x00\x00")


def test_standard_serializer_with_mock_registry_is_readable(settings: Settings) -> None:
    """A plain confluent-kafka AvroSerializer (mock registry, topic subject) writes bytes
    the embedded codec reads: the first id a registry assigns is the pinned intent id."""
    schema_str = (settings.schemas_dir / "intent.avsc").read_text()
    client = SchemaRegistryClient.new_client({"url": "mock://herald-codec-test"})
    serializer = AvroSerializer(client, schema_str)
    ctx = SerializationContext("notification.intents", MessageField.VALUE)
    data = serializer(make_intent().to_avro(), ctx)
    assert data is not None
    assert Contracts(settings).intent.decode(data) == make_intent()


def test_remote_registry_resolves_an_older_writer_schema() -> None:
    """A producer one version behind (no tenant/priority fields) still decodes."""
    settings = Settings(schema_registry_url="mock://herald-evolution")
    old = json.loads((settings.schemas_dir / "intent.avsc").read_text())
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("tenant_id", "priority")]
    registry = RemoteRegistry("mock://herald-evolution")
    old_id = registry.id_for("herald.Intent", old)
    record = {
        k: v for k, v in make_intent().to_avro().items() if k not in ("tenant_id", "priority")
    }
    buffer = io.BytesIO()
    buffer.write(struct.pack(">bI", 0, old_id))
    schemaless_writer(buffer, parse_schema(old), record)
    decoded = Contracts(settings, registry).intent.decode(buffer.getvalue())
    assert decoded.priority == "normal"
    assert decoded.tenant_id is None
    assert decoded.recipient_user_ids == ["u1", "u2"]


def test_embedded_registry_refuses_unknown_ids(settings: Settings) -> None:
    with pytest.raises(UnknownSchemaError):
        EmbeddedRegistry(settings.schemas_dir).schema_by_id(999)


@pytest.mark.parametrize(
    "parts",
    [("n-1", "push", "u1"), ("key", None, "accepted", "topic", 3, 17), ("ünïcode", "✓"), ()],
)
def test_deterministic_ids_are_the_uuid5_they_always_were(parts: tuple[object, ...]) -> None:
    expected = str(uuid.uuid5(HERALD_NS, "\x1f".join(map(str, parts))))
    assert deterministic_id(*parts) == expected


def test_deterministic_ids_match_uuid5_for_every_variant_digit() -> None:
    seen = set()
    for n in range(2000):
        parts = ("intent", n, "x" * (n % 40))
        made = deterministic_id(*parts)
        assert made == str(uuid.uuid5(HERALD_NS, "\x1f".join(map(str, parts))))
        seen.add(made[19])
    assert seen == set("89ab")
