"""The in-app inbox's records (notification.inapp.inbox, compacted).

One record per (user, notification): the key is ``<user_id>:<notification_id>`` (a
notification id never holds a colon, so the key splits at its last one), the value a
JSON :class:`InboxEntry`. Every record of a user goes to the partition of the user_id
alone, so one user's inbox is one partition's, and a newer record for the key (read,
unread) replaces the older one when the topic is compacted; a tombstone removes it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pipeline.errors import DecodeError
from pipeline.runtime.records import Out
from pipeline.topology.partitioning import partition_for
from pipeline.values import value_class


@value_class
class InboxEntry:
    """One notification in one user's inbox."""

    user_id: str
    """Whose inbox."""
    notification_id: str
    """The notification (one entry per notification and user)."""
    route_id: str
    """The inapp route that put it here."""
    notification_type: str
    """Catalog type."""
    title: str
    """One line."""
    body: str
    """The text."""
    locale: str
    """The locale rendered."""
    created_at_ms: int
    """When the route put it here."""
    read_at_ms: int | None = None
    """When the user read it (None: unread)."""

    def read(self, at_ms: int | None) -> InboxEntry:
        """This entry read at ``at_ms`` (None: unread again)."""
        return dataclasses.replace(self, read_at_ms=at_ms)


def inbox_key(user_id: str, notification_id: str) -> bytes:
    """The record key of a user's entry for a notification."""
    return f"{user_id}:{notification_id}".encode()


def encode_entry(entry: InboxEntry) -> bytes:
    """The record value."""
    return json.dumps(dataclasses.asdict(entry), ensure_ascii=False).encode()


def decode_entry(value: bytes) -> InboxEntry:
    """A record value; DecodeError when it is not an entry."""
    try:
        data: Any = json.loads(value)
        return InboxEntry(**data)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"not an inbox entry: {exc}") from exc


def inbox_record(topic: str, partitions: int, entry: InboxEntry) -> Out:
    """The record that writes ``entry`` to the inbox ``topic`` (physical name)."""
    return Out(
        topic,
        inbox_key(entry.user_id, entry.notification_id),
        encode_entry(entry),
        partition=partition_for(entry.user_id.encode("utf-8"), partitions),
    )
