"""Avro in the Confluent wire format: magic byte 0, a 4-byte big-endian schema id, the body.

Schemas are parsed once and cached by id. Ids come from a Confluent-compatible
registry when ``SCHEMA_REGISTRY_URL`` is set, otherwise from the embedded registry
pinned in ``schemas/registry.json``, which lets separate processes (the CLI producer
and the worker) agree on ids without any server.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from pathlib import Path
from typing import Any, Protocol

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from pipeline.contracts.compiled import compile_reader, compile_writer
from pipeline.contracts.records import AvroRecord
from pipeline.errors import (
    ConfigurationError,
    DecodeError,
    SchemaRegistryUnavailableError,
    UnknownSchemaError,
)
from pipeline.settings import Settings

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")

AvroSchema = dict[str, Any]


class SchemaRegistry(Protocol):
    """Where schema ids come from."""

    def schema_by_id(self, schema_id: int) -> AvroSchema:
        """The writer schema registered under ``schema_id``; UnknownSchemaError if none."""
        ...

    def id_for(self, subject: str, schema: AvroSchema) -> int:
        """The id of ``schema`` under ``subject``, registering it if the registry allows."""
        ...


def load_schema(schemas_dir: Path, file_name: str) -> AvroSchema:
    """Read one .avsc file, with a clear error when it is missing or not JSON."""
    path = schemas_dir / file_name
    try:
        schema: AvroSchema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read Avro schema {path}: {exc}") from exc
    return schema


def subject_of(schema: AvroSchema) -> str:
    """The subject a record schema is registered under (record-name strategy)."""
    return f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")


def canonical(schema: Any) -> str:
    """A schema's JSON in one form (key order, spacing): equal schemas, equal text."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


class EmbeddedRegistry:
    """Ids pinned in ``schemas/registry.json``; nothing is registered at run time."""

    def __init__(self, schemas_dir: Path) -> None:
        index_path = schemas_dir / "registry.json"
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read {index_path}: {exc}") from exc
        self._by_id: dict[int, AvroSchema] = {}
        self._ids: dict[tuple[str, str], int] = {}
        for entry in index["schemas"]:
            if "id" not in entry:
                continue  # a version kept for the compatibility gate only
            schema = load_schema(schemas_dir, entry["file"])
            schema_id = int(entry["id"])
            if schema_id in self._by_id:
                raise ConfigurationError(f"schema id {schema_id} pinned twice in {index_path}")
            self._by_id[schema_id] = schema
            self._ids[(entry["subject"], canonical(schema))] = schema_id

    def schema_by_id(self, schema_id: int) -> AvroSchema:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise UnknownSchemaError(
                f"schema id {schema_id} is not pinned in schemas/registry.json "
                "(set SCHEMA_REGISTRY_URL to use a registry)"
            ) from None

    def id_for(self, subject: str, schema: AvroSchema) -> int:
        try:
            return self._ids[(subject, canonical(schema))]
        except KeyError:
            raise ConfigurationError(
                f"no id pinned for subject {subject!r} with this schema; "
                "add it to schemas/registry.json"
            ) from None


class RemoteRegistry:
    """A Confluent-compatible schema registry (or ``mock://`` inside one test process)."""

    def __init__(self, url: str) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        # new_client() also understands mock:// (one registry per test process).
        self._client = SchemaRegistryClient.new_client({"url": url})
        self._by_id: dict[int, AvroSchema] = {}
        self._lock = threading.Lock()

    def schema_by_id(self, schema_id: int) -> AvroSchema:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        with self._lock:
            cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        try:
            schema_str = self._client.get_schema(schema_id).schema_str
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise UnknownSchemaError(f"registry has no schema id {schema_id}") from exc
            raise SchemaRegistryUnavailableError(str(exc)) from exc
        except Exception as exc:  # connection errors surface as many types
            raise SchemaRegistryUnavailableError(str(exc)) from exc
        schema: AvroSchema = json.loads(schema_str or "{}")
        with self._lock:
            self._by_id[schema_id] = schema
        return schema

    def id_for(self, subject: str, schema: AvroSchema) -> int:
        from confluent_kafka.schema_registry import Schema

        try:
            schema_id: int = self._client.register_schema(
                subject, Schema(json.dumps(schema), "AVRO")
            )
        except Exception as exc:
            raise SchemaRegistryUnavailableError(f"cannot register {subject}: {exc}") from exc
        return schema_id


