"""Herald's HTTP API (aiohttp): the intent intake (pipeline.web.intents), the
login-code intake, the operator endpoints (pipeline.web.operator_api), the in-app
inbox, liveness and readiness.

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` with stable codes:
``invalid_request`` (400), ``unauthorized`` (401), ``not_found`` (404),
``idempotency_conflict`` (409), ``payload_too_large`` (413), ``rate_limited`` (429),
``service_unavailable`` (503) and ``internal_error`` (500).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import SecretStr

from pipeline import logs, tracing
from pipeline.contracts import Contracts
from pipeline.errors import (
    BrokerUnavailableError,
    IdempotencyConflictError,
    InvalidRequestError,
    RateLimitedError,
    ValidationError,
)
from pipeline.metrics import answered, declare_tenants
from pipeline.rendering import TemplateCatalog
from pipeline.runtime.memory import tune_gc
from pipeline.settings import Settings
from pipeline.times import Clock
from pipeline.views import SuppressionList
from pipeline.web import inbox, operator_api
from pipeline.web.intents import Cancels, IntentIntake, parse_intent
from pipeline.web.lag import ConsumerLagCollector
from pipeline.web.login_codes import LoginCodeIntake, parse_request
from pipeline.web.status_store import StatusFollower, StatusStore
from pipeline.web.writer import RequestWriter

log = logging.getLogger(__name__)

LOGIN_CODES = "/api/v1/internal/login-code-deliveries"
NOTIFICATIONS = "/api/v1/notifications"
INTAKE = web.AppKey("intake", LoginCodeIntake)
INTENTS = web.AppKey("intents", IntentIntake)
CANCELS = web.AppKey("cancels", Cancels)
SETTINGS = web.AppKey("settings", Settings)
LAG = web.AppKey("lag", ConsumerLagCollector)
LAG_REGISTRY = web.AppKey("lag_registry", CollectorRegistry)
#: Paths a load balancer, kubelet or API client reads without a token.
_OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/api/v1/openapi.yaml", "/api/v1/openapi.json"}
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, code: str, message: str) -> web.Response:
    """A JSON error response."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _bearer(request: web.Request, token: SecretStr) -> bool:
    given = request.headers.get("Authorization", "").encode()
    return hmac.compare_digest(given, f"Bearer {token.get_secret_value()}".encode())


def _producer_intake(request: web.Request) -> bool:
    # The intent intake and its cancel authenticate producers themselves
    # (HERALD_PRODUCER_TOKENS).
    return request.method == "POST" and (
        request.path == NOTIFICATIONS
        or (request.path.startswith(NOTIFICATIONS + "/") and request.path.endswith("/cancel"))
    )


