"""The declared topology: topics.yaml parsed into immutable specs.

Partition counts come from copartition groups, so a table and the streams that
share its key can never be declared with different counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings

#: Route priorities, most urgent first.
PRIORITIES = ("critical", "high", "normal", "low")
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_VALUE = re.compile(r"avro:[A-Za-z_][\w.]*|flatbuffers:[\w.\-]+|json|changelog")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'10s', '5m', '2h' -> seconds."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise ConfigurationError(f"not a duration: {text!r} (use e.g. 500ms, 10s, 5m, 2h, 1d)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One declared topic."""

    name: str
    """Logical name (the settings' topic_prefix is prepended on the broker)."""
    partitions: int
    """Partition count (from the copartition group)."""
    replication_factor: int
    """Replicas per partition (from the profile)."""
    group: str
    """Copartition group: topics in one group always have the same partition count."""
    config: dict[str, str] = field(default_factory=dict)
    """Topic-level configs Herald manages (cleanup.policy, retention.ms, ...)."""
    doc: str = ""
    """What the topic carries."""
    key: str = ""
    """What its records are keyed by (``user_id``, ``<producer>:<idempotency_key>``)."""
    values: tuple[str, ...] = ()
    """What its records are: ``avro:<subject>`` (schemas/), ``flatbuffers:<file>``,
    ``json``, or ``changelog`` (a Faust table's, internal to the workers)."""
    writers: tuple[str, ...] = ()
    """The roles that write it (``roles:`` in topics.yaml)."""
    readers: tuple[str, ...] = ()
    """The roles that read it."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one channel retries: a budget and one delay topic per tier."""

    channel: str
    """email or push."""
    budget: int
    """Total attempts, the first included."""
    tiers: tuple[float, ...]
    """Delay of each tier in seconds, shortest first."""
    tier_topics: tuple[str, ...]
    """Logical topic names, one per tier."""


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """The topics of one delivery channel (``channels:`` in topics.yaml).

    Every name follows from the channel's: its routes wait on its lanes, keyed by
    user_id; its dead letters go to its DLQ; its never-twice registry is a table on
    its registry changelog; its retries use the ``retry:`` policy of the same name.
    """

    name: str
    """The channel (email, push, webhook, ...), as the catalog and status events name it."""
    lanes: dict[str, str]
    """Lane name -> logical topic of its routes: ``bulk`` (``.requested``) always, and
    one per lane the channel declares (``priority`` for critical, ``high``, ``low``)."""
    dlq: str
    """Logical topic of its dead letters."""
    registry: str
    """Logical changelog topic of its delivery registry."""
    by_priority: dict[str, str] = field(default_factory=dict)
    """Priority -> lane name, for the priorities with a lane of their own (the others
    take ``bulk``)."""

    def lane_for(self, priority: str) -> str:
        """The logical topic a route of ``priority`` is routed to."""
        return self.lanes[self.by_priority.get(priority, "bulk")]