def registry_from_settings(settings: Settings) -> SchemaRegistry:
    """The remote registry when one is configured, else the embedded one."""
    if settings.schema_registry_url:
        return RemoteRegistry(settings.schema_registry_url)
    return EmbeddedRegistry(settings.schemas_dir)


class AvroCodec:
    """Encodes and decodes one record type in the Confluent wire format.

    Decoding accepts any writer schema the registry knows and resolves it to this
    codec's (reader) schema, so producers may run one compatible version ahead.
    """

    def __init__(self, registry: SchemaRegistry, schema: AvroSchema) -> None:
        self.subject = subject_of(schema)
        self._registry = registry
        self._schema = schema
        self._parsed = parse_schema(schema)
        # Generated code for our own schema; fastavro for what it does not cover.
        self._write_body = compile_writer(schema)
        self._write_object = compile_writer(schema, attributes=True)
        self._read_body = compile_reader(schema)
        self._writer_id: int | None = None
        self._header: bytes = b""
        self._readers: dict[int, Any] = {}

    @property
    def schema_id(self) -> int:
        """The id this codec writes with (looked up or registered once)."""
        if self._writer_id is None:
            self._writer_id = self._registry.id_for(self.subject, self._schema)
            self._header = _HEADER.pack(MAGIC_BYTE, self._writer_id)
            self._readers[self._writer_id] = None  # same schema: no resolution needed
        return self._writer_id

    def encode(self, record: dict[str, Any]) -> bytes:
        """Serialize ``record`` (a dict matching the schema) with the wire-format header."""
        self.schema_id  # noqa: B018 - resolves the header once
        if self._write_body is not None:
            return self._write_body(record, self._header)
        buffer = io.BytesIO()
        buffer.write(self._header)
        schemaless_writer(buffer, self._parsed, record)
        return buffer.getvalue()

    def encode_object(self, record: AvroRecord) -> bytes:
        """Serialize a Herald record object (its fields read as attributes)."""
        self.schema_id  # noqa: B018 - resolves the header once
        if self._write_object is not None:
            return self._write_object(record, self._header)
        return self.encode(record.to_avro())

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """Parse wire-format bytes into a dict; DecodeError for anything else."""
        if not data or len(data) < _HEADER.size:
            raise DecodeError("empty or truncated record (no Confluent wire-format header)")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise DecodeError(f"magic byte {magic} is not the Confluent wire format (0)")
        if schema_id not in self._readers:
            self.schema_id  # noqa: B018 - registers our own id first, if not yet known
        if schema_id not in self._readers:
            writer = parse_schema(self._registry.schema_by_id(schema_id))
            self._readers[schema_id] = writer
        writer_schema = self._readers[schema_id]
        try:
            if writer_schema is None and self._read_body is not None:
                record, end = self._read_body(data, _HEADER.size)
            else:
                body = io.BytesIO(data)
                body.seek(_HEADER.size)
                if writer_schema is None:
                    record = schemaless_reader(body, self._parsed, None)
                else:
                    record = schemaless_reader(body, writer_schema, self._parsed)
                end = body.tell()
        except Exception as exc:  # fastavro raises many types on bad bodies
            raise DecodeError(f"Avro body does not match schema id {schema_id}: {exc}") from exc
        if end != len(data):
            raise DecodeError(
                f"{len(data) - end} trailing bytes after the Avro body (schema id {schema_id})"
            )
        if not isinstance(record, dict):
            raise DecodeError(f"schema id {schema_id} does not describe a record")
        return record
