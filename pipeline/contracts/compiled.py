"""Avro bodies by generated code: one Python function per schema for each direction.

fastavro's writer and reader walk the parsed schema for every datum: ~23 us each way
for a 15-field status event on the 2-core dev box, paid for every record a worker
writes or reads (docs/performance.md, sixth pass). The functions generated here do the
same in 6 and 8 us: the schema's walk happens once, when the code is generated.

They are used only where writer and reader schema are the same (every record Herald
writes, and every record it reads that was written with its own schema); a record
written with another schema version still goes through fastavro's schema resolution.
The output is byte-for-byte fastavro's (tests/unit/test_compiled_avro.py compares
them over every schema in schemas/). Differences, all on the reading side:

- a ``timestamp-millis`` is read as its long (in the range fastavro reads as a
  datetime: years 1 to 9999); schemas with other logical types are left to fastavro;
- a boolean byte other than 0 or 1, a long over 64 bits, a union or enum index out of
  range, a negative or overlong length, and an array or map count larger than the
  bytes left are errors (fastavro wraps such a long, and reads on into the others).

Schemas with parts this module does not generate (unions of two or more non-null
types, recursive records, arrays or maps of items that take no bytes) get None from
:func:`compile_writer`/:func:`compile_reader`, and the codec keeps using fastavro.
"""

from __future__ import annotations

import keyword
import struct
from collections.abc import Callable
from typing import Any

from fastavro import parse_schema

#: Writes one datum's body after ``head`` (the wire-format header).
Writer = Callable[[Any, bytes], bytes]
#: Reads one datum from ``data`` at ``pos``: the datum and the position after it.
Reader = Callable[[bytes, int], tuple[Any, int]]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
#: The epoch milliseconds of year 1 and the end of year 9999 (Python's datetime range).
_TIMES = (-62_135_596_800_000, 253_402_300_799_999)
#: Zigzag varints of 0..63, one byte each (lengths and small longs).
_SMALL = tuple(bytes((n << 1,)) for n in range(64))


class _NotGeneratedError(Exception):
    """A schema part this module does not generate code for (never leaves the module)."""


def _varint(n: int) -> bytes:
    """The zigzag varint of a long."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint of at most 10 bytes at ``pos``: the long and the position after."""
    n = shift = 0
    for end in range(pos, pos + 10):
        byte = data[end]
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            if n >> 64:
                raise ValueError(f"varint at byte {pos} is over 64 bits")
            return (n >> 1) ^ -(n & 1), end + 1
        shift += 7
    raise ValueError(f"varint at byte {pos} runs past 10 bytes")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{type(value).__name__} is not bytes")