@web.middleware
async def _traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A server span per request when tracing is on, continuing the caller's trace
    (W3C traceparent); the records the request writes carry it (RequestWriter)."""
    tracer = tracing.tracer()
    if tracer is None:
        return await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    with tracer.start_as_current_span(
        f"{request.method} {route}",
        context=tracing.context_of_http(request.headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route},
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    token = settings.api_token
    if request.path.startswith(operator_api.PREFIXES) and settings.operator_token is not None:
        token = settings.operator_token
    guarded = request.path not in _OPEN_PATHS and not _producer_intake(request)
    if token is not None and guarded and not _bearer(request, token):
        return error(401, "unauthorized", "a valid bearer token is required")
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:  # never a stack trace to a caller
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error(500, "internal_error", "internal error")


async def login_code_deliveries(request: web.Request) -> web.Response:
    """POST: accept one login-code mail (see pipeline.web.login_codes)."""
    intake = request.app[INTAKE]
    try:
        key, body = parse_request(request.headers.get("Idempotency-Key"), await request.read())
        outcome = await intake.submit(key, body)
    except ValidationError as exc:
        return error(400, "invalid_request", f"{exc.reason}: {exc.detail}")
    except IdempotencyConflictError as exc:
        return error(409, "idempotency_conflict", exc.detail)
    except BrokerUnavailableError as exc:
        log.warning("login code not accepted: %s", exc)
        return error(503, "service_unavailable", "Kafka is unavailable; nothing was accepted")
    return web.json_response({"outcome": outcome})


def _producer(request: web.Request) -> tuple[bool, str | None]:
    """Whether the caller may send intents, and as which producer (None: any, named by
    the body): a producer's token; else HERALD_API_TOKEN, or anyone when the API has no
    token of either kind."""
    settings = request.app[SETTINGS]
    for producer, token in settings.producer_tokens.items():
        if _bearer(request, token):
            return True, producer
    if settings.api_token is not None:
        return _bearer(request, settings.api_token), None
    return not settings.producer_tokens, None


async def post_notification(request: web.Request) -> web.Response:
    """POST /api/v1/notifications: accept one intent (see pipeline.web.intents)."""
    started = time.monotonic()
    outcome, response = await _intent(request)
    answered(outcome, time.monotonic() - started)
    return response


async def _intent(request: web.Request) -> tuple[str, web.Response]:
    intake = request.app[INTENTS]
    allowed, producer = _producer(request)
    if not allowed:
        return "unauthorized", error(401, "unauthorized", "a producer's bearer token is required")
    if not request.app[operator_api.FOLLOWER].ready.is_set():
        return "unavailable", error(503, "service_unavailable", "the status view is loading")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return "too_large", error(413, "payload_too_large", "the body is over the size limit")
    try:
        intent = parse_intent(body, request.headers.get("Idempotency-Key"), producer)
        intake.limits.spend(intent.producer, intent.tenant_id)
        accepted = await intake.submit(intake.check(intent))
    except InvalidRequestError as exc:
        if any(p.reason == "payload_too_large" for p in exc.problems):
            return "too_large", error(413, "payload_too_large", exc.detail)
        if producer is not None:
            key = request.headers.get("Idempotency-Key")
            await intake.record_rejection(producer, key, body, exc)
        return "invalid", _invalid(exc)
    except RateLimitedError as exc:
        response = error(429, "rate_limited", exc.detail)
        response.headers["Retry-After"] = str(int(exc.retry_after_s or 1))
        return "rate_limited", response
    except IdempotencyConflictError as exc:
        return "conflict", error(409, "idempotency_conflict", exc.detail)
    except BrokerUnavailableError as exc:
        log.warning("intent not accepted: %s", exc)
        return "unavailable", error(
            503, "service_unavailable", "Kafka is unavailable; nothing was accepted"
        )
    answer = {
        "notification_id": accepted.notification_id,
        "replayed": accepted.replayed,
        "status_url": f"{NOTIFICATIONS}/{accepted.notification_id}",
    }
    return ("replayed" if accepted.replayed else "accepted"), web.json_response(answer, status=202)


async def cancel_notification(request: web.Request) -> web.Response:
    """POST /api/v1/notifications/{notification_id}/cancel: by an operator, or by the
    notification's own producer (see pipeline.web.intents.Cancels)."""
    settings, cancels = request.app[SETTINGS], request.app[CANCELS]
    notification_id = request.match_info["notification_id"]
    if not request.app[operator_api.FOLLOWER].ready.is_set():
        return error(503, "service_unavailable", "the status view is loading")
    operator = settings.operator_token or settings.api_token
    try:
        if operator is None or _bearer(request, operator):
            by = "operator"
        else:
            allowed, producer = _producer(request)
            if not allowed or producer is None:
                return error(401, "unauthorized", "an operator's or a producer's token is required")
            if cancels.producer_of(notification_id) != producer:
                return error(403, "forbidden", "a producer cancels only its own notifications")
            by = f"producer {producer}"
        answer = await cancels.cancel(notification_id, by)
    except LookupError:
        return error(404, "not_found", "no such notification")
    except BrokerUnavailableError:
        return error(503, "service_unavailable", "Kafka is unavailable; nothing was cancelled")
    return web.json_response(answer, status=202)


