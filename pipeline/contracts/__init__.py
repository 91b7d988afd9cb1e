"""The wire contracts: Avro records in the Confluent wire format; push payloads in
FlatBuffers live in :mod:`pipeline.contracts.push`."""

from __future__ import annotations

from typing import Generic, TypeVar

from pipeline.contracts.avro import AvroCodec, SchemaRegistry, load_schema, registry_from_settings
from pipeline.contracts.records import (
    AvroRecord,
    ChannelRequest,
    DeadLetter,
    DeviceFeedback,
    Intent,
    Malformed,
    Recipient,
    StatusEvent,
    UserProfile,
)
from pipeline.settings import Settings

R = TypeVar("R", bound=AvroRecord)

__all__ = ["Contracts", "RecordCodec"]


class RecordCodec(Generic[R]):
    """Wire-format codec bound to one record class."""

    def __init__(self, record_type: type[R], registry: SchemaRegistry, settings: Settings) -> None:
        self.record_type = record_type
        self.avro = AvroCodec(registry, load_schema(settings.schemas_dir, record_type.SCHEMA_FILE))
        self._last: tuple[bytes, R] | None = None

    def encode(self, record: R) -> bytes:
        """Record to wire-format bytes."""
        data = self.avro.encode_object(record)
        self._last = (data, record)
        return data

    def decode(self, data: bytes | None) -> R:
        """Wire-format bytes to a record; DecodeError when they are not one.

        The very bytes this codec encoded last decode to that record without parsing
        (the route stage hands the request it just encoded to the push channel);
        records are values, never changed once built.
        """
        last = self._last
        if last is not None and data is last[0]:
            return last[1]
        return self.record_type.from_avro(self.avro.decode(data))


class Contracts:
    """One codec per record type, all sharing one schema registry."""

    def __init__(self, settings: Settings, registry: SchemaRegistry | None = None) -> None:
        self.registry = registry or registry_from_settings(settings)
        self.intent = RecordCodec(Intent, self.registry, settings)
        self.recipient = RecordCodec(Recipient, self.registry, settings)
        self.status = RecordCodec(StatusEvent, self.registry, settings)
        self.malformed = RecordCodec(Malformed, self.registry, settings)
        self.user = RecordCodec(UserProfile, self.registry, settings)
        self.channel_request = RecordCodec(ChannelRequest, self.registry, settings)
        self.dead_letter = RecordCodec(DeadLetter, self.registry, settings)
        self.device_feedback = RecordCodec(DeviceFeedback, self.registry, settings)
