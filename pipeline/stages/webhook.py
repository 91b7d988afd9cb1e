"""The webhook channel: each route is one signed JSON POST to an endpoint.

The endpoint is the type's (``webhook_endpoint`` in the catalog, a name that
HERALD_WEBHOOK_ENDPOINTS maps to a URL) or the user's own (their profile's
``contacts["webhook"]``). The body follows the Standard Webhooks shape::

    {"type": "<notification_type>", "timestamp": "<event time, ISO 8601>",
     "data": {"route_id": ..., "notification_id": ..., "user_id": ..., "locale": ...,
              "priority": ..., "request_id": ..., "tenant_id": ..., "payload": {...}}}

and each attempt is signed anew with HERALD_WEBHOOK_SECRET (pipeline.providers.webhook):
``webhook-id`` is the route_id, the same on every attempt, so a receiver drops a
copy it already has. Answers (pipeline.providers.http): 2xx sent; 410 disables the
endpoint (notification.webhook.disabled; later routes to it end ``suppressed`` with
reason ``endpoint_disabled`` until ``herald webhook enable``); 408, 429, 5xx, timeouts
and refused connections are transient, and a retry waits at least the endpoint's
Retry-After; any other 4xx is permanent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pipeline.contracts.records import ChannelRequest, Recipient, UserProfile
from pipeline.errors import ConfigurationError, HeraldError
from pipeline.providers.http import HttpPoster
from pipeline.providers.webhook import parse_secret, signed_headers
from pipeline.runtime.records import Out, Write
from pipeline.settings import Settings
from pipeline.stages.channel import Address, PlainTransport, Prepared, Sent
from pipeline.stages.context import StageContext
from pipeline.topology import TypeSpec
from pipeline.values import value_class
from pipeline.views import DisabledEndpoints

NAME = "webhook"
#: The longest URL Herald calls.
MAX_URL_CHARS = 2048


def url_problem(url: str, require_https: bool) -> str | None:
    """Why ``url`` is no webhook endpoint Herald calls, or None."""
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return str(exc)
    allowed = ("https",) if require_https else ("https", "http")
    if parts.scheme not in allowed:
        return f"scheme {parts.scheme!r} is not {' or '.join(allowed)}"
    if not parts.hostname:
        return "no host"
    if parts.username or parts.password:
        return "credentials in the URL"
    return None


class WebhookRouting:
    """The webhook channel to the route stage: the type's endpoint, else the user's."""

    name = NAME

    def __init__(self, settings: Settings) -> None:
        self._endpoints = settings.webhook_endpoints
        self._require_https = settings.webhook_require_https

    def address(self, profile: UserProfile, spec: TypeSpec) -> Address | str:
        if spec.webhook_endpoint is not None:
            url = self._endpoints.get(spec.webhook_endpoint)
        else:
            url = profile.contacts.get(NAME)
        if not url:
            return "no_webhook_endpoint"
        if url_problem(url, self._require_https) is not None:
            return "invalid_webhook_url"
        return Address(url)

    def deadline_ms(self, recipient: Recipient, spec: TypeSpec) -> int:
        return 0


@value_class
class WebhookMessage:
    """One webhook delivery, signed when it is sent."""

    url: str
    """The endpoint."""
    message_id: str
    """The ``webhook-id`` (the route_id)."""
    body: bytes
    """The JSON body."""


def webhook_body(request: ChannelRequest) -> bytes:
    """The JSON body of ``request``'s delivery (module docstring)."""
    data = {
        "route_id": request.route_id,
        "notification_id": request.notification_id,
        "notification_type": request.notification_type,
        "user_id": request.user_id,
        "locale": request.locale,
        "priority": request.priority,
        "request_id": request.request_id,
        "tenant_id": request.tenant_id,
    }
    occurred = datetime.fromtimestamp(request.occurred_at_ms / 1000, tz=UTC)
    envelope = {"type": request.notification_type, "timestamp": occurred.isoformat()}
    # The payload is a JSON object (intake checked it): spliced in as the producer wrote it.
    head = json.dumps(envelope, ensure_ascii=False)[:-1]
    rest = json.dumps(data, ensure_ascii=False)[:-1]
    return f'{head}, "data": {rest}, "payload": {request.variables_json}}}}}'.encode()


class WebhookTransport(PlainTransport):
    """Signs and POSTs one route's body; a 410 disables the endpoint. (No circuit:
    every endpoint is its own server.)"""

    def __init__(
        self,
        ctx: StageContext,
        keys: list[bytes],
        disabled: DisabledEndpoints,
        poster: HttpPoster,
    ) -> None:
        super().__init__(ctx)
        self._keys = keys
        self._disabled = disabled
        self._poster = poster

    async def ready(self) -> None:
        await self._disabled.ready.wait()

    def blocked(self, request: ChannelRequest) -> str | None:
        if request.address and self._disabled.reason(request.address) is not None:
            return "endpoint_disabled"
        return None

    def prepare(self, request: ChannelRequest, now_ms: int) -> Prepared[WebhookMessage]:
        message = WebhookMessage(request.address or "", request.route_id, webhook_body(request))
        return Prepared(message, request.locale)

    async def send(self, message: WebhookMessage) -> Sent:
        headers = signed_headers(self._keys, message.message_id, int(time.time()), message.body)
        headers["content-type"] = "application/json"
        receipt = await self._poster.post(message.url, message.body, headers)
        return Sent(f"{receipt.status} {receipt.body}")

    def after_failure(self, request: ChannelRequest, exc: HeraldError, now_ms: int) -> list[Out]:
        if exc.reason == "endpoint_gone" and request.address:
            return [self._disabled.entry(request.address, "gone", exc.detail, now_ms)]
        return []


class WebhookKind:
    """The webhook channel's parts, for the worker."""

    def __init__(self, ctx: StageContext) -> None:
        settings = ctx.settings
        self._ctx = ctx
        self._settings = settings
        users = ctx.catalog.using(NAME)
        for spec in users:
            name = spec.webhook_endpoint
            if name is not None and name not in settings.webhook_endpoints:
                raise ConfigurationError(
                    f"type {spec.name!r} names webhook endpoint {name!r}, which "
                    "HERALD_WEBHOOK_ENDPOINTS does not define"
                )
        for name, url in settings.webhook_endpoints.items():
            if problem := url_problem(url, settings.webhook_require_https):
                raise ConfigurationError(f"webhook endpoint {name!r}: {problem}")
        secret = settings.webhook_secret
        if users and secret is None:
            raise ConfigurationError(
                f"types {[t.name for t in users]} use the webhook channel: "
                "set HERALD_WEBHOOK_SECRET"
            )
        text = secret.get_secret_value() if secret is not None else ""
        self._keys = [parse_secret(part) for part in text.split()]
        self.disabled = DisabledEndpoints(settings)
        self.window = settings.webhook_connections

    def transport(self, write: Write) -> WebhookTransport:
        return WebhookTransport(self._ctx, self._keys, self.disabled, HttpPoster(self._settings))

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [self.disabled.run]
