"""Make the broker match topologies/: create what is missing, report drift, delete nothing."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
)

from pipeline.errors import BrokerUnavailableError
from pipeline.settings import Settings
from pipeline.topology.model import TopicSpec, Topology

_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Drift:
    """One difference between the declaration and the broker."""

    topic: str
    """Physical topic name."""
    what: str
    """missing, partitions, replication_factor, config:<name> or copartition:<group>."""
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.topic}: {self.what} expected {self.expected}, found {self.actual}"


@dataclass(slots=True)
class Report:
    """What apply or check found."""

    created: list[str] = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)


def admin_client(settings: Settings) -> AdminClient:
    """An admin client on the configured cluster."""
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})


def _describe(admin: AdminClient) -> dict[str, Any]:
    try:
        return dict(admin.list_topics(timeout=_TIMEOUT_S).topics)
    except KafkaException as exc:
        raise BrokerUnavailableError(f"cannot list topics: {exc}") from exc


def check(settings: Settings, topology: Topology, admin: AdminClient | None = None) -> Report:
    """Compare every declared topic with the broker; nothing is changed."""
    admin = admin or admin_client(settings)
    existing = _describe(admin)
    report = Report()
    present: list[tuple[TopicSpec, str]] = []
    for spec in topology.topics.values():
        name = settings.topic(spec.name)
        meta = existing.get(name)
        if meta is None or meta.error is not None:
            report.drift.append(Drift(name, "missing", "present", "absent"))
            continue
        present.append((spec, name))
        partitions = len(meta.partitions)
        if partitions != spec.partitions:
            report.drift.append(Drift(name, "partitions", str(spec.partitions), str(partitions)))
        replicas = {len(p.replicas) for p in meta.partitions.values()}
        if replicas != {spec.replication_factor}:
            report.drift.append(
                Drift(
                    name,
                    "replication_factor",
                    str(spec.replication_factor),
                    ",".join(map(str, sorted(replicas))),
                )
            )
    report.drift.extend(_config_drift(admin, present, settings))
    report.drift.extend(_copartition_drift(topology, existing, settings))
    return report


def _config_drift(
    admin: AdminClient, present: list[tuple[TopicSpec, str]], settings: Settings
) -> list[Drift]:
    if not present:
        return []
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for _, name in present]
    futures = admin.describe_configs(resources, request_timeout=_TIMEOUT_S)
    drift: list[Drift] = []
    for (spec, name), resource in zip(present, resources, strict=True):
        try:
            actual = futures[resource].result(timeout=_TIMEOUT_S)
        except KafkaException as exc:
            raise BrokerUnavailableError(f"cannot describe configs of {name}: {exc}") from exc
        for key, want in spec.config.items():
            entry = actual.get(key)
            have = entry.value if entry is not None else "<unset>"
            if have != want:
                drift.append(Drift(name, f"config:{key}", want, str(have)))
    return drift


def _copartition_drift(
    topology: Topology, existing: dict[str, Any], settings: Settings
) -> list[Drift]:
    """Topics of one group must agree on the broker too, whatever the declaration says."""
    drift: list[Drift] = []
    for group, specs in topology.groups().items():
        counts = {
            settings.topic(s.name): len(existing[settings.topic(s.name)].partitions)
            for s in specs
            if settings.topic(s.name) in existing
        }
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{t}={n}" for t, n in sorted(counts.items()))
            drift.append(Drift(f"group {group}", f"copartition:{group}", "equal counts", listing))
    return drift


def apply(settings: Settings, topology: Topology, admin: AdminClient | None = None) -> Report:
    """Create the declared topics that are missing, then report any remaining drift."""
    admin = admin or admin_client(settings)
    existing = _describe(admin)
    missing = [
        spec for spec in topology.topics.values() if settings.topic(spec.name) not in existing
    ]
    created: list[str] = []
    if missing:
        new = [
            NewTopic(
                settings.topic(s.name),
                num_partitions=s.partitions,
                replication_factor=s.replication_factor,
                config=dict(s.config),
            )
            for s in missing
        ]
        for name, future in admin.create_topics(new, request_timeout=_TIMEOUT_S).items():
            try:
                future.result(timeout=_TIMEOUT_S)
                created.append(name)
            except KafkaException as exc:
                # Another process may have created it meanwhile; check() tells the truth.
                if (
                    exc.args
                    and getattr(exc.args[0], "name", lambda: "")() == "TOPIC_ALREADY_EXISTS"
                ):
                    continue
                raise BrokerUnavailableError(f"cannot create topic {name}: {exc}") from exc
    _wait_visible(admin, created)
    report = check(settings, topology, admin)
    report.created = sorted(created)
    return report


def _wait_visible(admin: AdminClient, names: list[str], timeout_s: float = _TIMEOUT_S) -> None:
    """Wait until created topics are in the broker's metadata with a leader per partition.

    KRaft answers CreateTopics once the controller committed it; brokers learn of the
    topic a moment later, and a worker that checks in between would see it missing.
    """
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending:
        topics = _describe(admin)
        pending = {
            name
            for name in pending
            if name not in topics
            or topics[name].error is not None
            or any(p.leader < 0 for p in topics[name].partitions.values())
        }
        if not pending:
            return
        if time.monotonic() > deadline:
            raise BrokerUnavailableError(f"created topics not visible yet: {sorted(pending)}")
        time.sleep(0.2)


def delete_prefixed(settings: Settings, admin: AdminClient | None = None) -> list[str]:
    """Delete every topic under the settings' (non-empty) prefix: test and drill cleanup."""
    if not settings.topic_prefix:
        raise ValueError("refusing to delete topics without a topic prefix")
    admin = admin or admin_client(settings)
    names = [n for n in _describe(admin) if n.startswith(settings.topic_prefix)]
    if names:
        for future in admin.delete_topics(names, request_timeout=_TIMEOUT_S).values():
            # already gone, or the broker is going away: nothing left to clean
            with contextlib.suppress(KafkaException):
                future.result(timeout=_TIMEOUT_S)
    return names
