"""The in-app inbox API: a user's entries (newest first, a cursor, an unread filter),
marking one read or unread, marking all read, and the unread count.

Read from the API process's view of notification.inapp.inbox (pipeline.web.status_store);
a change is written to the topic (acknowledged, on the user's partition) and applied to
the view at once, so the caller reads its own write. Guarded by HERALD_API_TOKEN: an
app's backend calls it on behalf of its signed-in user.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from pipeline.contracts.inbox import InboxEntry, inbox_record
from pipeline.errors import BrokerUnavailableError, ValidationError
from pipeline.settings import Settings
from pipeline.times import Clock
from pipeline.topology import Topology
from pipeline.web.status_store import INBOX, MAX_PAGE, StatusStore
from pipeline.web.writer import RequestWriter


class Inbox:
    """Changes to users' inboxes, written to Kafka and applied to the view."""

    def __init__(self, settings: Settings, store: StatusStore, writer: RequestWriter) -> None:
        self.store = store
        self._writer = writer
        self._clock = Clock(settings.clock_offset_ms)
        self._topic = settings.topic(INBOX)
        self._partitions = Topology.load(settings).spec(INBOX).partitions

    async def mark(self, entries: list[InboxEntry], read: bool) -> list[InboxEntry]:
        """``entries`` read (now) or unread; the changed ones, once Kafka has them."""
        now = self._clock.now_ms()
        changed = [e.read(now if read else None) for e in entries if (e.read_at_ms is None) == read]
        records = [inbox_record(self._topic, self._partitions, e) for e in changed]
        if records:
            await self._writer.deliver(records)
        for record in records:
            assert record.key is not None
            self.store.put_inbox(record.key, record.value)
        return changed


INBOX_KEY = web.AppKey("inbox", Inbox)


def _entry(entry: InboxEntry) -> dict[str, Any]:
    data = dataclasses.asdict(entry)
    data["read"] = entry.read_at_ms is not None
    return data


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def list_inbox(request: web.Request) -> web.Response:
    """GET: one page of the user's inbox (``unread=true``: unread only)."""
    inbox = request.app[INBOX_KEY]
    user_id = request.match_info["user_id"]
    query = request.query
    try:
        limit = int(query.get("limit", "50"))
    except ValueError:
        return _error(400, "invalid_request", "limit must be a whole number")
    if not 1 <= limit <= MAX_PAGE:
        return _error(400, "invalid_request", f"limit must be 1 to {MAX_PAGE}")
    unread = query.get("unread", "false").lower()
    if unread not in ("true", "false"):
        return _error(400, "invalid_request", "unread must be true or false")
    try:
        entries, cursor = inbox.store.inbox(
            user_id, unread_only=unread == "true", cursor=query.get("cursor"), limit=limit
        )
    except ValidationError as exc:
        return _error(400, "invalid_request", f"{exc.reason}: {exc.detail}")
    return web.json_response(
        {
            "user_id": user_id,
            "entries": [_entry(e) for e in entries],
            "next_cursor": cursor,
            "unread_count": inbox.store.unread_count(user_id),
        }
    )


async def unread_count(request: web.Request) -> web.Response:
    """GET: how many entries of the user's inbox are unread."""
    user_id = request.match_info["user_id"]
    return web.json_response(
        {"user_id": user_id, "unread_count": request.app[INBOX_KEY].store.unread_count(user_id)}
    )


async def _mark_one(request: web.Request, read: bool) -> web.Response:
    inbox = request.app[INBOX_KEY]
    user_id, notification_id = request.match_info["user_id"], request.match_info["notification_id"]
    entry = inbox.store.inbox_entry(user_id, notification_id)
    if entry is None:
        return _error(404, "not_found", f"no inbox entry {notification_id} for {user_id}")
    try:
        await inbox.mark([entry], read)
    except BrokerUnavailableError:
        return _error(503, "service_unavailable", "Kafka is unavailable; nothing was changed")
    current = inbox.store.inbox_entry(user_id, notification_id)
    return web.json_response(_entry(current or entry))


async def mark_read(request: web.Request) -> web.Response:
    """POST: mark one entry read."""
    return await _mark_one(request, read=True)


async def mark_unread(request: web.Request) -> web.Response:
    """POST: mark one entry unread."""
    return await _mark_one(request, read=False)


async def mark_all_read(request: web.Request) -> web.Response:
    """POST: mark every unread entry of the user read."""
    inbox = request.app[INBOX_KEY]
    user_id = request.match_info["user_id"]
    try:
        changed = await inbox.mark(inbox.store.unread(user_id), read=True)
    except BrokerUnavailableError:
        return _error(503, "service_unavailable", "Kafka is unavailable; nothing was changed")
    return web.json_response({"user_id": user_id, "marked_read": len(changed), "unread_count": 0})


def add_routes(app: web.Application) -> None:
    """Register the inbox endpoints."""
    base = "/api/v1/users/{user_id}/inbox"
    app.router.add_get(base, list_inbox)
    app.router.add_get(f"{base}/unread-count", unread_count)
    app.router.add_post(f"{base}/read-all", mark_all_read)
    app.router.add_post(base + "/{notification_id}/read", mark_read)
    app.router.add_post(base + "/{notification_id}/unread", mark_unread)
