"""Digests: a type's routes combined per user and channel into one message.

The route stage folds a route of a digest type (catalog ``digest:``) into the user's
open digest for that type and channel instead of routing it: the route ends
``digested``, its detail the digest's route id. A digest opens with its first route
and schedules its own close (a marker record through the channel's delay tiers back
to the route stage, on the user's partition); it goes out when the marker comes back
or when it holds ``max_items`` routes, as one route of its own (template
``<type>.digest``, variables ``items`` and ``count``) on the channel's lane.

Open digests live in the route stage's ``digests`` table, one JSON entry per user,
written with the batch's outputs and acknowledged with them: after a crash the
batch is handled again against the entry as it was, so a route is in exactly one
digest, and a digest's route id (from user, type, channel and opening time) and
content come out the same however often it is sent (the channel's registry sends a
route id once).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from pipeline.contracts import Contracts
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import ChannelRequest, StatusEvent
from pipeline.errors import ConfigurationError
from pipeline.rendering import DEFAULT_LOCALE, TemplateCatalog
from pipeline.runtime.records import Out, RawRecord, header
from pipeline.stages.delay import DelayTiers
from pipeline.stages.outputs import status_out
from pipeline.topology import Catalog, TypeSpec
from pipeline.topology.catalog import DigestSpec

#: Header of a digest's close marker: ``<type>|<channel>|<opened_ms>``.
DIGEST_CLOSE = "herald-digest-close"

#: How long a route waits before its lane: (until, reason, detail).
Wait = tuple[int, str, str]


class Digests:
    """Folds routes into digests and sends them (see the module docstring)."""

    def __init__(
        self,
        contracts: Contracts,
        status_topic: str,
        rejoin_topic: str,
        lanes: Mapping[tuple[str, str], str],
        deferral: Mapping[str, DelayTiers],
        cancelled: Callable[[str], str | None],
    ) -> None:
        self._contracts = contracts
        self._cancelled = cancelled
        self._status_topic = status_topic
        self._rejoin_topic = rejoin_topic
        self._lanes = lanes
        self._deferral = deferral

    def fold(
        self,
        table: MutableMapping[bytes, Any],
        request: ChannelRequest,
        digest: DigestSpec,
        now_ms: int,
    ) -> tuple[str, list[Out]]:
        """Add ``request`` to its user's open digest (opening one, with its close
        marker, if none is open); the digest's route id and the outputs (the digest
        itself when this route fills it)."""
        user = request.user_id or ""
        key = user.encode("utf-8")
        state = {name: dict(entry) for name, entry in (table.get(key) or {}).items()}
        name = f"{request.notification_type}|{request.channel}"
        entry = state.get(name)
        outputs: list[Out] = []
        if entry is None:
            opened = now_ms
            entry = {
                "id": deterministic_id(user, request.notification_type, request.channel, opened),
                "opened": opened,
                "items": [],
            }
            close = f"{name}|{opened}".encode()
            outputs.append(
                self._deferral[request.channel].schedule(
                    key,
                    b"",
                    self._rejoin_topic,
                    opened + digest.window_ms,
                    0,
                    now_ms,
                    ((DIGEST_CLOSE, close),),
                )
            )
        entry["items"] = [
            *entry["items"],
            {
                "route": request.route_id,
                "notification": request.notification_id,
                "vars": request.variables_json,
            },
        ]
        # The newest route's address and locale: the user's current ones.
        entry["last"] = self._contracts.channel_request.encode(request).hex()
        if len(entry["items"]) >= digest.max_items:
            outputs += self._send(entry, now_ms, None)
            state.pop(name, None)
        else:
            state[name] = entry
        _store(table, key, state)
        return str(entry["id"]), outputs

    def close(
        self,
        raw: RawRecord,
        table: MutableMapping[bytes, Any],
        quiet_end: Callable[[str], int | None],
        now_ms: int,
    ) -> list[Out]:
        """The digest a close marker names, sent (none if it went at its cap already);
        ``quiet_end`` says when the user's quiet hours end, if they are in them."""
        marker = (header(raw.headers, DIGEST_CLOSE) or b"").decode("utf-8", "replace")
        name, _, opened = marker.rpartition("|")
        key = raw.key or b""
        state = {n: dict(e) for n, e in (table.get(key) or {}).items()}
        entry = state.get(name)
        if entry is None or str(entry["opened"]) != opened:
            return []
        del state[name]
        _store(table, key, state)
        user = key.decode("utf-8", "replace")
        until = quiet_end(user)
        wait = None if until is None else (until, "quiet_hours", f"until {until}")
        return self._send(entry, now_ms, wait)

    def _send(self, entry: dict[str, Any], now_ms: int, wait: Wait | None) -> list[Out]:
        """The digest's own route (on its lane, or waiting out quiet hours), and its
        status event."""
        last = self._contracts.channel_request.decode(bytes.fromhex(entry["last"]))
        outputs: list[Out] = []
        kept = []
        for item in entry["items"]:
            by = self._cancelled(item["notification"])
            if by is None:
                kept.append(item)
                continue
            # Its notification was cancelled while the digest collected: left out.
            gone = dataclasses.replace(
                last, route_id=item["route"], notification_id=item["notification"]
            )
            outputs.append(self._status(gone, "cancelled", now_ms, "cancelled", f"by {by}"))
        if not kept:
            return outputs
        items = [json.loads(item["vars"]) for item in kept]
        digest_id = str(entry["id"])
        route = ChannelRequest(
            route_id=digest_id,
            # A digest is a notification of its own: its events are found by its id.
            notification_id=digest_id,
            notification_type=last.notification_type,
            channel=last.channel,
            template_id=DigestSpec.template_id(last.notification_type),
            user_id=last.user_id,
            address=last.address,
            device_tokens=list(last.device_tokens),
            locale=last.locale,
            locale_fallback=last.locale_fallback,
            variables_json=json.dumps({"items": items, "count": len(items)}),
            priority=last.priority,
            due_at_ms=0 if wait is None else wait[0],
            occurred_at_ms=int(entry["opened"]),
            produced_at_ms=now_ms,
            tenant_id=last.tenant_id,
        )
        value = self._contracts.channel_request.encode(route)
        lane = self._lanes[route.channel, route.priority]
        key = (route.user_id or "").encode("utf-8")
        detail = f"digest of {len(items)} routes"
        if wait is not None:
            until, reason, _ = wait
            target = self._deferral[route.channel].schedule(key, value, lane, until, 0, now_ms)
            deferred = self._status(route, "deferred", now_ms, reason, f"until {until}")
            return [*outputs, target, deferred]
        routed = self._status(route, "routed", now_ms, "digest", detail)
        return [*outputs, Out(lane, key, value), routed]

    def _status(
        self, route: ChannelRequest, status: str, now_ms: int, reason: str, detail: str
    ) -> Out:
        event = StatusEvent.of_route(
            route,
            status,
            now_ms,
            event_id=deterministic_id(route.route_id, status),
            reason=reason,
            detail=detail,
        )
        return status_out(self._contracts, self._status_topic, event)


