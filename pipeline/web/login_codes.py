"""The login-code intake behind ``POST /api/v1/internal/login-code-deliveries``.

The auth service needs an answer it can act on at once: ``sent`` means the route is
durably in Kafka (acks=all) on the priority email lane, ``suppressed`` means the
address is on the suppression list and nothing will be sent. The same
Idempotency-Key with the same body always gets the same answer; with a different
body, a conflict. Idempotency records live in a compacted topic that every API
process reads whole at start, so any replica answers a repeat the same way; two
replicas racing on one new key both write the same deterministic route, which the
email channel's delivery registry sends once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline.contracts import Contracts
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import ChannelRequest, StatusEvent
from pipeline.errors import (
    BrokerUnavailableError,
    IdempotencyConflictError,
    InvalidAddressError,
    ValidationError,
)
from pipeline.providers.mime import checked_address
from pipeline.rendering import TemplateCatalog
from pipeline.runtime.records import Out
from pipeline.settings import Settings
from pipeline.stages.outputs import status_out
from pipeline.times import Clock
from pipeline.topology import Topology
from pipeline.topology.partitioning import partition_for
from pipeline.views import CompactedView, SuppressionList, address_key, json_value
from pipeline.web.writer import RequestWriter

#: The producer id login-code notifications are accepted under.
PRODUCER = "authsession"
TEMPLATE_ID = "auth.login_code"
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
_CODE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
_FIELDS = ("email", "code", "locale")


@dataclass(frozen=True, slots=True)
class LoginCodeRequest:
    """A validated request body."""

    email: str
    """Where the code goes."""
    code: str
    """The code itself."""
    locale: str
    """The user's language (the mail falls back to en)."""

    def fingerprint(self) -> str:
        """What makes two requests with one key the same request."""
        canonical = json.dumps([self.email.lower(), self.code, self.locale.lower()])
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_request(idempotency_key: str | None, body: bytes) -> tuple[str, LoginCodeRequest]:
    """The key and the body, strictly validated; ValidationError (with a reason) if not."""
    if not idempotency_key or not _KEY.match(idempotency_key):
        raise ValidationError(
            "Idempotency-Key header is required (1-200 visible ASCII characters)",
            reason="invalid_idempotency_key",
        )
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValidationError(f"body is not JSON: {exc}", reason="invalid_json") from exc
    if not isinstance(data, dict):
        raise ValidationError("body must be a JSON object", reason="invalid_json")
    unknown = sorted(set(data) - set(_FIELDS))
    missing = [f for f in _FIELDS if not isinstance(data.get(f), str)]
    if unknown or missing:
        raise ValidationError(
            f"body must have exactly the string fields {list(_FIELDS)} "
            f"(unknown: {unknown}, missing or not strings: {missing})",
            reason="invalid_fields",
        )
    try:
        email = checked_address(data["email"].strip())
    except InvalidAddressError as exc:
        raise ValidationError(exc.detail, reason="invalid_email") from exc
    if not _CODE.match(data["code"]):
        raise ValidationError("code must be 1-64 letters, digits or '-'", reason="invalid_code")
    if not _LOCALE.match(data["locale"]):
        raise ValidationError(
            "locale must be a language tag like en or pt-BR", reason="invalid_locale"
        )
    return idempotency_key, LoginCodeRequest(email=email, code=data["code"], locale=data["locale"])


