"""Herald's deterministic ids: the same inputs always give the same id, so a record
written again after a crash is identical and consumers absorb it."""

from __future__ import annotations

import hashlib
import uuid

#: Namespace of Herald's uuid5 ids.
HERALD_NS = uuid.UUID("6f1c2f4e-8a0b-5d7e-9c3a-2b4d6e8f0a1c")
_NS_BYTES = HERALD_NS.bytes
#: A hex digit with its two top bits set to the RFC 4122 variant (10).
_VARIANT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}


def deterministic_id(*parts: object) -> str:
    """The uuid5 of ``parts`` in Herald's namespace, as text.

    Computed as RFC 4122 says (SHA-1 of namespace and name, version 5, RFC variant)
    without building a uuid.UUID: ids are made several times per record, and the
    object costs three times the hash. The version and variant are set on the hex
    digest's characters 12 and 16.
    """
    name = "\x1f".join(map(str, parts)).encode("utf-8")
    h = hashlib.sha1(_NS_BYTES + name, usedforsecurity=False).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