class _Code:
    """Lines of one generated function, with fresh local names and its constants."""

    def __init__(self, attributes: bool = False) -> None:
        #: Whether records are objects whose fields are attributes (else dicts).
        self.attributes = attributes
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}
        self._count = 0
        self._open: set[str] = set()  # records being generated (recursion guard)

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def constant(self, value: Any) -> str:
        name = self.name("_k")
        self.constants[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def function(self, signature: str, env: dict[str, Any]) -> Any:
        source = "\n".join([f"def f({signature}):", *self.lines])
        scope = {**env, **self.constants}
        # Generated from Herald's own schema files: names enter as repr() literals or
        # as checked identifiers, and no datum ever reaches the source.
        exec(compile(source, "<avro codegen>", "exec"), scope)
        return scope["f"]

    def entering(self, name: str) -> None:
        if name in self._open:
            raise _NotGeneratedError(f"recursive record {name}")
        self._open.add(name)

    def leaving(self, name: str) -> None:
        self._open.discard(name)


def _resolve(schema: Any, named: dict[str, Any]) -> Any:
    """``schema`` with a reference to a named type replaced by its definition, and a
    primitive written as ``{"type": ...}`` (perhaps with a logical type) by its name."""
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return schema
        if schema in named:
            return named[schema]
        raise _NotGeneratedError(f"unknown type {schema}")
    if isinstance(schema, dict) and schema.get("type") in _PRIMITIVES:
        logical = schema.get("logicalType")
        if logical is not None and (logical, schema["type"]) != ("timestamp-millis", "long"):
            raise _NotGeneratedError(f"logical type {logical}")
        return schema["type"]
    return schema


def _not_attributes(schema: Any) -> bool:
    """Whether a record of ``schema`` has a field whose name cannot be an attribute
    (a Python keyword, or not an identifier)."""
    fields = schema.get("fields", ()) if isinstance(schema, dict) else ()
    return any(
        keyword.iskeyword(field["name"]) or not field["name"].isidentifier() for field in fields
    )


def _is_timestamp(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis"


def _nullable(branches: list[Any]) -> tuple[int, Any]:
    """(index of null, the other branch) of a two-branch union with null."""
    if len(branches) != 2 or "null" not in branches:
        raise _NotGeneratedError("union other than [null, T]")
    null_at = branches.index("null")
    return null_at, branches[1 - null_at]


def _takes_bytes(schema: Any, named: dict[str, Any]) -> bool:
    """Whether every datum of ``schema`` takes at least one byte (so a count can be
    checked against the bytes left)."""
    schema = _resolve(schema, named)
    if schema == "null":
        return False
    if isinstance(schema, dict):
        kind = schema["type"]
        if kind == "record":
            return any(_takes_bytes(f["type"], named) for f in schema["fields"])
        if kind == "fixed":
            return int(schema["size"]) > 0
    return True


# -- writing ----------------------------------------------------------------------


def _write(code: _Code, schema: Any, value: str, depth: int, named: dict[str, Any]) -> None:
    """Lines that append the encoding of the expression ``value`` to ``o``."""
    schema = _resolve(schema, named)
    emit = code.emit
    if schema == "null":
        return
    if schema == "boolean":
        emit(depth, f"a(b'\\x01' if {value} else b'\\x00')")
    elif schema in ("int", "long"):
        emit(depth, f"a(_S[{value}] if 0 <= {value} < 64 else _V({value}))")
    elif schema == "float":
        emit(depth, f"a(_F({value}))")
    elif schema == "double":
        emit(depth, f"a(_D({value}))")
    elif schema in ("string", "bytes"):
        raw = code.name("s")
        size = code.name("n")
        emit(depth, f"{raw} = {value}.encode()" if schema == "string" else f"{raw} = _B({value})")
        emit(depth, f"{size} = len({raw})")
        emit(depth, f"a(_S[{size}] if {size} < 64 else _V({size}))")
        emit(depth, f"a({raw})")
    elif isinstance(schema, list):
        null_at, other = _nullable(schema)
        emit(depth, f"if {value} is None:")
        emit(depth + 1, f"a({_SMALL[null_at]!r})")
        emit(depth, "else:")
        emit(depth + 1, f"a({_SMALL[1 - null_at]!r})")
        _write(code, other, value, depth + 1, named)
    else:
        _write_named(code, schema, value, depth, named)


def _write_named(
    code: _Code, schema: dict[str, Any], value: str, depth: int, named: dict[str, Any]
) -> None:
    emit = code.emit
    kind = schema["type"]
    if kind == "record":
        code.entering(schema["name"])
        for field in schema["fields"]:
            item = code.name("v")
            if code.attributes:
                emit(depth, f"{item} = {value}.{field['name']}")
            elif "default" in field:
                default = code.constant(field["default"])
                emit(depth, f"{item} = {value}.get({field['name']!r}, {default})")
            else:
                emit(depth, f"{item} = {value}[{field['name']!r}]")
            _write(code, field["type"], item, depth, named)
        code.leaving(schema["name"])
    elif kind == "enum":
        index = code.constant({symbol: _varint(i) for i, symbol in enumerate(schema["symbols"])})
        bad = f"_bad_symbol({value}, {schema['name']!r})"
        emit(depth, f"a({index}[{value}] if {value} in {index} else {bad})")
    elif kind == "fixed":
        emit(depth, f"a(_fixed({value}, {int(schema['size'])}))")
    elif kind in ("array", "map"):
        items = code.name("i")
        emit(depth, f"{items} = {value}")
        emit(depth, f"if {items}:")
        emit(depth + 1, f"a(_V(len({items})))")
        if kind == "array":
            item = code.name("x")
            emit(depth + 1, f"for {item} in {items}:")
            _write(code, schema["items"], item, depth + 2, named)
        else:
            key, item = code.name("k"), code.name("x")
            emit(depth + 1, f"for {key}, {item} in {items}.items():")
            _write(code, "string", key, depth + 2, named)
            _write(code, schema["values"], item, depth + 2, named)
        emit(depth, "a(b'\\x00')")
    else:
        raise _NotGeneratedError(f"type {kind}")


def _bad_symbol(value: Any, enum: str) -> bytes:
    raise ValueError(f"{value!r} is not a symbol of enum {enum}")


def _fixed(value: Any, size: int) -> bytes:
    data = _as_bytes(value)
    if len(data) != size:
        raise ValueError(f"fixed of {size} bytes given {len(data)}")
    return data


_WRITE_ENV: dict[str, Any] = {
    "_S": _SMALL,
    "_V": _varint,
    "_B": _as_bytes,
    "_F": struct.Struct("<f").pack,
    "_D": struct.Struct("<d").pack,
    "_bad_symbol": _bad_symbol,
    "_fixed": _fixed,
}


# -- reading ----------------------------------------------------------------------


def _read_long(code: _Code, target: str, depth: int) -> None:
    """Lines that read a long into ``target`` (one byte inline, longer by a call)."""
    code.emit(depth, "c = b[p]")
    code.emit(depth, "if c < 0x80:")
    code.emit(depth + 1, f"{target} = (c >> 1) ^ -(c & 1)")
    code.emit(depth + 1, "p += 1")
    code.emit(depth, "else:")
    code.emit(depth + 1, f"{target}, p = _R(b, p)")


def _read(code: _Code, schema: Any, target: str, depth: int, named: dict[str, Any]) -> None:
    """Lines that read one datum of ``schema`` into the assignable ``target``."""
    emit = code.emit
    if _is_timestamp(schema):
        # Only the times fastavro can turn into a datetime, as it reads them.
        _read_long(code, "t", depth)
        emit(depth, f"if not {_TIMES[0]} <= t <= {_TIMES[1]}:")
        emit(depth + 1, "raise ValueError(f'timestamp {t} is out of range')")
        emit(depth, f"{target} = t")
        return
    schema = _resolve(schema, named)
    if schema == "null":
        emit(depth, f"{target} = None")
    elif schema == "boolean":
        emit(depth, "c = b[p]")
        emit(depth, "p += 1")
        emit(depth, "if c > 1:")
        emit(depth + 1, "raise ValueError(f'boolean byte {c} at {p - 1}')")
        emit(depth, f"{target} = c == 1")
    elif schema in ("int", "long"):
        _read_long(code, target, depth)
    elif schema in ("float", "double"):
        unpack, width = ("_UF", 4) if schema == "float" else ("_UD", 8)
        emit(depth, f"if p + {width} > m:")
        emit(depth + 1, "raise ValueError(f'truncated at byte {p}')")
        emit(depth, f"{target} = {unpack}(b, p)[0]")
        emit(depth, f"p += {width}")
    elif schema in ("string", "bytes"):
        size = code.name("n")
        _read_long(code, size, depth)
        emit(depth, f"e = p + {size}")
        emit(depth, f"if {size} < 0 or e > m:")
        emit(depth + 1, f"raise ValueError(f'length {{{size}}} at byte {{p}} is out of range')")
        emit(depth, f"{target} = b[p:e].decode()" if schema == "string" else f"{target} = b[p:e]")
        emit(depth, "p = e")
    elif isinstance(schema, list):
        null_at, other = _nullable(schema)
        emit(depth, "c = b[p]")
        emit(depth, "p += 1")
        emit(depth, f"if c == {null_at << 1}:")
        emit(depth + 1, f"{target} = None")
        emit(depth, f"elif c == {(1 - null_at) << 1}:")
        _read(code, other, target, depth + 1, named)
        emit(depth, "else:")
        emit(depth + 1, "raise ValueError(f'union index byte {c} at {p - 1}')")
    else:
        _read_named(code, schema, target, depth, named)


def _read_named(
    code: _Code, schema: dict[str, Any], target: str, depth: int, named: dict[str, Any]
) -> None:
    emit = code.emit
    kind = schema["type"]
    if kind == "record":
        code.entering(schema["name"])
        record = code.name("d")
        emit(depth, f"{record} = {{}}")
        for field in schema["fields"]:
            _read(code, field["type"], f"{record}[{field['name']!r}]", depth, named)
        emit(depth, f"{target} = {record}")
        code.leaving(schema["name"])
    elif kind == "enum":
        symbols = code.constant(tuple(schema["symbols"]))
        index = code.name("n")
        _read_long(code, index, depth)
        emit(depth, f"if not 0 <= {index} < {len(schema['symbols'])}:")
        emit(depth + 1, f"raise ValueError(f'enum index {{{index}}} out of range')")
        emit(depth, f"{target} = {symbols}[{index}]")
    elif kind == "fixed":
        size = int(schema["size"])
        emit(depth, f"if p + {size} > m:")
        emit(depth + 1, "raise ValueError(f'truncated at byte {p}')")
        emit(depth, f"{target} = b[p:p + {size}]")
        emit(depth, f"p += {size}")
    elif kind in ("array", "map"):
        item_schema = schema["items"] if kind == "array" else schema["values"]
        if kind == "array" and not _takes_bytes(item_schema, named):
            raise _NotGeneratedError("array of items that take no bytes")
        items, count, item = code.name("i"), code.name("n"), code.name("x")
        emit(depth, f"{items} = {'[]' if kind == 'array' else '{}'}")
        emit(depth, "while True:")
        _read_long(code, count, depth + 1)
        emit(depth + 1, f"if not {count}:")
        emit(depth + 2, "break")
        emit(depth + 1, f"if {count} < 0:")  # a negative count is followed by the block's size
        emit(depth + 2, f"{count} = -{count}")
        _read_long(code, code.name("z"), depth + 2)
        emit(depth + 1, f"if {count} > m - p:")
        emit(depth + 2, f"raise ValueError(f'count {{{count}}} at byte {{p}} is over the rest')")
        emit(depth + 1, f"for _ in range({count}):")
        if kind == "array":
            _read(code, item_schema, item, depth + 2, named)
            emit(depth + 2, f"{items}.append({item})")
        else:
            key = code.name("k")
            _read(code, "string", key, depth + 2, named)
            _read(code, item_schema, f"{items}[{key}]", depth + 2, named)
        emit(depth, f"{target} = {items}")
    else:
        raise _NotGeneratedError(f"type {kind}")


_READ_ENV: dict[str, Any] = {
    "_R": _read_varint,
    "_UF": struct.Struct("<f").unpack_from,
    "_UD": struct.Struct("<d").unpack_from,
}


def _parsed(schema: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """fastavro's parse of ``schema`` (full names, references by name) and its named types."""
    named: dict[str, Any] = {}
    return parse_schema(schema, named_schemas=named), named


def compile_writer(schema: dict[str, Any], *, attributes: bool = False) -> Writer | None:
    """A function writing a datum of ``schema`` after a header; None if unsupported.

    With ``attributes``, a record's fields are read as attributes of an object (Herald's
    record dataclasses, nested ones included) rather than as keys of a dict, which
    saves building the dict.
    """
    parsed, named = _parsed(schema)
    if attributes and any(_not_attributes(schema) for schema in [parsed, *named.values()]):
        return None
    code = _Code(attributes)
    code.emit(1, "o = [head]")
    code.emit(1, "a = o.append")
    try:
        _write(code, parsed, "r", 1, named)
    except _NotGeneratedError:
        return None
    code.emit(1, "return b''.join(o)")
    writer: Writer = code.function("r, head", _WRITE_ENV)
    return writer


def compile_reader(schema: dict[str, Any]) -> Reader | None:
    """A function reading a datum of ``schema`` at a position; None if unsupported."""
    parsed, named = _parsed(schema)
    code = _Code()
    code.emit(1, "m = len(b)")
    try:
        _read(code, parsed, "result", 1, named)
    except _NotGeneratedError:
        return None
    code.emit(1, "return result, p")
    reader: Reader = code.function("b, p", _READ_ENV)
    return reader
