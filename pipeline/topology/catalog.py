"""The notification type catalog (topologies/catalog.yaml), kept as data."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings
from pipeline.topology.model import PRIORITIES, Topology, parse_duration

AUDIENCES = ("user", "admin_email")
#: What becomes of a route whose delivery began without a recorded outcome (a worker
#: died mid-send): sent again (the same Message-ID / webhook-id), or held in the DLQ
#: for an operator (no copy, ever; the operator replays it or not).
IN_DOUBT_POLICIES = ("resend", "hold")
#: How a route may end that makes a fallback type try its next channel.
FALLBACK_WHEN = ("skipped", "suppressed", "dead_lettered", "expired")
#: How a type treats a user's opt-outs: always honoured; honoured except at critical
#: priority; or ignored (transactional mail such as login codes).
OPT_OUT_POLICIES = ("honoured", "optional", "ignored")


#: When a digest type folds a route: every route, or only one over a user limit.
DIGEST_WHEN = ("always", "limited")


@dataclass(frozen=True, slots=True)
class DigestSpec:
    """How a type's routes are combined into digests (``digest:`` in the catalog)."""

    window_ms: int
    """How long a digest collects, from its first route."""
    max_items: int
    """A digest with this many routes goes at once."""
    when: str = "always"
    """always, or limited: only routes a user limit would hold (DIGEST_WHEN)."""
    channels: tuple[str, ...] = ()
    """The channels whose routes are folded (the others are sent one by one)."""

    @staticmethod
    def template_id(notification_type: str) -> str:
        """The templates of a type's digests (its items in ``items``)."""
        return f"{notification_type}.digest"


@dataclass(frozen=True, slots=True)
class TypeSpec:
    """What the catalog says about one notification type."""

    name: str
    """The notification_type (and template_id)."""
    category: str
    """Category for opt-outs."""
    channels: dict[str, tuple[str, ...]]
    """Channels per audience kind the type accepts."""
    fields: dict[str, str]
    """The payload fields an intent must carry, each with its declared type
    (PAYLOAD_TYPES); ``any`` is not checked."""
    priority: str = "normal"
    """Lowest priority the type is delivered with."""
    push_ttl_s: int = 0
    """Push older than this is expired (0: never)."""
    push_payload: str | None = None
    """The FlatBuffers body table of the type's push (schemas/notification.fbs)."""
    admin_recipients: tuple[str, ...] = ()
    """Addresses of the admin_email audience."""
    produces_nothing: bool = False
    """Accepted for idempotency, never delivered."""
    opt_out: str = "honoured"
    """honoured, optional (critical bypasses it) or ignored (see OPT_OUT_POLICIES)."""
    webhook_endpoint: str | None = None
    """The named endpoint (HERALD_WEBHOOK_ENDPOINTS) every webhook route of the type
    goes to; None: each user's own (their profile's ``contacts["webhook"]``)."""
    slack_webhook: str | None = None
    """The named Slack incoming webhook (HERALD_SLACK_WEBHOOKS) every Slack route of the
    type goes to; None: each user's own (``contacts["slack"]``)."""
    sms_max_segments: int = 3
    """The longest SMS text of the type, in segments; a longer one is not sent."""
    in_doubt: str = "resend"
    """resend or hold (IN_DOUBT_POLICIES): a route in doubt after a crash."""
    fallback_when: frozenset[str] = frozenset()
    """Empty: every user channel gets a route. Else the user channels are a fallback
    chain, tried in order: the next gets a route only when the previous one's ended in
    one of these states (FALLBACK_WHEN)."""
    digest: DigestSpec | None = None
    """None: each route is sent on its own. Else its routes (but critical ones) on the
    digest's channels are combined per user and channel into one message."""

    def next_channels(self, after: str | None) -> tuple[str, ...]:
        """The user channels to try after ``after`` (None: from the first)."""
        chain = self.channels.get("user", ())
        return chain if after is None else chain[chain.index(after) + 1 :]

    @property
    def required(self) -> tuple[str, ...]:
        """The payload fields an intent must carry."""
        return tuple(self.fields)

    def effective_priority(self, requested: str) -> str:
        """The more urgent of the intent's priority and the type's floor."""
        return min(requested, self.priority, key=PRIORITIES.index)