def _invalid(exc: InvalidRequestError) -> web.Response:
    problems = [{"reason": p.reason, "detail": p.detail} for p in exc.problems]
    return web.json_response(
        {"error": {"code": "invalid_request", "message": exc.detail, "problems": problems}},
        status=400,
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics: this process's, and the workers' consumer lag."""
    registry = request.app[LAG_REGISTRY]
    loop = asyncio.get_running_loop()
    # The lag collector asks the brokers: off the event loop.
    body = await loop.run_in_executor(
        None, lambda: generate_latest(REGISTRY) + generate_latest(registry)
    )
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the brokers answer, and the intake and the status view have loaded
    their state from Kafka."""
    loop = asyncio.get_running_loop()
    checks = {
        "broker": await loop.run_in_executor(None, request.app[LAG].broker_reachable),
        "login_code_intake": request.app[INTAKE].ready,
        "status_view": request.app[operator_api.FOLLOWER].ready.is_set(),
    }
    ready = all(checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


def create_app(settings: Settings) -> web.Application:
    """The API application; its Kafka views start with it and stop with it."""
    # Room for a payload at its cap even when every character is escaped in JSON.
    body_cap = max(64 * 1024, 2 * settings.payload_max_bytes + 16 * 1024)
    app = web.Application(middlewares=[_traced, _guard], client_max_size=body_cap)
    contracts = Contracts(settings)
    writer = RequestWriter(settings)
    clock = Clock(settings.clock_offset_ms)
    intake = LoginCodeIntake(
        settings,
        contracts,
        TemplateCatalog(settings.templates_dir),
        SuppressionList(settings),
        writer,
        clock,
    )
    store = StatusStore(settings.status_db_path)
    follower = StatusFollower(settings, store, contracts)
    app[SETTINGS] = settings
    app[INTAKE] = intake
    app[INTENTS] = IntentIntake(settings, contracts, store, writer, clock)
    declare_tenants(app[INTENTS].limits.tenants)
    app[CANCELS] = Cancels(settings, contracts, store, writer, clock)
    app[operator_api.STORE] = store
    app[operator_api.FOLLOWER] = follower
    lag = ConsumerLagCollector(settings)
    app[LAG] = lag
    app[LAG_REGISTRY] = CollectorRegistry(auto_describe=False)
    app[LAG_REGISTRY].register(lag)
    app[operator_api.RESENDS] = operator_api.Resends(settings, store, contracts, writer)
    app[inbox.INBOX_KEY] = inbox.Inbox(settings, store, writer)
    app.router.add_post(LOGIN_CODES, login_code_deliveries)
    app.router.add_post(NOTIFICATIONS, post_notification)
    app.router.add_post(NOTIFICATIONS + "/{notification_id}/cancel", cancel_notification)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    operator_api.add_routes(app)
    inbox.add_routes(app)

    async def start(_: web.Application) -> None:
        intake.start()
        follower.start()

    async def stop(_: web.Application) -> None:
        await intake.stop()
        await follower.stop()
        store.close()
        lag.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def run(settings: Settings) -> None:
    """Serve the API until SIGINT/SIGTERM (blocking)."""
    logs.configure(settings)
    tracing.configure(settings, "herald-api")
    # No access log: at hundreds of requests a second, a JSON line each cost the API a
    # tenth of its time; herald_http_intent_seconds and the load balancer's log say as
    # much (docs/http-intake.md).
    app = create_app(settings)
    # As in the worker: with the collector's defaults, a full collection of what the
    # process holds stalled every request in flight for tens of milliseconds.
    tune_gc(settings.gc_young_threshold)
    web.run_app(app, host=settings.api_host, port=settings.api_port, access_log=None)
