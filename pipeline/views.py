"""Small compacted topics read whole into memory and followed: the suppression list,
the disabled webhook endpoints, the cancelled notifications, the template archive and
the login-code intake's idempotency records.

Every process that needs one reads every partition from the beginning (no consumer
group, nothing committed) and is ``ready`` once it has reached the end offsets it
saw at start. Such topics are small (one record per address or request key), so a
full read at start is cheap and needs no table recovery machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.errors import RenderError, TemplateArchiveLoadingError
from pipeline.rendering import TemplateCatalog
from pipeline.runtime.records import Out
from pipeline.settings import Settings
from pipeline.topology import Topology

log = logging.getLogger(__name__)

V = TypeVar("V")


class Follower:
    """A background task that follows topics for as long as the process runs,
    reconnecting after broker trouble; subclasses read in :meth:`_follow`."""

    name = "follower"
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start following in the background."""
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        """Stop following."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Follow forever, reconnecting after broker trouble."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError) as exc:
                log.warning("%s: %s; reconnecting in 2s", self.name, exc)
                await asyncio.sleep(2.0)

    async def _follow(self) -> None:
        raise NotImplementedError

    @staticmethod
    async def _consumer(settings: Settings) -> AIOKafkaConsumer:
        """A started consumer outside any group (partitions are assigned by hand)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        return consumer

    @staticmethod
    async def _caught_up(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
        """Whether every partition's read position has reached its end in ``ends``."""
        for tp, end in ends.items():
            if await consumer.position(tp) < end:
                return False
        return True


class CompactedView(Follower, Generic[V]):
    """The latest value per key of one compacted topic; tombstones delete."""

    def __init__(
        self, settings: Settings, logical_topic: str, decode: Callable[[bytes], V], *, name: str
    ) -> None:
        self._settings = settings
        self.topic = settings.topic(logical_topic)
        # The declared count: the worker refuses to run on a broker that differs.
        self._partitions = Topology.load(settings).spec(logical_topic).partitions
        self._decode = decode
        self.name = f"{name} view"
        self.items: dict[bytes, V] = {}
        #: Set once the view holds everything the topic held when it was started.
        self.ready = asyncio.Event()

    def get(self, key: bytes) -> V | None:
        """The value for ``key``, or None."""
        return self.items.get(key)

    def put(self, key: bytes, value: V | None) -> None:
        """Apply a write this process made (before it comes back from the topic)."""
        if value is None:
            self.items.pop(key, None)
        else:
            self.items[key] = value

    async def _follow(self) -> None:
        consumer = await self._consumer(self._settings)
        try:
            assigned = [TopicPartition(self.topic, p) for p in range(self._partitions)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            ends: dict[TopicPartition, int] = await consumer.end_offsets(assigned)
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        self._apply(record.key, record.value)
                if not self.ready.is_set() and await self._caught_up(consumer, ends):
                    log.info("%s ready (%d keys)", self.name, len(self.items))
                    self.ready.set()
        finally:
            await consumer.stop()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        if value is None:
            self.items.pop(key, None)
            return
        try:
            self.items[key] = self._decode(value)
        except ValueError:
            log.warning("%s: undecodable value for key %r ignored", self.name, key)


def json_value(data: bytes) -> dict[str, Any]:
    """A JSON object value; ValueError otherwise."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def address_key(address: str) -> bytes:
    """Suppression-list key of an address: trimmed and lower-cased."""
    return address.strip().lower().encode("utf-8")


class SuppressionList(CompactedView[dict[str, Any]]):
    """Addresses Herald must not mail (notification.email.suppressions)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings,
            "notification.email.suppressions",
            json_value,
            name="suppressions",
        )

    def reason(self, address: str) -> str | None:
        """Why ``address`` is suppressed, or None when it is not."""
        entry = self.get(address_key(address))
        return None if entry is None else str(entry.get("reason", "suppressed"))

    def entry(self, address: str, reason: str, source: str, now_ms: int | None = None) -> Out:
        """The record that suppresses ``address``."""
        value = {
            "address": address.strip().lower(),
            "reason": reason,
            "source": source,
            "at_ms": now_ms if now_ms is not None else int(time.time() * 1000),
        }
        return Out(self.topic, address_key(address), json.dumps(value).encode())

    def lift(self, address: str) -> Out:
        """The tombstone that lifts the suppression of ``address``."""
        return Out(self.topic, address_key(address), None)


class DisabledEndpoints(CompactedView[dict[str, Any]]):
    """Webhook endpoints Herald no longer calls (notification.webhook.disabled), keyed
    by URL: an endpoint that answered 410 Gone is put here; a tombstone lifts it."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "notification.webhook.disabled", json_value, name="webhooks")

    def reason(self, url: str) -> str | None:
        """Why ``url`` is disabled, or None when it is not."""
        entry = self.get(url.encode("utf-8"))
        return None if entry is None else str(entry.get("reason", "disabled"))

    def entry(self, url: str, reason: str, detail: str, now_ms: int) -> Out:
        """The record that disables ``url`` (applied to this view at once)."""
        value = {"url": url, "reason": reason, "detail": detail[:500], "at_ms": now_ms}
        self.put(url.encode("utf-8"), value)
        return Out(self.topic, url.encode("utf-8"), json.dumps(value).encode())

    def lift(self, url: str) -> Out:
        """The tombstone that enables ``url`` again."""
        return Out(self.topic, url.encode("utf-8"), None)


class FollowedView(CompactedView[V]):
    """A view only some processes follow: unfollowed (a tool, a unit test) it is ready
    with what this process put in it; :meth:`followed` makes it wait for the topic."""

    def __init__(
        self, settings: Settings, logical_topic: str, decode: Callable[[bytes], V], *, name: str
    ) -> None:
        super().__init__(settings, logical_topic, decode, name=name)
        self.ready.set()

    def followed(self) -> Callable[[], Coroutine[Any, Any, None]]:
        """The task that follows the topic; ``ready`` is clear until it has caught up."""
        self.ready.clear()
        return self.run


class Cancellations(FollowedView[dict[str, Any]]):
    """Notifications whose routes must not be sent any more (notification.cancellations),
    keyed by notification_id; followed by every worker (docs/http-intake.md)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "notification.cancellations", json_value, name="cancellations")

    def reason(self, notification_id: str) -> str | None:
        """Who cancelled ``notification_id`` (and why), or None when it is not cancelled."""
        entry = self.items.get(notification_id.encode("utf-8"))
        return None if entry is None else str(entry.get("by", "cancelled"))

    def entry(self, notification_id: str, by: str, now_ms: int) -> Out:
        """The record that cancels ``notification_id``."""
        value = {"notification_id": notification_id, "by": by, "at_ms": now_ms}
        return Out(self.topic, notification_id.encode("utf-8"), json.dumps(value).encode())


