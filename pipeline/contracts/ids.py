"""Herald's deterministic ids: the same inputs always give the same id, so a record
written again after a crash is identical and consumers absorb it."""

from __future__ import annotations

import uuid

#: Namespace of Herald's uuid5 ids.
HERALD_NS = uuid.UUID("6f1c2f4e-8a0b-5d7e-9c3a-2b4d6e8f0a1c")


def deterministic_id(*parts: object) -> str:
    """A uuid5 of ``parts``."""
    return str(uuid.uuid5(HERALD_NS, "\x1f".join(map(str, parts))))