class Catalog:
    """All notification types, looked up by name."""

    def __init__(self, types: dict[str, TypeSpec]) -> None:
        self.types = types

    def using(self, channel: str) -> list[TypeSpec]:
        """The types whose user audience is delivered on ``channel``."""
        return [spec for spec in self.types.values() if channel in spec.channels.get("user", ())]

    def channels(self) -> frozenset[str]:
        """Every channel a worker must run for this catalog: those its types use, and
        email and push, which Herald itself writes routes to (login codes, the route
        stage's push hand-off)."""
        used = {c for spec in self.types.values() for cs in spec.channels.values() for c in cs}
        return frozenset(used | {"email", "push"})

    def get(self, notification_type: str) -> TypeSpec | None:
        """The type, or None when the catalog does not know it."""
        return self.types.get(notification_type)

    @classmethod
    def load(cls, settings: Settings, known_channels: Collection[str] | None = None) -> Catalog:
        """The catalog of ``settings``' topologies/, its channels checked against
        ``known_channels`` (default: those topics.yaml declares)."""
        path = settings.topology_dir / "catalog.yaml"
        try:
            doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read catalog {path}: {exc}") from exc
        if known_channels is None:
            known_channels = tuple(Topology.load(settings).channels)
        return cls.from_dict(doc, known_channels, source=str(path))

    @classmethod
    def from_dict(
        cls, doc: dict[str, Any], known_channels: Collection[str], source: str = "catalog"
    ) -> Catalog:
        """The catalog in ``doc``; ``known_channels``: the channels a type may use."""
        lists: dict[str, list[str]] = doc.get("admin_lists") or {}
        types: dict[str, TypeSpec] = {}
        for name, entry in (doc.get("types") or {}).items():
            where = f"{source}: type {name!r}"
            channels = {str(a): tuple(c) for a, c in (entry.get("channels") or {}).items()}
            if not channels:
                raise ConfigurationError(f"{where} accepts no audience")
            for audience, chans in channels.items():
                if audience not in AUDIENCES:
                    raise ConfigurationError(f"{where}: unknown audience {audience!r}")
                if unknown := set(chans) - set(known_channels):
                    raise ConfigurationError(
                        f"{where}: unknown channels {sorted(unknown)} "
                        f"(topics.yaml declares {', '.join(known_channels)})"
                    )
            if channels.get("admin_email", ()) not in ((), ("email",)):
                raise ConfigurationError(f"{where}: the admin_email audience is email only")
            admin: tuple[str, ...] = ()
            if "admin_email" in channels:
                list_name = entry.get("admin_list")
                if list_name not in lists or not lists[list_name]:
                    raise ConfigurationError(f"{where}: admin_list {list_name!r} is not defined")
                admin = tuple(lists[list_name])
            priority = str(entry.get("priority", "normal"))
            if priority not in PRIORITIES:
                raise ConfigurationError(f"{where}: unknown priority {priority!r}")
            opt_out = str(entry.get("opt_out", "honoured"))
            if opt_out not in OPT_OUT_POLICIES:
                raise ConfigurationError(f"{where}: opt_out must be one of {OPT_OUT_POLICIES}")
            in_doubt = str(entry.get("in_doubt", "resend"))
            if in_doubt not in IN_DOUBT_POLICIES:
                raise ConfigurationError(f"{where}: in_doubt must be one of {IN_DOUBT_POLICIES}")
            fallback = entry.get("fallback")
            when: frozenset[str] = frozenset()
            if fallback is not None:
                listed = fallback.get("when") if isinstance(fallback, dict) else None
                when = frozenset(listed or FALLBACK_WHEN)
                if strange := when - set(FALLBACK_WHEN):
                    raise ConfigurationError(
                        f"{where}: fallback when {sorted(strange)}: one of {FALLBACK_WHEN}"
                    )
                if len(channels.get("user", ())) < 2:
                    raise ConfigurationError(f"{where}: a fallback needs two user channels")
            digest = _digest(entry.get("digest"), channels.get("user", ()), where)
            types[name] = TypeSpec(
                name=name,
                category=str(entry.get("category", name.split(".")[0])),
                channels=channels,
                fields=_payload_fields(entry.get("required"), where),
                priority=priority,
                push_ttl_s=int(entry.get("push_ttl_s", 0)),
                push_payload=entry.get("push_payload"),
                admin_recipients=admin,
                produces_nothing=bool(entry.get("produces_nothing", False)),
                opt_out=opt_out,
                webhook_endpoint=entry.get("webhook_endpoint"),
                slack_webhook=entry.get("slack_webhook"),
                sms_max_segments=int(entry.get("sms_max_segments", 3)),
                fallback_when=when,
                in_doubt=in_doubt,
                digest=digest,
            )
        return cls(types)