class LoginCodeIntake:
    """Accepts login-code deliveries (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        contracts: Contracts,
        templates: TemplateCatalog,
        suppressions: SuppressionList,
        writer: RequestWriter,
        clock: Clock,
    ) -> None:
        self._contracts = contracts
        self._templates = templates
        self.suppressions = suppressions
        self.requests: CompactedView[dict[str, Any]] = CompactedView(
            settings, "herald.auth.requests", json_value, name="auth requests"
        )
        self._writer = writer
        self._clock = clock
        self._lane_topic = settings.topic("notification.email.priority")
        self._lane_partitions = (
            Topology.load(settings).spec("notification.email.priority").partitions
        )
        self._status_topic = settings.topic("notification.status")
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def ready(self) -> bool:
        """Whether both views are loaded (until then every request gets a 503)."""
        return self.requests.ready.is_set() and self.suppressions.ready.is_set()

    def start(self) -> None:
        """Start following the idempotency records and the suppression list."""
        self.requests.start()
        self.suppressions.start()

    async def stop(self) -> None:
        """Stop following and close the producer."""
        await self.requests.stop()
        await self.suppressions.stop()
        await self._writer.close()

    async def submit(self, idempotency_key: str, request: LoginCodeRequest) -> str:
        """``sent`` or ``suppressed``, once durable; IdempotencyConflictError or
        BrokerUnavailableError otherwise."""
        if not self.ready:
            raise BrokerUnavailableError(
                "not ready: the intake has not loaded its state from Kafka"
            )
        lock = self._locks.setdefault(idempotency_key, asyncio.Lock())
        try:
            async with lock:
                return await self._submit(idempotency_key, request)
        finally:
            if not lock.locked():
                self._locks.pop(idempotency_key, None)

    async def _submit(self, idempotency_key: str, request: LoginCodeRequest) -> str:
        key = idempotency_key.encode("utf-8")
        fingerprint = request.fingerprint()
        known = self.requests.get(key)
        if known is not None:
            if known.get("fp") != fingerprint:
                raise IdempotencyConflictError(
                    "this Idempotency-Key was used with a different request body"
                )
            return str(known["outcome"])
        now = self._clock.now_ms()
        notification_id = deterministic_id(PRODUCER, idempotency_key)
        route_id = deterministic_id(notification_id, "email", request.email.lower())
        suppressed = self.suppressions.reason(request.email)
        outcome = "suppressed" if suppressed else "sent"
        status = functools.partial(
            self._status,
            notification_id=notification_id,
            idempotency_key=idempotency_key,
            route_id=route_id,
            now_ms=now,
        )
        outputs = [status("accepted")]
        if suppressed:
            outputs.append(status("suppressed", suppressed))
        else:
            outputs += [self._route(request, notification_id, route_id, now), status("routed")]
        record = {"fp": fingerprint, "outcome": outcome, "nid": notification_id, "at": now}
        outputs.append(Out(self.requests.topic, key, json.dumps(record).encode()))
        await self._writer.deliver(outputs)
        self.requests.put(key, record)
        return outcome

    def _route(
        self, request: LoginCodeRequest, notification_id: str, route_id: str, now_ms: int
    ) -> Out:
        locale, fell_back = self._templates.resolve(TEMPLATE_ID, request.locale)
        route = ChannelRequest(
            route_id=route_id,
            notification_id=notification_id,
            notification_type=TEMPLATE_ID,
            channel="email",
            template_id=TEMPLATE_ID,
            address=request.email,
            locale=locale,
            locale_fallback=fell_back,
            variables_json=json.dumps({"code": request.code}),
            priority="critical",
            occurred_at_ms=now_ms,
            produced_at_ms=now_ms,
        )
        # Keyed (and partitioned) by address, like every route without a user.
        key = address_key(request.email)
        return Out(
            self._lane_topic,
            key,
            self._contracts.channel_request.encode(route),
            partition=partition_for(key, self._lane_partitions),
        )

    def _status(
        self,
        name: str,
        reason: str | None = None,
        *,
        notification_id: str,
        idempotency_key: str,
        route_id: str,
        now_ms: int,
    ) -> Out:
        route_level = name != "accepted"
        event = StatusEvent(
            event_id=deterministic_id(notification_id, route_id, name),
            status=name,
            at_ms=now_ms,
            notification_id=notification_id,
            notification_type=TEMPLATE_ID,
            producer=PRODUCER,
            idempotency_key=idempotency_key,
            route_id=route_id if route_level else None,
            channel="email" if route_level else None,
            reason=reason,
        )
        return status_out(self._contracts, self._status_topic, event)
