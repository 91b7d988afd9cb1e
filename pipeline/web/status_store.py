"""The status view behind the operator API: notification.status projected into SQLite
(and the in-app inbox, notification.inapp.inbox, which the inbox API serves).

Decision (docs/operations.md): every API process keeps its own embedded SQLite file
and follows the whole status topic into it (no consumer group; the next offset per
partition is stored in the same transaction as the rows it produced). Lookups are
indexed local reads, well under a millisecond. The file is a cache: lose it, or point
``HERALD_STATUS_DB`` elsewhere, and the process rebuilds it from the topic (kept a
month). A Faust table served across workers was the alternative; it would tie reads
to worker partition ownership and a routing layer, for data every replica can hold.

Status events are keyed by notification_id, so a notification's events arrive in the
order they were written; a delivery's state is its newest event, and a repeated event
(at-least-once writing) is recognised by its deterministic id and ignored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from pipeline.contracts import Contracts
from pipeline.contracts.inbox import InboxEntry, decode_entry
from pipeline.contracts.records import StatusEvent
from pipeline.errors import DecodeError, ValidationError
from pipeline.settings import Settings
from pipeline.topology import Topology
from pipeline.views import Follower

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id TEXT NOT NULL UNIQUE,
  notification_id TEXT NOT NULL,
  route_id TEXT,
  status TEXT NOT NULL,
  at_ms INTEGER NOT NULL,
  channel TEXT,
  user_id TEXT,
  attempt INTEGER NOT NULL DEFAULT 0,
  reason TEXT,
  detail TEXT
);
CREATE INDEX IF NOT EXISTS events_by_notification ON events (notification_id, seq);
CREATE INDEX IF NOT EXISTS events_by_route ON events (route_id, seq);
CREATE TABLE IF NOT EXISTS notifications (
  notification_id TEXT PRIMARY KEY,
  notification_type TEXT,
  producer TEXT,
  idempotency_key TEXT,
  request_id TEXT,
  trace_id TEXT,
  status TEXT,
  first_at_ms INTEGER NOT NULL,
  updated_at_ms INTEGER NOT NULL,
  tenant_id TEXT
);
CREATE INDEX IF NOT EXISTS notifications_by_request ON notifications (request_id);
CREATE INDEX IF NOT EXISTS notifications_by_key ON notifications (producer, idempotency_key);
CREATE TABLE IF NOT EXISTS deliveries (
  route_id TEXT PRIMARY KEY,
  notification_id TEXT NOT NULL,
  notification_type TEXT,
  channel TEXT,
  user_id TEXT,
  status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  reason TEXT,
  detail TEXT,
  request_id TEXT,
  resend_of TEXT,
  created_at_ms INTEGER NOT NULL,
  updated_at_ms INTEGER NOT NULL,
  tenant_id TEXT,
  template_version TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries (created_at_ms, route_id);
CREATE INDEX IF NOT EXISTS deliveries_by_user ON deliveries (user_id, created_at_ms, route_id);
CREATE INDEX IF NOT EXISTS deliveries_by_notification ON deliveries (notification_id);
CREATE TABLE IF NOT EXISTS requests (
  route_id TEXT PRIMARY KEY,
  topic TEXT NOT NULL,
  value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
  event_id TEXT PRIMARY KEY,
  status TEXT NOT NULL,
  at_ms INTEGER NOT NULL,
  notification_type TEXT,
  producer TEXT,
  idempotency_key TEXT,
  request_id TEXT,
  trace_id TEXT,
  reason TEXT,
  detail TEXT
);
CREATE INDEX IF NOT EXISTS rejections_by_request ON rejections (request_id, at_ms);
CREATE TABLE IF NOT EXISTS inbox (
  user_id TEXT NOT NULL,
  notification_id TEXT NOT NULL,
  entry TEXT NOT NULL,
  created_at_ms INTEGER NOT NULL,
  read INTEGER NOT NULL,
  PRIMARY KEY (user_id, notification_id)
);
CREATE INDEX IF NOT EXISTS inbox_by_user ON inbox (user_id, created_at_ms, notification_id);
CREATE TABLE IF NOT EXISTS offsets (
  topic TEXT NOT NULL,
  partition INTEGER NOT NULL,
  next_offset INTEGER NOT NULL,
  PRIMARY KEY (topic, partition)
);
"""

