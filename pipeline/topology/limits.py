"""Rate limits, declared as data in topologies/limits.yaml (docs/limits.md)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings
from pipeline.topology.model import parse_duration

#: The producers entry every producer without its own entry gets.
ANY_PRODUCER = "*"


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's shape: ``per_second`` on average, at most ``burst`` at once."""

    per_second: float
    """Sustained rate."""
    burst: int
    """Largest number taken at once after a quiet spell (the bucket's size)."""

    @classmethod
    def parse(cls, entry: Any, where: str) -> Rate:
        """The rate an entry such as ``{per_second: 100, burst: 200}`` declares."""
        if not isinstance(entry, Mapping) or set(entry) - {"per_second", "burst"}:
            raise ConfigurationError(f"{where}: expected {{per_second: N, burst: N}}")
        try:
            per_second = float(entry["per_second"])
            burst = int(entry.get("burst", max(1, math.ceil(per_second))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}: per_second must be a number ({exc})") from exc
        if not per_second > 0 or burst < 1:
            raise ConfigurationError(f"{where}: per_second must be > 0 and burst >= 1")
        return cls(per_second, burst)


@dataclass(frozen=True, slots=True)
class UserLimit:
    """At most ``most`` routes per user on ``channel`` (of ``category``, or of every
    category) in each clock-aligned window of ``window_ms``."""

    channel: str
    """The channel counted."""
    category: str | None
    """The catalog category counted; None: all of the channel's routes together."""
    most: int
    """Routes a window takes."""
    window_ms: int
    """Window length; windows start at multiples of it (1h: on the hour, UTC)."""

    @property
    def key(self) -> str:
        """Its name in a user's limit state."""
        return f"{self.channel}|{self.category or '*'}"


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """What one declared tenant has of its own (``tenants:`` in limits.yaml)."""

    intake: Rate | None = None
    """The tenant's whole HTTP intake, all its producers together; None: no such cap."""
    users: tuple[UserLimit, ...] | None = None
    """User limits of the tenant's routes, instead of the ``users:`` list; None: that list."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit of topologies/limits.yaml."""

    producers: dict[str, Rate] = field(default_factory=dict)
    """Intents a producer may send through the HTTP intake, by producer id
    (``*``: every producer without its own entry)."""
    users: tuple[UserLimit, ...] = ()
    """Routes per user, channel and category."""
    channels: dict[str, Rate] = field(default_factory=dict)
    """Provider calls per second of a channel, across every worker."""
    tenants: dict[str, TenantLimits] = field(default_factory=dict)
    """The declared tenants (each its own metrics label) and their own limits."""

    @property
    def limits_users(self) -> bool:
        """Whether any user limit is declared (the default list or a tenant's)."""
        return bool(self.users) or any(t.users for t in self.tenants.values())

    def tenant(self, tenant_id: str | None) -> TenantLimits | None:
        """The limits of a declared tenant, or None."""
        return None if tenant_id is None else self.tenants.get(tenant_id)

    def producer(self, name: str) -> Rate | None:
        """The limit of producer ``name``, or None when it has none."""
        return self.producers.get(name) or self.producers.get(ANY_PRODUCER)

    def check(self, channels: Collection[str]) -> None:
        """ConfigurationError when a limit names a channel topics.yaml does not declare."""
        named = {u.channel for u in self.users} | set(self.channels)
        named |= {u.channel for t in self.tenants.values() for u in t.users or ()}
        if unknown := named - set(channels):
            raise ConfigurationError(
                f"limits.yaml names channels {sorted(unknown)}, which topics.yaml does not "
                f"declare ({', '.join(channels)})"
            )

    def for_user(
        self, channel: str, category: str, tenant_id: str | None = None
    ) -> list[UserLimit]:
        """The user limits a route of ``channel`` and ``category`` (of ``tenant_id``)
        counts against."""
        own = self.tenant(tenant_id)
        limits = self.users if own is None or own.users is None else own.users
        return [u for u in limits if u.channel == channel and u.category in (None, category)]

    @classmethod
    def load(cls, settings: Settings) -> Limits:
        """The limits of ``settings``' topologies/ (none when the file is absent)."""
        path = settings.topology_dir / "limits.yaml"
        if not path.exists():
            return cls()
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read limits {path}: {exc}") from exc
        return cls.from_dict(doc, source=str(path))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "limits") -> Limits:
        """The limits in ``doc``."""
        if not isinstance(doc, Mapping):
            raise ConfigurationError(f"{source}: expected a mapping of sections")
        if unknown := set(doc) - {"producers", "users", "channels", "tenants"}:
            raise ConfigurationError(f"{source}: unknown sections {sorted(unknown)}")
        producers = {
            str(name): Rate.parse(entry, f"{source}: producers.{name}")
            for name, entry in (doc.get("producers") or {}).items()
        }
        channels = {
            str(name): Rate.parse(entry, f"{source}: channels.{name}")
            for name, entry in (doc.get("channels") or {}).items()
        }
        users = _user_limits(doc.get("users"), f"{source}: users")
        tenants = {
            str(name): _tenant(entry, f"{source}: tenants.{name}")
            for name, entry in (doc.get("tenants") or {}).items()
        }
        return cls(producers=producers, users=users, channels=channels, tenants=tenants)


def _user_limits(entries: Any, where: str) -> tuple[UserLimit, ...]:
    return tuple(_user_limit(e, f"{where}[{index}]") for index, e in enumerate(entries or []))


def _tenant(entry: Any, where: str) -> TenantLimits:
    entry = entry or {}
    if not isinstance(entry, Mapping) or set(entry) - {"intake", "users"}:
        raise ConfigurationError(f"{where}: expected {{intake (optional), users (optional)}}")
    intake = entry.get("intake")
    return TenantLimits(
        intake=None if intake is None else Rate.parse(intake, f"{where}.intake"),
        users=None if "users" not in entry else _user_limits(entry["users"], f"{where}.users"),
    )


def _user_limit(entry: Any, where: str) -> UserLimit:
    if not isinstance(entry, Mapping) or set(entry) - {"channel", "category", "max", "per"}:
        raise ConfigurationError(f"{where}: expected {{channel, category (optional), max, per}}")
    try:
        most, window_s = int(entry["max"]), parse_duration(str(entry["per"]))
        channel = str(entry["channel"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
    if most < 1 or window_s < 1:
        raise ConfigurationError(f"{where}: max must be >= 1 and per at least 1s")
    category = entry.get("category")
    return UserLimit(
        channel, None if category is None else str(category), most, int(window_s * 1000)
    )
