"""The operator endpoints: what happened to a notification, a delivery, a recipient.

Read from the API process's status view (pipeline.web.status_store); documented in
``openapi.yaml`` next to this module, which the API serves at /api/v1/openapi.yaml
and /api/v1/openapi.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from pipeline.errors import ConfigurationError, ValidationError
from pipeline.times import parse_time
from pipeline.web.status_store import (
    MAX_PAGE,
    DeliveryQuery,
    StatusFollower,
    StatusStore,
    decode_cursor,
)

STORE = web.AppKey("status_store", StatusStore)
FOLLOWER = web.AppKey("status_follower", StatusFollower)
OPENAPI = Path(__file__).with_name("openapi.yaml")
#: Path prefixes of the operator endpoints (guarded by HERALD_OPERATOR_TOKEN).
PREFIXES = ("/api/v1/notifications", "/api/v1/deliveries")


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
    return web.json_response(
        {"notifications": request.app[STORE].notifications_by_request(request_id)}
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
    """GET /api/v1/deliveries?recipient=&status=&channel=&type=&since=&until=&limit=&cursor="""
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
    app.router.add_get("/api/v1/openapi.yaml", openapi_yaml)
    app.router.add_get("/api/v1/openapi.json", openapi_json)