class TemplateArchive(FollowedView[dict[str, Any]]):
    """Every template version a worker ever rendered (herald.templates), keyed by
    ``<template_id>@<version>``, with its files: what a resend of the recorded version
    renders (docs/channels.md: template versions). Never deleted (compacted only)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "herald.templates", json_value, name="template archive")
        self._compiled: dict[bytes, TemplateCatalog] = {}

    def entries(self, templates: TemplateCatalog, now_ms: int) -> list[Out]:
        """The records archiving every version of ``templates`` not archived yet
        (applied to this view at once)."""
        records = []
        for template_id in templates.template_ids():
            version = templates.version(template_id)
            key = f"{template_id}@{version}".encode()
            if key in self.items:
                continue
            value = {
                "template_id": template_id,
                "version": version,
                "files": templates.files(template_id),
                "archived_at_ms": now_ms,
            }
            self.put(key, value)
            records.append(Out(self.topic, key, json.dumps(value, sort_keys=True).encode()))
        return records

    def catalog(self, template_id: str, version: str) -> TemplateCatalog:
        """``template_id`` at ``version``, compiled once: a TemplateArchiveLoadingError
        (transient) while the view is loading, a RenderError when it never was archived."""
        key = f"{template_id}@{version}".encode()
        if (compiled := self._compiled.get(key)) is not None:
            return compiled
        entry = self.items.get(key)
        if entry is None:
            if not self.ready.is_set():
                raise TemplateArchiveLoadingError(f"cannot render {template_id} {version} yet")
            raise RenderError(
                f"template {template_id} version {version} is not in the template archive",
                reason="template_version_unknown",
            )
        compiled = TemplateCatalog.of_files(template_id, entry.get("files") or {})
        self._compiled[key] = compiled
        return compiled
