"""Enrichment and routing: join each recipient with its user, decide per channel.

For every recipient and every channel of its type, exactly one outcome: ``routed``
(a ChannelRequest on the channel's topic), ``deferred`` (the same request, waiting
in the channel's delay tiers for the end of the user's quiet hours, or for a window
of a user limit with room: topologies/limits.yaml), ``skipped`` (with the reason),
``recipient_unknown`` (the user never appeared within the wait budget) or
``cancelled`` (its notification was cancelled first).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline import metrics
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import (
    ChannelRequest,
    QuietHours,
    Recipient,
    StatusEvent,
    UserProfile,
)
from pipeline.errors import DecodeError
from pipeline.rendering import DEFAULT_LOCALE
from pipeline.runtime.records import Out, RawRecord, header
from pipeline.stages.channel import Address, ChannelRouting
from pipeline.stages.context import StageContext
from pipeline.stages.delay import DelayTiers, attempt_of
from pipeline.stages.deliveries import FALLBACK
from pipeline.stages.digest import DIGEST_CLOSE, Digests, Wait, folds
from pipeline.stages.outputs import malformed, status_out
from pipeline.topology import TypeSpec
from pipeline.topology.model import PRIORITIES


def quiet_until_ms(quiet: QuietHours | None, timezone: str | None, now_ms: int) -> int | None:
    """End of the quiet window containing ``now_ms`` (epoch ms), or None outside one.

    Times are wall-clock in the user's timezone (UTC when unset or unknown); a window
    whose end is earlier than its start runs overnight.
    """
    if quiet is None:
        return None
    try:
        zone = ZoneInfo(timezone) if timezone else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    start, end = _hhmm(quiet.start), _hhmm(quiet.end)
    if start is None or end is None or start == end:
        return None
    local = datetime.fromtimestamp(now_ms / 1000, tz=UTC).astimezone(zone)
    now_t = local.time().replace(tzinfo=None)
    today: date = local.date()
    if start < end:
        if not start <= now_t < end:
            return None
        end_day = today
    elif now_t >= start:
        end_day = today + timedelta(days=1)
    elif now_t < end:
        end_day = today
    else:
        return None
    end_at = datetime.combine(end_day, end, tzinfo=zone)
    return int(end_at.timestamp() * 1000)


def _hhmm(text: str) -> time | None:
    try:
        hours, minutes = text.split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RouteTables:
    """The route stage's tables besides the users table, keyed by user_id (None: not
    kept, as in a unit test of other decisions)."""

    limits: MutableMapping[bytes, Any] | None = None
    """Each user's counts per user limit and window (pipeline.topology.limits)."""
    digests: MutableMapping[bytes, Any] | None = None
    """Each user's open digests (pipeline.stages.digest)."""


NO_TABLES = RouteTables()


def opted_out(profile: UserProfile, spec: TypeSpec, channel: str, priority: str) -> str | None:
    """Why ``profile`` does not want ``channel`` for this type, or None."""
    if spec.opt_out == "ignored":
        return None
    if channel in profile.channels_disabled:
        return "channel_disabled"
    if spec.opt_out == "optional" and priority == "critical":
        return None
    wishes = set(profile.opt_outs)
    if wishes & {spec.name, spec.category, f"{channel}:{spec.name}", f"{channel}:{spec.category}"}:
        return "opted_out"
    return None