@dataclass(frozen=True, slots=True)
class Topology:
    """Every topic of one profile, plus the retry policies and the channels."""

    profile: str
    topics: dict[str, TopicSpec]
    retry: dict[str, RetryPolicy]
    channels: dict[str, ChannelSpec] = field(default_factory=dict)
    """Delivery channels by name, in declaration order."""
    roles: dict[str, str] = field(default_factory=dict)
    """Who writes and reads the topics: role -> what it is."""

    def channel(self, name: str) -> ChannelSpec:
        """A declared channel; ConfigurationError if there is none of that name."""
        try:
            return self.channels[name]
        except KeyError:
            raise ConfigurationError(
                f"channel {name!r} is not declared in topologies/topics.yaml "
                f"(have {', '.join(self.channels)})"
            ) from None

    def lanes(self) -> dict[str, str]:
        """Every channel lane (logical topic) -> its channel."""
        return {topic: c.name for c in self.channels.values() for topic in c.lanes.values()}

    def spec(self, logical_name: str) -> TopicSpec:
        """The spec of a declared topic; ConfigurationError if it is not declared."""
        try:
            return self.topics[logical_name]
        except KeyError:
            raise ConfigurationError(
                f"topic {logical_name!r} is not declared in topologies/"
            ) from None

    def groups(self) -> dict[str, list[TopicSpec]]:
        """Topics by copartition group."""
        out: dict[str, list[TopicSpec]] = {}
        for spec in self.topics.values():
            out.setdefault(spec.group, []).append(spec)
        return out

    @classmethod
    def load(cls, settings: Settings) -> Topology:
        """Parse topologies/topics.yaml for the settings' profile."""
        return cls.from_file(settings.topology_dir / "topics.yaml", settings.topology_profile)

    @classmethod
    def from_file(cls, path: Path, profile: str) -> Topology:
        try:
            doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read topology {path}: {exc}") from exc
        return cls.from_dict(doc, profile, source=str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], profile: str, source: str = "topology") -> Topology:
        profiles = doc.get("profiles") or {}
        if profile not in profiles:
            raise ConfigurationError(f"{source}: no profile {profile!r} (have {sorted(profiles)})")
        prof = profiles[profile]
        rf = int(prof["replication_factor"])
        min_isr = str(prof["min_insync_replicas"])
        if not 1 <= int(min_isr) <= rf:
            raise ConfigurationError(f"{source}: min_insync_replicas must be 1..replication_factor")
        group_sizes: dict[str, int] = {g: int(n) for g, n in (prof.get("groups") or {}).items()}
        roles = {str(r): str(what) for r, what in (doc.get("roles") or {}).items()}

        def make(name: str, entry: dict[str, Any]) -> TopicSpec:
            group = entry.get("group")
            if group not in group_sizes:
                raise ConfigurationError(
                    f"{source}: topic {name!r} names copartition group {group!r}, "
                    f"which profile {profile!r} does not size"
                )
            if "partitions" in entry and int(entry["partitions"]) != group_sizes[group]:
                raise ConfigurationError(
                    f"{source}: topic {name!r} declares {entry['partitions']} partitions but "
                    f"its group {group!r} has {group_sizes[group]}"
                )
            config = {str(k): str(v) for k, v in (entry.get("config") or {}).items()}
            config.setdefault("min.insync.replicas", min_isr)
            values = tuple(str(v) for v in entry.get("value") or ())
            for value in values:
                if not _VALUE.fullmatch(value):
                    raise ConfigurationError(
                        f"{source}: topic {name!r}: value {value!r} is none of avro:<subject>, "
                        "flatbuffers:<file>, json, changelog"
                    )
            writers = tuple(str(r) for r in entry.get("writers") or ())
            readers = tuple(str(r) for r in entry.get("readers") or ())
            if unknown := sorted(set(writers + readers) - set(roles)):
                raise ConfigurationError(
                    f"{source}: topic {name!r} names roles {unknown} that roles: does not declare"
                )
            return TopicSpec(
                name=name,
                partitions=group_sizes[group],
                replication_factor=rf,
                group=group,
                config=config,
                doc=str(entry.get("doc", "")),
                key=str(entry.get("key", "")),
                values=values,
                writers=writers,
                readers=readers,
            )

        topics = {
            name: make(name, entry or {}) for name, entry in (doc.get("topics") or {}).items()
        }

        retry: dict[str, RetryPolicy] = {}
        retry_config = doc.get("retry_topic_config") or {}
        for channel, entry in (doc.get("retry") or {}).items():
            labels = [str(t) for t in entry["tiers"]]
            delays = tuple(parse_duration(t) for t in labels)
            if list(delays) != sorted(delays):
                raise ConfigurationError(f"{source}: {channel} retry tiers must be ascending")
            budget = int(entry["budget"])
            if budget < 1:
                raise ConfigurationError(f"{source}: {channel} retry budget must be >= 1")
            names = tuple(f"notification.{channel}.retry.{label}" for label in labels)
            # A tier holds the records of the stage's input while they wait, unchanged.
            waiting = "Recipient" if channel == "recipients" else "ChannelRequest"
            worker = ["herald-worker"] if "herald-worker" in roles else []
            for name in names:
                topics[name] = make(
                    name,
                    {
                        "group": "users",
                        "config": retry_config,
                        "doc": f"{channel} retry delay tier: records waiting, unchanged, with "
                        "the headers herald-target, herald-due-at-ms and herald-attempt",
                        "key": "user_id",
                        "value": [f"avro:herald.{waiting}"],
                        "writers": worker,
                        "readers": worker,
                    },
                )
            retry[channel] = RetryPolicy(channel, budget, delays, names)
        channels = _channels(doc.get("channels") or {}, topics, retry, source)
        return cls(profile=profile, topics=topics, retry=retry, channels=channels, roles=roles)


def _channels(
    doc: dict[str, Any], topics: dict[str, TopicSpec], retry: dict[str, RetryPolicy], source: str
) -> dict[str, ChannelSpec]:
    channels: dict[str, ChannelSpec] = {}
    for name, entry in doc.items():
        entry = entry or {}
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)):
            raise ConfigurationError(f"{source}: channel name {name!r} is not [a-z][a-z0-9_]*")
        if unknown := set(entry) - {"lanes"}:
            raise ConfigurationError(f"{source}: channel {name!r}: unknown keys {sorted(unknown)}")
        by_priority = {str(p): str(lane) for p, lane in (entry.get("lanes") or {}).items()}
        for priority, lane in by_priority.items():
            if priority not in PRIORITIES:
                raise ConfigurationError(
                    f"{source}: channel {name!r}: lanes are declared per priority "
                    f"({', '.join(PRIORITIES)}), not {priority!r}"
                )
            if lane in ("bulk", "requested", "dlq") or not re.fullmatch(r"[a-z][a-z0-9_]*", lane):
                raise ConfigurationError(f"{source}: channel {name!r}: bad lane name {lane!r}")
        lanes = {"bulk": f"notification.{name}.requested"}
        lanes.update({lane: f"notification.{name}.{lane}" for lane in by_priority.values()})
        spec = ChannelSpec(
            name=name,
            lanes=lanes,
            dlq=f"notification.{name}.dlq",
            registry=f"herald.{name}.deliveries.changelog",
            by_priority=by_priority,
        )
        for topic in (*lanes.values(), spec.dlq, spec.registry):
            if topic not in topics:
                raise ConfigurationError(f"{source}: channel {name!r} needs topic {topic!r}")
            if topic != spec.dlq and topics[topic].group != "users":
                raise ConfigurationError(
                    f"{source}: {topic!r} must be in the users group (keyed by user_id)"
                )
        if name not in retry:
            raise ConfigurationError(f"{source}: channel {name!r} has no retry policy")
        channels[name] = spec
    return channels