def _digest(entry: Any, user_channels: tuple[str, ...], where: str) -> DigestSpec | None:
    if entry is None:
        return None
    if not isinstance(entry, dict) or set(entry) - {"window", "max_items", "when", "channels"}:
        raise ConfigurationError(f"{where}: digest is {{window, max_items, when, channels}}")
    try:
        window_s = parse_duration(str(entry.get("window", "15m")))
        max_items = int(entry.get("max_items", 50))
    except (TypeError, ValueError, ConfigurationError) as exc:
        raise ConfigurationError(f"{where}: digest: {exc}") from exc
    when = str(entry.get("when", "always"))
    if when not in DIGEST_WHEN or max_items < 2 or window_s < 1:
        raise ConfigurationError(
            f"{where}: digest needs when in {DIGEST_WHEN}, max_items >= 2, a window >= 1s"
        )
    # A push is a nudge with a typed body (no list of items): never folded.
    default = tuple(c for c in user_channels if c != "push")
    channels = tuple(entry.get("channels") or default)
    if strange := [c for c in channels if c not in default]:
        raise ConfigurationError(f"{where}: digest channels {strange} (one of {default})")
    return DigestSpec(int(window_s * 1000), max_items, when, channels)


#: The payload field types the catalog declares, as JSON values (``required`` maps each
#: field to one; a plain list of names, as older catalogs have, declares ``any``).
PAYLOAD_TYPES: dict[str, str] = {
    "string": "a string",
    "integer": "a whole number",
    "count": "a whole number from 0 to 4294967295",  # a FlatBuffers uint32 field
    "number": "a number",
    "boolean": "true or false",
    "any": "any value",
}


def _payload_fields(required: Any, where: str) -> dict[str, str]:
    if isinstance(required, dict):
        fields = {str(name): str(kind) for name, kind in required.items()}
    else:
        fields = {str(name): "any" for name in required or ()}
    for name, kind in fields.items():
        if kind not in PAYLOAD_TYPES:
            raise ConfigurationError(
                f"{where}: payload field {name!r} has unknown type {kind!r} "
                f"(one of {', '.join(PAYLOAD_TYPES)})"
            )
    return fields


_FITS: dict[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "count": lambda value: _FITS["integer"](value) and 0 <= value <= 0xFFFFFFFF,
    "number": lambda value: _FITS["integer"](value) or isinstance(value, float),
    "boolean": lambda value: isinstance(value, bool),
    "any": lambda value: True,
}
"""Whether a decoded JSON value is of each catalog type (JSON true is no number)."""


def payload_type_error(kind: str, value: Any) -> str | None:
    """Why ``value`` (decoded JSON) is not of the catalog type ``kind``; None if it is."""
    if _FITS[kind](value):
        return None
    return f"must be {PAYLOAD_TYPES[kind]}, not {json.dumps(value)[:40]}"