class Router:
    """The routing decisions for one recipient record (see the module docstring)."""

    def __init__(self, ctx: StageContext, channels: Mapping[str, ChannelRouting]) -> None:
        settings, topology = ctx.settings, ctx.topology
        self._contracts = ctx.contracts
        # Profiles change rarely and are read per recipient: decode each version once
        # (keyed by its bytes, so a new version is a new entry; never mutated here).
        self._profile = functools.lru_cache(maxsize=8192)(ctx.contracts.user.decode)
        self._catalog = ctx.catalog
        self._templates = ctx.templates
        self._cancellations = ctx.cancellations
        self._limits = ctx.limits
        self._channels = dict(channels)
        self.recipients_topic = settings.topic("notification.recipients")
        # Waiting recipients come back here, so notification.recipients keeps exactly
        # one record per accepted recipient.
        self.rejoin_topic = settings.topic("notification.recipients.rejoin")
        self._status_topic = settings.topic("notification.status")
        self._malformed_topic = settings.topic("notification.malformed")
        # Each channel's lane per priority (critical routes take a priority lane where
        # the channel has one, so login codes never queue behind bulk mail).
        self._lanes = {
            (name, priority): settings.topic(topology.channel(name).lane_for(priority))
            for name in self._channels
            for priority in PRIORITIES
        }
        self._wait = DelayTiers.of(topology.retry["recipients"], settings)
        self._deferral = {
            name: DelayTiers.of(topology.retry[name], settings) for name in self._channels
        }
        self._digests = Digests(
            ctx.contracts,
            self._status_topic,
            self.rejoin_topic,
            self._lanes,
            self._deferral,
            ctx.cancellations.reason,
        )

    def handle(
        self,
        raw: RawRecord,
        users: Mapping[bytes, bytes],
        now_ms: int,
        tables: RouteTables = NO_TABLES,
    ) -> list[Out]:
        """Every output for one recipient record (or digest close marker); ``users``
        maps user_id to profile bytes."""
        if header(raw.headers, DIGEST_CLOSE) is not None:
            if tables.digests is None:
                return []
            return self._digests.close(
                raw, tables.digests, lambda user: self._quiet_end(users, user, now_ms), now_ms
            )
        if header(raw.headers, FALLBACK) is not None:
            return self._fall_back(raw, users, now_ms, tables)
        try:
            recipient = self._contracts.recipient.decode(raw.value)
        except DecodeError as exc:
            return [self._malformed(raw, exc, now_ms)]
        spec = self._catalog.get(recipient.notification_type)
        if spec is None:  # the catalog lost the type after intake accepted it
            return [self._status(recipient, "failed", now_ms, reason="unknown_notification_type")]
        if (by := self._cancellations.reason(recipient.notification_id)) is not None:
            return self._cancelled(recipient, spec, by, now_ms)
        if recipient.audience_kind == "admin_email":
            return self._admin_routes(recipient, spec, now_ms)
        user_id = recipient.user_id or ""
        profile_bytes = users.get(user_id.encode("utf-8"))
        if profile_bytes is None:
            return self._wait_for_user(raw, recipient, spec, now_ms)
        profile = self._profile(profile_bytes)
        return self._user_routes(recipient, spec, profile, now_ms, tables)

    def _cancelled(self, recipient: Recipient, spec: TypeSpec, by: str, now_ms: int) -> list[Out]:
        """Every route the recipient would have had, ``cancelled``."""
        if recipient.audience_kind == "admin_email":
            routes = [
                ("email", self.route_id(recipient, "email", a)) for a in spec.admin_recipients
            ]
        else:
            routes = [(c, self.route_id(recipient, c)) for c in spec.channels.get("user", ())]
        return [
            self._status(recipient, "cancelled", now_ms, channel=c, route_id=r, detail=f"by {by}")
            for c, r in routes
        ]

    def _wait_for_user(
        self, raw: RawRecord, recipient: Recipient, spec: TypeSpec, now_ms: int
    ) -> list[Out]:
        attempt = attempt_of(raw.headers) + 1
        if attempt < self._wait.policy.budget:
            due = now_ms + int(self._wait.backoff_s(attempt) * 1000)
            wait = self._wait.schedule(raw.key, raw.value, self.rejoin_topic, due, attempt, now_ms)
            return [dataclasses.replace(wait, note=metrics.Note("enrichment_miss"))]
        return [
            self._status(
                recipient,
                "recipient_unknown",
                now_ms,
                channel=channel,
                route_id=self.route_id(recipient, channel),
                attempt=attempt,
                detail=f"user not in the directory after {attempt} lookups",
            )
            for channel in spec.channels.get("user", ())
        ]

    def _malformed(self, raw: RawRecord, exc: DecodeError, now_ms: int) -> Out:
        return malformed(
            self._contracts, self._malformed_topic, raw, exc.reason, exc.detail, now_ms
        )

    def _fall_back(
        self,
        raw: RawRecord,
        users: Mapping[bytes, bytes],
        now_ms: int,
        tables: RouteTables,
    ) -> list[Out]:
        """The next channel of a fallback type, after a route that ended without reaching
        the user (pipeline.stages.deliveries.Deliveries.fallback): ``raw`` holds it."""
        try:
            failed = self._contracts.channel_request.decode(raw.value)
        except DecodeError as exc:
            return [self._malformed(raw, exc, now_ms)]
        spec = self._catalog.get(failed.notification_type)
        profile_bytes = users.get((failed.user_id or "").encode("utf-8"))
        if spec is None or not spec.fallback_when or profile_bytes is None:
            return []  # the type or the user is gone since: nothing left to try
        if self._cancellations.reason(failed.notification_id) is not None:
            return []  # cancelled since: no further channel
        recipient = Recipient(
            notification_id=failed.notification_id,
            notification_type=failed.notification_type,
            audience_kind="user",
            user_id=failed.user_id,
            # The route does not carry these; the notification's intake events do.
            producer="",
            idempotency_key="",
            occurred_at_ms=failed.occurred_at_ms,
            accepted_at_ms=0,
            produced_at_ms=failed.produced_at_ms,
            priority=failed.priority,
            request_id=failed.request_id,
            trace_id=failed.trace_id,
            tenant_id=failed.tenant_id,
            payload_json=failed.variables_json,
        )
        profile = self._profile(profile_bytes)
        return self._user_routes(recipient, spec, profile, now_ms, tables, after=failed)

    def _user_routes(
        self,
        recipient: Recipient,
        spec: TypeSpec,
        profile: UserProfile,
        now_ms: int,
        tables: RouteTables,
        after: ChannelRequest | None = None,
    ) -> list[Out]:
        """A route (or skip) per user channel; for a fallback type, only the first
        channel after ``after`` that takes one (skipping, while skips fall back)."""
        locale, fell_back = self._templates.resolve(spec.name, profile.preferred_language)
        quiet_end = None
        if recipient.priority != "critical":
            quiet_end = quiet_until_ms(profile.quiet_hours, profile.timezone, now_ms)
        chain = spec.fallback_when
        outputs: list[Out] = []
        for name in spec.next_channels(after.channel if after else None):
            channel = self._channels[name]
            route_id = self.route_id(recipient, name)
            reason = opted_out(profile, spec, name, recipient.priority)
            found = channel.address(profile, spec) if reason is None else reason
            if isinstance(found, str):
                outputs.append(
                    self._status(
                        recipient, "skipped", now_ms, channel=name, route_id=route_id, reason=found
                    )
                )
                if chain and "skipped" not in chain:
                    break
                continue
            wait = None if quiet_end is None else (quiet_end, "quiet_hours", f"until {quiet_end}")
            limits = tables.limits
            if not self._limits.limits_users or recipient.priority == "critical":
                limits = None
            request = self._request(
                recipient,
                name,
                route_id,
                locale,
                fell_back,
                address=found,
                deadline_ms=channel.deadline_ms(recipient, spec),
                due_at_ms=0,
            )
            held = wait
            if limits is not None and spec.digest is not None and spec.digest.when == "limited":
                # Only such a type asks where a limit would put the route before deciding.
                held = self._limit(limits, recipient, name, spec.category, now_ms, wait, take=False)
            if (
                tables.digests is not None
                and spec.digest
                and folds(spec, name, recipient.priority, held)
            ):
                digest_id, sent = self._digests.fold(tables.digests, request, spec.digest, now_ms)
                outputs.append(
                    self._status(
                        recipient,
                        "digested",
                        now_ms,
                        channel=name,
                        route_id=route_id,
                        reason="digest",
                        detail=digest_id,
                    )
                )
                outputs.extend(sent)
            else:
                if limits is not None:
                    wait = self._limit(limits, recipient, name, spec.category, now_ms, wait)
                if wait is not None:
                    request = dataclasses.replace(request, due_at_ms=wait[0])
                outputs.extend(
                    self._emit(
                        recipient,
                        request,
                        wait,
                        now_ms,
                        key=(recipient.user_id or "").encode("utf-8"),
                        after=after,
                    )
                )
            if chain:
                break
        return outputs

    def _quiet_end(self, users: Mapping[bytes, bytes], user_id: str, now_ms: int) -> int | None:
        """When the user's quiet hours end, if they are in them now."""
        profile_bytes = users.get(user_id.encode("utf-8"))
        if profile_bytes is None:
            return None
        profile = self._profile(profile_bytes)
        return quiet_until_ms(profile.quiet_hours, profile.timezone, now_ms)

    def _limit(
        self,
        limits: MutableMapping[bytes, Any],
        recipient: Recipient,
        channel: str,
        category: str,
        now_ms: int,
        wait: Wait | None,
        *,
        take: bool = True,
    ) -> Wait | None:
        """Take the route's slot in every user limit it counts against (unless not
        ``take``: only say where it would be): the first window with room in each, from
        when it could go (now, or the end of the quiet hours). The route waits until
        then when that is later than it could go."""
        applicable = self._limits.for_user(channel, category, recipient.tenant_id)
        if not applicable or recipient.user_id is None:
            return wait
        # A user's counts are kept per tenant: one tenant's routes never fill another's
        # windows (limits.yaml ``tenants:``).
        prefix = f"{recipient.tenant_id}/" if recipient.tenant_id else ""
        key = recipient.user_id.encode("utf-8")
        # Copies: the table's own value must change only through the write below.
        state = {name: dict(counts) for name, counts in (limits.get(key) or {}).items()}
        start = at = now_ms if wait is None else wait[0]
        moved = True
        while moved:  # a later window of one limit may be full in another: again
            moved = False
            for limit in applicable:
                counts = state.get(prefix + limit.key, {})
                window = at // limit.window_ms * limit.window_ms
                while counts.get(str(window), 0) >= limit.most:
                    window += limit.window_ms
                if window > at:
                    at, moved = window, True
        for limit in applicable if take else ():
            window = at // limit.window_ms * limit.window_ms
            counts = {
                w: n
                for w, n in state.get(prefix + limit.key, {}).items()
                if int(w) + limit.window_ms > now_ms
            }
            counts[str(window)] = counts.get(str(window), 0) + 1
            state[prefix + limit.key] = counts
        if take:
            limits[key] = state
        if at == start:
            return wait
        full = ", ".join(f"{u.key} {u.most} per {u.window_ms // 1000}s" for u in applicable)
        return (at, "rate_limited", f"until {at} ({full})")

    def _admin_routes(self, recipient: Recipient, spec: TypeSpec, now_ms: int) -> list[Out]:
        outputs: list[Out] = []
        for address in spec.admin_recipients:
            route_id = self.route_id(recipient, "email", address)
            request = self._request(
                recipient,
                "email",
                route_id,
                DEFAULT_LOCALE,
                False,
                address=Address(address),
                deadline_ms=0,
                due_at_ms=0,
            )
            outputs.extend(self._emit(recipient, request, None, now_ms, key=request.record_key()))
        return outputs

    def _emit(
        self,
        recipient: Recipient,
        request: ChannelRequest,
        wait: Wait | None,
        now_ms: int,
        key: bytes,
        after: ChannelRequest | None = None,
    ) -> list[Out]:
        value = self._contracts.channel_request.encode(request)
        target = self._lanes[request.channel, request.priority]
        channel, route_id = request.channel, request.route_id
        if wait is not None:
            until, reason, detail = wait
            return [
                self._deferral[channel].schedule(key, value, target, until, 0, now_ms),
                self._status(
                    recipient,
                    "deferred",
                    now_ms,
                    channel=channel,
                    route_id=route_id,
                    reason=reason,
                    detail=detail,
                ),
            ]
        # A fallback route names the route it stands in for.
        link = None if after is None else f"after {after.channel} route {after.route_id}"
        return [
            Out(target, key, value),
            self._status(
                recipient,
                "routed",
                now_ms,
                channel=channel,
                route_id=route_id,
                reason=None if after is None else "fallback",
                detail=link or request.locale,
            ),
        ]

    def _request(
        self,
        recipient: Recipient,
        channel: str,
        route_id: str,
        locale: str,
        fell_back: bool,
        *,
        address: Address,
        deadline_ms: int,
        due_at_ms: int,
    ) -> ChannelRequest:
        return ChannelRequest(
            route_id=route_id,
            notification_id=recipient.notification_id,
            notification_type=recipient.notification_type,
            channel=channel,
            template_id=recipient.notification_type,
            user_id=recipient.user_id,
            address=address.address,
            device_tokens=list(address.tokens),
            locale=locale,
            locale_fallback=fell_back,
            variables_json=recipient.payload_json,
            priority=recipient.priority,
            deadline_ms=deadline_ms,
            due_at_ms=due_at_ms,
            occurred_at_ms=recipient.occurred_at_ms,
            produced_at_ms=recipient.produced_at_ms,
            request_id=recipient.request_id,
            trace_id=recipient.trace_id,
            tenant_id=recipient.tenant_id,
        )

    @staticmethod
    def route_id(recipient: Recipient, channel: str, address: str | None = None) -> str:
        """Deterministic id of (notification, channel, recipient): the user, or the
        address on the admin route."""
        return deterministic_id(recipient.notification_id, channel, address or recipient.user_id)

    def _status(
        self,
        recipient: Recipient,
        status: str,
        now_ms: int,
        *,
        channel: str | None = None,
        route_id: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
        attempt: int = 0,
    ) -> Out:
        event = StatusEvent(
            event_id=deterministic_id(
                recipient.notification_id, route_id or recipient.user_id, status
            ),
            status=status,
            at_ms=now_ms,
            notification_id=recipient.notification_id,
            notification_type=recipient.notification_type,
            producer=recipient.producer,
            idempotency_key=recipient.idempotency_key,
            route_id=route_id,
            channel=channel,
            user_id=recipient.user_id,
            attempt=attempt,
            reason=reason,
            detail=detail,
            request_id=recipient.request_id,
            trace_id=recipient.trace_id,
            tenant_id=recipient.tenant_id,
        )
        return status_out(self._contracts, self._status_topic, event)