def _store(table: MutableMapping[bytes, Any], key: bytes, state: dict[str, Any]) -> None:
    """Write a user's open digests; none left deletes the entry."""
    if state:
        table[key] = state
    elif key in table:
        del table[key]


def folds(spec: TypeSpec, channel: str, priority: str, wait: Wait | None) -> bool:
    """Whether a route of ``spec`` on ``channel`` goes into a digest: a digest type's
    route on a digest channel, but never a critical one; with ``when: limited`` only
    one a user limit would hold."""
    digest = spec.digest
    if digest is None or channel not in digest.channels or priority == "critical":
        return False
    return digest.when == "always" or (wait is not None and wait[1] == "rate_limited")


#: The template parts a digest needs per channel (any one of each tuple); webhook
#: deliveries carry the items as their payload and need none.
_PARTS: dict[str, tuple[str, ...]] = {
    "email": ("subject",),
    "slack": ("slack",),
    "sms": ("sms",),
    "inapp": ("inapp_title", "push_title", "subject"),
}


def check_templates(catalog: Catalog, templates: TemplateCatalog) -> None:
    """ConfigurationError, at start-up, for a digest type without the ``en`` template
    of its digests on one of its digest channels."""
    for spec in catalog.types.values():
        if spec.digest is None:
            continue
        template_id = DigestSpec.template_id(spec.name)
        for channel in spec.digest.channels:
            parts = _PARTS.get(channel, ())
            if parts and not any(templates.has(template_id, DEFAULT_LOCALE, p) for p in parts):
                raise ConfigurationError(
                    f"type {spec.name!r} sends {channel} digests but templates/{template_id}/"
                    f"{DEFAULT_LOCALE}/ has no {' or '.join(f'{p}.j2' for p in parts)}"
                )