#: Columns added since a file was first made: added to an older file at open.
_ADDED_COLUMNS = (
    ("notifications", "tenant_id"),
    ("deliveries", "tenant_id"),
    ("deliveries", "template_version"),
)
#: The in-app inbox topic the view keeps (logical name).
INBOX = "notification.inapp.inbox"
#: The reason on a clone's first event; its detail is the route it was cloned from.
RESEND_REASON = "resend"
#: Intake's verdicts: the notification's own status.
_INTAKE_STATUSES = frozenset({"accepted", "duplicate", "ignored"})
MAX_PAGE = 500
#: Topics that keep routes a stage delivered without their lane (the push hand-off,
#: docs/push.md): the lane a resend of them goes to.
KEPT_ROUTES = {"notification.push.routes": "notification.push.requested"}


@dataclass(frozen=True, slots=True)
class DeliveryQuery:
    """Filters of a delivery listing; None matches all."""

    recipient: str | None = None
    """user_id."""
    status: str | None = None
    """Current status (sent, dead_lettered, ...)."""
    channel: str | None = None
    """A channel (email, push, webhook, ...)."""
    notification_type: str | None = None
    """Catalog type."""
    since_ms: int | None = None
    """Created at or after."""
    until_ms: int | None = None
    """Created before."""
    tenant_id: str | None = None
    """The tenant that owns the notification."""
    reason: str | None = None
    """The reason of the current status (``dead_lettered`` and ``in_doubt``: the routes
    held for an operator)."""


