"""The operator endpoints: what happened to a notification, a delivery, a recipient.

Read from the API process's status view (pipeline.web.status_store); documented in
``openapi.yaml`` next to this module, which the API serves at /api/v1/openapi.yaml
and /api/v1/openapi.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from pipeline.contracts import Contracts
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import StatusEvent
from pipeline.errors import BrokerUnavailableError, ConfigurationError, ValidationError
from pipeline.runtime.records import Out
from pipeline.settings import Settings
from pipeline.times import Clock, parse_time
from pipeline.web.status_store import (
    MAX_PAGE,
    RESEND_REASON,
    DeliveryQuery,
    StatusFollower,
    StatusStore,
    decode_cursor,
)
from pipeline.web.writer import RequestWriter

STORE = web.AppKey("status_store", StatusStore)
FOLLOWER = web.AppKey("status_follower", StatusFollower)
OPENAPI = Path(__file__).with_name("openapi.yaml")
#: Path prefixes of the operator endpoints (guarded by HERALD_OPERATOR_TOKEN).
PREFIXES = ("/api/v1/notifications", "/api/v1/deliveries")
#: States after which a delivery may be resent.
TERMINAL = frozenset({"sent", "published", "dead_lettered", "expired", "suppressed", "cancelled"})


class Resends:
    """Clones a finished delivery as a new route on its lane (see :meth:`resend`)."""

    def __init__(
        self, settings: Settings, store: StatusStore, contracts: Contracts, writer: RequestWriter
    ) -> None:
        self._store = store
        self._contracts = contracts
        self._writer = writer
        self._clock = Clock(settings.clock_offset_ms)
        self._status_topic = settings.topic("notification.status")

    async def resend(
        self, route_id: str, idempotency_key: str | None, template: str = "current"
    ) -> dict[str, Any]:
        """Write a clone of ``route_id`` with a new route id (the same for the same
        Idempotency-Key), a fresh budget and, for push, a fresh TTL window; its first
        status event names the original. The original's history is left as it is.
        ``template``: ``current`` renders the templates deployed now, ``recorded`` the
        version the original rendered (from the template archive). LookupError when
        there is no such delivery; ValueError ("code: message") when it cannot be
        resent."""
        delivery = self._store.delivery(route_id)
        if delivery is None:
            raise LookupError(route_id)
        version = delivery.get("template_version") if template == "recorded" else None
        if template == "recorded" and version is None:
            raise ValueError(
                "no_template_version: the delivery recorded no template version (it rendered "
                "none, or was sent before versions were recorded)"
            )
        if delivery["status"] not in TERMINAL:
            raise ValueError(
                f"not_terminal: the delivery is {delivery['status']}; only one that is "
                f"{', '.join(sorted(TERMINAL))} can be resent"
            )
        kept = self._store.request(route_id)
        if kept is None:
            raise ValueError("request_unavailable: the route is no longer on its lane topic")
        lane, value = kept
        original = self._contracts.channel_request.decode(value)
        now = self._clock.now_ms()
        clone_id = deterministic_id(route_id, "resend", idempotency_key or uuid.uuid4().hex)
        ttl_ms = original.deadline_ms - original.occurred_at_ms if original.deadline_ms else 0
        clone = dataclasses.replace(
            original,
            route_id=clone_id,
            attempt=0,
            attempts=[],
            due_at_ms=0,
            replay_of=None,
            deadline_ms=now + ttl_ms if ttl_ms else 0,
            template_version=version,
        )
        event = StatusEvent.of_route(
            clone,
            "routed",
            now,
            event_id=deterministic_id(clone_id, "routed", RESEND_REASON),
            reason=RESEND_REASON,
            detail=route_id,
        )
        await self._writer.deliver(
            [
                Out(lane, clone.record_key(), self._contracts.channel_request.encode(clone)),
                Out(
                    self._status_topic,
                    clone.notification_id.encode(),
                    self._contracts.status.encode(event),
                ),
            ]
        )
        return {
            "route_id": clone_id,
            "resend_of": route_id,
            "status": "routed",
            "template": template,
            "template_version": version,
        }


RESENDS = web.AppKey("resends", Resends)
#: What a resend renders: the templates deployed now, or the version the original did.
TEMPLATE_CHOICES = ("current", "recorded")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _not_ready(request: web.Request) -> web.Response | None:
    if not request.app[FOLLOWER].ready.is_set():
        return _error(503, "service_unavailable", "the status view is still loading")
    return None


async def get_notification(request: web.Request) -> web.Response:
    """GET /api/v1/notifications/{notification_id}."""
    if busy := _not_ready(request):
        return busy
    found = request.app[STORE].notification(request.match_info["notification_id"])
    if found is None:
        return _error(404, "not_found", "no such notification")
    return web.json_response(found)


async def find_notifications(request: web.Request) -> web.Response:
    """GET /api/v1/notifications?request_id=..."""
    if busy := _not_ready(request):
        return busy
    request_id = request.query.get("request_id")
    if not request_id:
        return _error(400, "invalid_request", "request_id is required")
    store = request.app[STORE]
    return web.json_response(
        {
            "notifications": store.notifications_by_request(request_id),
            # intents of this request intake refused: they made no notification
            "rejections": store.rejections_by_request(request_id),
        }
    )


async def get_delivery(request: web.Request) -> web.Response:
    """GET /api/v1/deliveries/{route_id}: the delivery and its attempt history."""
    if busy := _not_ready(request):
        return busy
    found = request.app[STORE].delivery(request.match_info["route_id"])
    if found is None:
        return _error(404, "not_found", "no such delivery")
    return web.json_response(found)


async def list_deliveries(request: web.Request) -> web.Response:
    """GET /api/v1/deliveries?recipient=&status=&reason=&channel=&type=&tenant_id=&since=
    &until=&limit=&cursor="""
    if busy := _not_ready(request):
        return busy
    q = request.query
    try:
        now = int(time.time() * 1000)
        query = DeliveryQuery(
            recipient=q.get("recipient"),
            status=q.get("status"),
            channel=q.get("channel"),
            notification_type=q.get("type"),
            tenant_id=q.get("tenant_id"),
            reason=q.get("reason"),
            since_ms=parse_time(q["since"], now) if "since" in q else None,
            until_ms=parse_time(q["until"], now) if "until" in q else None,
        )
        limit = int(q.get("limit", "50"))
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1 to {MAX_PAGE}")
        after = decode_cursor(q["cursor"]) if "cursor" in q else None
    except (ValueError, ConfigurationError, ValidationError) as exc:
        return _error(400, "invalid_request", str(exc))
    page, cursor = request.app[STORE].deliveries(query, limit=limit, after=after)
    return web.json_response({"deliveries": page, "next_cursor": cursor})


async def resend_delivery(request: web.Request) -> web.Response:
    """POST /api/v1/deliveries/{route_id}/resend."""
    if busy := _not_ready(request):
        return busy
    route_id = request.match_info["route_id"]
    template = request.query.get("template", "current")
    if template not in TEMPLATE_CHOICES:
        return _error(400, "invalid_template", f"template is one of {', '.join(TEMPLATE_CHOICES)}")
    try:
        clone = await request.app[RESENDS].resend(
            route_id,
            request.headers.get("Idempotency-Key"),
            template,
        )
    except LookupError:
        return _error(404, "not_found", "no such delivery")
    except ValueError as exc:
        code, _, message = str(exc).partition(": ")
        return _error(409, code, message)
    except BrokerUnavailableError:
        return _error(503, "service_unavailable", "Kafka is unavailable; nothing was resent")
    return web.json_response(clone, status=202)


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document."""
    document: dict[str, Any] = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    return document


async def openapi_yaml(request: web.Request) -> web.Response:
    return web.Response(text=OPENAPI.read_text(encoding="utf-8"), content_type="application/yaml")


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(openapi_document()), content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register the operator endpoints and the OpenAPI document."""
    app.router.add_get("/api/v1/notifications", find_notifications)
    app.router.add_get("/api/v1/notifications/{notification_id}", get_notification)
    app.router.add_get("/api/v1/deliveries", list_deliveries)
    app.router.add_get("/api/v1/deliveries/{route_id}", get_delivery)
    app.router.add_post("/api/v1/deliveries/{route_id}/resend", resend_delivery)
    app.router.add_get("/api/v1/openapi.yaml", openapi_yaml)
    app.router.add_get("/api/v1/openapi.json", openapi_json)