def encode_cursor(created_at_ms: int, route_id: str) -> str:
    """An opaque cursor: the position after this delivery in creation order."""
    raw = json.dumps([created_at_ms, route_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The position a cursor names; ValidationError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at_ms, route_id = json.loads(raw)
        if not isinstance(created_at_ms, int) or not isinstance(route_id, str):
            raise ValueError("wrong shape")
    except (ValueError, TypeError) as exc:
        raise ValidationError("not a cursor this API issued", reason="invalid_cursor") from exc
    return created_at_ms, route_id


class StatusStore:
    """The SQLite file: written by the follower, read by the API."""

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, column in _ADDED_COLUMNS:
            present = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS deliveries_by_tenant ON deliveries"
            " (tenant_id, created_at_ms, route_id)"
        )

    def close(self) -> None:
        self._db.close()

    # --- writing ---------------------------------------------------------------

    def next_offsets(self, topic: str) -> dict[int, int]:
        """partition -> next offset to read, for what is already in the file."""
        rows = self._db.execute(
            "SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,)
        )
        return {int(r["partition"]): int(r["next_offset"]) for r in rows}

    def apply(self, events: Iterable[StatusEvent], topic: str, offsets: dict[int, int]) -> int:
        """Apply ``events`` and record ``offsets`` (partition -> next offset) in one
        transaction; returns how many events were new."""
        new = 0
        with self._transaction():
            for event in events:
                new += self._apply_one(event)
            self._save_offsets(topic, offsets)
        return new

    def apply_inbox(
        self, records: Iterable[tuple[bytes, bytes | None]], topic: str, offsets: dict[int, int]
    ) -> None:
        """Apply inbox records (key, JSON entry or None for a tombstone) and record
        ``offsets``, in one transaction; undecodable ones are skipped."""
        with self._transaction():
            for key, value in records:
                self.put_inbox(key, value)
            self._save_offsets(topic, offsets)

    def put_inbox(self, key: bytes, value: bytes | None) -> None:
        """Apply one inbox record (also a write this process made, before it comes back)."""
        user_id, _, notification_id = key.decode("utf-8", "replace").rpartition(":")
        if value is None:
            self._db.execute(
                "DELETE FROM inbox WHERE user_id = ? AND notification_id = ?",
                (user_id, notification_id),
            )
            return
        try:
            entry = decode_entry(value)
        except DecodeError as exc:
            log.warning("inbox view: record %r skipped: %s", key, exc)
            return
        self._db.execute(
            "INSERT OR REPLACE INTO inbox (user_id, notification_id, entry, created_at_ms, read)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                entry.user_id,
                entry.notification_id,
                value.decode("utf-8"),
                entry.created_at_ms,
                int(entry.read_at_ms is not None),
            ),
        )

    def inbox(
        self, user_id: str, *, unread_only: bool, cursor: str | None, limit: int
    ) -> tuple[list[InboxEntry], str | None]:
        """One page of a user's inbox, newest first, and the cursor of the next page."""
        sql = "SELECT entry FROM inbox WHERE user_id = ?"
        args: list[Any] = [user_id]
        if unread_only:
            sql += " AND read = 0"
        if cursor is not None:
            created_at_ms, notification_id = decode_cursor(cursor)
            sql += " AND (created_at_ms, notification_id) < (?, ?)"
            args += [created_at_ms, notification_id]
        sql += " ORDER BY created_at_ms DESC, notification_id DESC LIMIT ?"
        rows = self._db.execute(sql, [*args, limit + 1]).fetchall()
        entries = [decode_entry(r["entry"].encode()) for r in rows[:limit]]
        more = len(rows) > limit
        last = entries[-1] if entries else None
        next_cursor = (
            encode_cursor(last.created_at_ms, last.notification_id) if more and last else None
        )
        return entries, next_cursor

    def inbox_entry(self, user_id: str, notification_id: str) -> InboxEntry | None:
        """One entry of a user's inbox."""
        row = self._db.execute(
            "SELECT entry FROM inbox WHERE user_id = ? AND notification_id = ?",
            (user_id, notification_id),
        ).fetchone()
        return None if row is None else decode_entry(row["entry"].encode())

    def unread(self, user_id: str) -> list[InboxEntry]:
        """Every unread entry of a user."""
        rows = self._db.execute(
            "SELECT entry FROM inbox WHERE user_id = ? AND read = 0", (user_id,)
        ).fetchall()
        return [decode_entry(r["entry"].encode()) for r in rows]

    def unread_count(self, user_id: str) -> int:
        """How many entries of a user's inbox are unread."""
        row = self._db.execute(
            "SELECT count(*) FROM inbox WHERE user_id = ? AND read = 0", (user_id,)
        ).fetchone()
        return int(row[0])

    def keep_requests(
        self,
        requests: Iterable[tuple[str, bytes]],
        topic: str,
        offsets: dict[int, int],
        lane: str | None = None,
    ) -> None:
        """Keep the first copy of each route's request (route_id, wire bytes) as read
        from ``topic``: what a resend clones onto ``lane`` (default: ``topic``)."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO requests (route_id, topic, value) VALUES (?, ?, ?)",
                [(route_id, lane or topic, value) for route_id, value in requests],
            )
            self._save_offsets(topic, offsets)

    def request(self, route_id: str) -> tuple[str, bytes] | None:
        """(lane topic, request bytes) of a route, if the view has seen it."""
        row = self._db.execute(
            "SELECT topic, value FROM requests WHERE route_id = ?", (route_id,)
        ).fetchone()
        return None if row is None else (str(row["topic"]), bytes(row["value"]))

    def _save_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        self._db.executemany(
            "INSERT INTO offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
            "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
            [(topic, p, o) for p, o in offsets.items()],
        )

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _apply_one(self, event: StatusEvent) -> int:
        if not event.notification_id:  # intake refused it: no notification, a rejection
            return self._db.execute(
                "INSERT OR IGNORE INTO rejections (event_id, status, at_ms, notification_type,"
                " producer, idempotency_key, request_id, trace_id, reason, detail)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    event.event_id,
                    event.status,
                    event.at_ms,
                    event.notification_type,
                    event.producer,
                    event.idempotency_key,
                    event.request_id,
                    event.trace_id,
                    event.reason,
                    event.detail,
                ),
            ).rowcount
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO events (event_id, notification_id, route_id, status, at_ms,"
            " channel, user_id, attempt, reason, detail) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                event.event_id,
                event.notification_id,
                event.route_id,
                event.status,
                event.at_ms,
                event.channel,
                event.user_id,
                event.attempt,
                event.reason,
                event.detail,
            ),
        ).rowcount
        if not inserted:
            return 0
        self._db.execute(
            "INSERT INTO notifications (notification_id, notification_type, producer,"
            " idempotency_key, request_id, trace_id, status, first_at_ms, updated_at_ms,"
            " tenant_id) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (notification_id) DO UPDATE SET"
            " notification_type = coalesce(notification_type, excluded.notification_type),"
            " producer = coalesce(producer, excluded.producer),"
            " idempotency_key = coalesce(idempotency_key, excluded.idempotency_key),"
            " request_id = coalesce(request_id, excluded.request_id),"
            " trace_id = coalesce(trace_id, excluded.trace_id),"
            " tenant_id = coalesce(tenant_id, excluded.tenant_id),"
            " status = coalesce(excluded.status, status),"
            " updated_at_ms = max(updated_at_ms, excluded.updated_at_ms)",
            (
                event.notification_id,
                event.notification_type,
                event.producer,
                event.idempotency_key,
                event.request_id,
                event.trace_id,
                event.status if event.status in _INTAKE_STATUSES and not event.route_id else None,
                event.at_ms,
                event.at_ms,
                event.tenant_id,
            ),
        )
        if event.route_id:
            self._db.execute(
                "INSERT INTO deliveries (route_id, notification_id, notification_type, channel,"
                " user_id, status, attempts, reason, detail, request_id, resend_of,"
                " created_at_ms, updated_at_ms, tenant_id, template_version)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (route_id) DO UPDATE SET status = excluded.status,"
                " attempts = max(attempts, excluded.attempts), reason = excluded.reason,"
                " detail = excluded.detail,"
                " user_id = coalesce(user_id, excluded.user_id),"
                " tenant_id = coalesce(tenant_id, excluded.tenant_id),"
                " template_version = coalesce(excluded.template_version, template_version),"
                " updated_at_ms = max(updated_at_ms, excluded.updated_at_ms)",
                (
                    event.route_id,
                    event.notification_id,
                    event.notification_type,
                    event.channel,
                    event.user_id,
                    event.status,
                    event.attempt,
                    event.reason,
                    event.detail,
                    event.request_id,
                    event.detail if event.reason == RESEND_REASON else None,
                    event.at_ms,
                    event.at_ms,
                    event.tenant_id,
                    event.template_version,
                ),
            )
        return 1

    # --- reading ---------------------------------------------------------------

    def notification(self, notification_id: str) -> dict[str, Any] | None:
        """A notification with its deliveries and its own events, or None."""
        row = self._db.execute(
            "SELECT * FROM notifications WHERE notification_id = ?", (notification_id,)
        ).fetchone()
        if row is None:
            return None
        result = dict(row)
        result["deliveries"] = [
            dict(r)
            for r in self._db.execute(
                "SELECT * FROM deliveries WHERE notification_id = ? ORDER BY created_at_ms,"
                " route_id",
                (notification_id,),
            )
        ]
        result["events"] = self._events("notification_id = ? AND route_id IS NULL", notification_id)
        return result

    def notifications_by_request(self, request_id: str) -> list[dict[str, Any]]:
        """Every notification a caller's request_id produced, each with its deliveries."""
        ids = [
            r["notification_id"]
            for r in self._db.execute(
                "SELECT notification_id FROM notifications WHERE request_id = ?"
                " ORDER BY first_at_ms, notification_id",
                (request_id,),
            )
        ]
        return [n for n in (self.notification(i) for i in ids) if n is not None]

    def accepted(self, producer: str, idempotency_key: str) -> tuple[str, int] | None:
        """(notification id, first seen at) of what intake accepted under this key."""
        row = self._db.execute(
            "SELECT notification_id, first_at_ms FROM notifications"
            " WHERE producer = ? AND idempotency_key = ? ORDER BY first_at_ms DESC LIMIT 1",
            (producer, idempotency_key),
        ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def rejections_by_request(self, request_id: str) -> list[dict[str, Any]]:
        """Every intent of a caller's request_id that intake refused (``rejected``:
        invalid, ``rejected_conflict``: its key names other content), oldest first."""
        return [
            dict(r)
            for r in self._db.execute(
                "SELECT * FROM rejections WHERE request_id = ? ORDER BY at_ms, event_id",
                (request_id,),
            )
        ]

    def delivery(self, route_id: str) -> dict[str, Any] | None:
        """A delivery with its whole history (every event, attempts included), or None."""
        row = self._db.execute(
            "SELECT * FROM deliveries WHERE route_id = ?", (route_id,)
        ).fetchone()
        if row is None:
            return None
        result = dict(row)
        result["history"] = self._events("route_id = ?", route_id)
        return result

    def deliveries(
        self, query: DeliveryQuery, *, limit: int, after: tuple[int, str] | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of deliveries in creation order, and the cursor of the next page
        (None at the end). The order never changes, so pages have no gaps or repeats."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("user_id", query.recipient),
            ("status", query.status),
            ("channel", query.channel),
            ("notification_type", query.notification_type),
            ("tenant_id", query.tenant_id),
            ("reason", query.reason),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.since_ms is not None:
            clauses.append("created_at_ms >= ?")
            params.append(query.since_ms)
        if query.until_ms is not None:
            clauses.append("created_at_ms < ?")
            params.append(query.until_ms)
        if after is not None:
            clauses.append("(created_at_ms, route_id) > (?, ?)")
            params.extend(after)
        where = " AND ".join(clauses) or "1"
        rows = [
            dict(r)
            for r in self._db.execute(
                f"SELECT * FROM deliveries WHERE {where} ORDER BY created_at_ms, route_id LIMIT ?",
                (*params, limit + 1),
            )
        ]
        more = len(rows) > limit
        page = rows[:limit]
        cursor = encode_cursor(page[-1]["created_at_ms"], page[-1]["route_id"]) if more else None
        return page, cursor

    def _events(self, where: str, value: str) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self._db.execute(
                "SELECT status, at_ms, channel, attempt, reason, detail, event_id FROM events"
                f" WHERE {where} ORDER BY seq",
                (value,),
            )
        ]


class StatusFollower(Follower):
    """Follows notification.status (and the channel lanes, for the requests a resend
    clones) into a :class:`StatusStore`; ``ready`` once it has caught up with what the
    topics held when it started."""

    name = "status view"

    def __init__(self, settings: Settings, store: StatusStore, contracts: Contracts) -> None:
        self._settings = settings
        self._store = store
        self._contracts = contracts
        topology = Topology.load(settings)
        self.status_topic = settings.topic("notification.status")
        self._partitions = {
            settings.topic(name): topology.spec(name).partitions
            # Every channel's lanes: a route is read from the one it was routed to.
            for name in ("notification.status", *topology.lanes(), *KEPT_ROUTES, INBOX)
        }
        self.inbox_topic = settings.topic(INBOX)
        self._lanes = {
            settings.topic(kept): settings.topic(lane) for kept, lane in KEPT_ROUTES.items()
        }
        self.ready = asyncio.Event()

    async def _follow(self) -> None:
        consumer = await self._consumer(self._settings)
        try:
            assigned = [
                TopicPartition(topic, p)
                for topic, count in self._partitions.items()
                for p in range(count)
            ]
            consumer.assign(assigned)
            stored = {topic: self._store.next_offsets(topic) for topic in self._partitions}
            starts: dict[TopicPartition, int] = await consumer.beginning_offsets(assigned)
            for tp in assigned:
                # A file newer than the topic's start resumes; anything else re-reads.
                consumer.seek(tp, max(stored[tp.topic].get(tp.partition, 0), starts[tp]))
            ends: dict[TopicPartition, int] = await consumer.end_offsets(assigned)
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                for tp, records in batches.items():
                    self._apply(tp, records)
                if not self.ready.is_set() and await self._caught_up(consumer, ends):
                    log.info("status view ready")
                    self.ready.set()
        finally:
            await consumer.stop()

    def _apply(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        offsets = {tp.partition: records[-1].offset + 1}
        decode_status, decode_request = self._contracts.status, self._contracts.channel_request
        if tp.topic == self.status_topic:
            events = []
            for record in records:
                try:
                    events.append(decode_status.decode(record.value))
                except DecodeError as exc:  # not ours to fix here; the view skips it
                    log.warning("status view: undecodable status at %d: %s", record.offset, exc)
            self._store.apply(events, tp.topic, offsets)
            return
        if tp.topic == self.inbox_topic:
            self._store.apply_inbox(
                [(r.key, r.value) for r in records if r.key is not None], tp.topic, offsets
            )
            return
        requests = []
        for record in records:
            try:
                requests.append((decode_request.decode(record.value).route_id, record.value))
            except DecodeError:
                continue  # the channel agent reports it as malformed
        self._store.keep_requests(requests, tp.topic, offsets, self._lanes.get(tp.topic))
