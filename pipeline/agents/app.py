"""The Faust application: one worker process running Herald's agents.

Faust settings here encode the brief's guarantees: raw bytes everywhere (agents
decode, so a poison record cannot crash a stream), acks=all, no topic creation by
Faust (topologies/ owns every topic, changelogs included), concurrency 1 per agent,
and inputs acked only after their outputs are acknowledged (see AckedSink).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, MutableMapping, Sequence
from typing import Any, cast

import faust
from faust.types import TP

from pipeline import logs
from pipeline.agents.base import AckedSink, Clock, Out, RawRecord, WriteBehind, malformed
from pipeline.agents.batching import BatchRun, Continuity, Handle, OnError
from pipeline.agents.delay import DelayRun, DelayTiers
from pipeline.agents.deliveries import expired_entries
from pipeline.agents.email import LANES, EmailChannel
from pipeline.agents.health import WorkerHealth
from pipeline.agents.intake import Intake
from pipeline.agents.push import DeviceFeedbackLog, PushChannel
from pipeline.agents.route import Router
from pipeline.agents.users import UserDirectory
from pipeline.agents.watchdog import EXIT_STALLED, StallWatchdog
from pipeline.contracts import Contracts
from pipeline.errors import ConfigurationError
from pipeline.providers import email_provider
from pipeline.providers.breaker import CircuitBreaker
from pipeline.providers.gateway import GatewayPublisher
from pipeline.rendering import TemplateCatalog
from pipeline.settings import Settings
from pipeline.topology import Catalog, Topology
from pipeline.topology import admin as topology_admin
from pipeline.topology.partitioning import partition_for
from pipeline.views import SuppressionList

log = logging.getLogger(__name__)


def create_faust_app(settings: Settings, longest_hold_s: float) -> faust.App:
    """A Faust app configured from ``settings`` (no agents yet)."""
    brokers = [f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")]
    return faust.App(
        settings.app_id,
        broker=brokers,
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        datadir=str(settings.worker_dir),
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=False,
        producer_acks=-1,
        producer_linger=0.002,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.commit_interval_s,
        # A killed worker's partitions move after this long; Faust's 60 s default
        # would stall a SIGKILLed worker's share of the stream for a minute.
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.session_timeout_s / 4,
        table_standby_replicas=0,
        autodiscover=False,
        # Delay agents hold a record for up to their tier's delay. Rebalances must not
        # wait for them (their records are simply re-read by the next owner), and
        # holding is not a stall worth a warning.
        stream_wait_empty=False,
        stream_processing_timeout=longest_hold_s + 60,
        broker_commit_livelock_soft_timeout=longest_hold_s + 60,
    )


class KeyPartitionedTable(faust.Table[bytes, Any]):
    """A table whose changelog partition is always its key's murmur2 partition.

    Faust normally uses the partition of the event being processed, which forbids
    writes outside an event (the expiry sweep) and within batches. Intake processes
    every key on exactly that partition, so both agree.
    """

    def partition_for_key(self, key: Any) -> int:
        if not self.partitions:
            raise ConfigurationError(f"table {self.name} was declared without partitions")
        return partition_for(key, self.partitions)


class Worker:
    """Herald's agents wired into one Faust app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology.load(settings)
        self.catalog = Catalog.load(settings)
        self.contracts = Contracts(settings)
        self.templates = TemplateCatalog(settings.templates_dir)
        longest_hold_s = max(t for r in self.topology.retry.values() for t in r.tiers)
        self.app = create_faust_app(settings, longest_hold_s)
        self.sink = AckedSink(self._send, ack_timeout_s=settings.kafka_ack_timeout_s)
        self.clock = Clock(settings.clock_offset_ms)
        self.intake = Intake(settings, self.contracts, self.catalog, self.topology)
        self.users = UserDirectory(settings, self.contracts, self.topology)
        self.feedback = DeviceFeedbackLog(settings, self.contracts, self.topology)
        self.invalid_tokens = self._table("push-tokens", "herald.push.tokens.changelog", "raw")
        self.router = Router(
            settings,
            self.contracts,
            self.catalog,
            self.topology,
            self.templates,
            cast(MutableMapping[bytes, Any], self.invalid_tokens),
        )
        self.suppressions = SuppressionList(settings)
        self.watchdog = StallWatchdog(settings, settings.stall_timeout_s)
        self.continuity = self._continuity()
        self._wire_intake()
        self._wire_routing()
        self._wire_email()
        self._wire_push()
        self._wire_delays()
        self._wire_watchdog()
        self._wire_health()

    def topic(self, logical_name: str, value_serializer: str = "raw") -> Any:
        """A Faust topic for a declared topic, with its declared partition count."""
        spec = self.topology.spec(logical_name)
        return self.app.topic(
            self.settings.topic(logical_name),
            partitions=spec.partitions,
            key_serializer="raw",
            value_serializer=value_serializer,
        )

    async def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> Any:
        return await self.app.producer.send(
            topic, key, value, partition, None, list(headers) or None
        )

    def _wire_intake(self) -> None:
        self.idempotency = self._table(
            "intake-idempotency", "herald.intake.idempotency.changelog", "json"
        )
        source = self._source(self.intake.intents_topic, self.intake.keyed_topic)
        table = cast(MutableMapping[bytes, Any], self.idempotency)

        def handle(raw: RawRecord, view: WriteBehind) -> list[Out]:
            return self.intake.handle(raw, view, self.clock.now_ms())

        self.app.agent(source, name="herald.intake", concurrency=1)(
            self._batched(handle, lambda: WriteBehind(table), self.intake.processing_error)
        )

        async def sweep_idempotency() -> None:
            expired = self.intake.expired_keys(table, self.clock.now_ms())
            for key in expired:
                del table[key]
            if expired:
                log.info("idempotency sweep: %d expired keys deleted", len(expired))

        self.app.timer(self.settings.idempotency_sweep_interval_s)(sweep_idempotency)

    def _table(self, name: str, changelog: str, value_serializer: str) -> Any:
        """A KeyPartitionedTable on a declared changelog topic."""
        spec = self.topology.spec(changelog)
        return self.app.tables.add(
            KeyPartitionedTable(
                self.app,
                name=name,
                default=None,
                beacon=self.app.tables.beacon,
                partitions=spec.partitions,
                changelog_topic=self.topic(changelog, value_serializer),
                key_type=bytes,
                value_type=bytes if value_serializer == "raw" else None,
            )
        )

    def _wire_routing(self) -> None:
        users = cast(
            MutableMapping[bytes, Any], self._table("users", "herald.users.changelog", "raw")
        )
        directory, router = self.users, self.router

        def apply_profile(raw: RawRecord, view: WriteBehind) -> list[Out]:
            return directory.handle(raw, view, self.clock.now_ms())

        def route(raw: RawRecord, view: WriteBehind) -> list[Out]:
            return router.handle(raw, view, self.clock.now_ms())

        self.app.agent(
            self._source(directory.users_topic, directory.keyed_topic),
            name="herald.users",
            concurrency=1,
        )(self._batched(apply_profile, lambda: WriteBehind(users), self._malformed_other))
        self.app.agent(
            self._source(router.recipients_topic, router.rejoin_topic),
            name="herald.route",
            concurrency=1,
        )(self._batched(route, lambda: WriteBehind(users), self._malformed_other))

    def _registry(self, channel: str) -> Callable[[], WriteBehind]:
        """A channel's delivery registry table, as a factory of agent views; and its
        expiry sweep."""
        changelog = f"herald.{channel}.deliveries.changelog"
        table = self._table(f"{channel}-deliveries", changelog, "raw")
        data = cast(MutableMapping[bytes, Any], table.data)
        registry_topic = self.settings.topic(changelog)

        async def sweep_registry() -> None:
            expired = expired_entries(
                data,
                registry_topic,
                self.settings.idempotency_window_s * 1000,
                self.clock.now_ms(),
            )
            if expired:
                await self.sink.deliver(expired)
                log.info("%s registry sweep: %d expired routes dropped", channel, len(expired))

        self.app.timer(self.settings.idempotency_sweep_interval_s)(sweep_registry)
        # The channel writes each entry's changelog record itself and waits for it
        # (see pipeline.agents.deliveries), so the view writes the store directly,
        # without Faust's own (unawaited) changelog send.
        return lambda: WriteBehind(data)

    def _wire_email(self) -> None:
        registry_view = self._registry("email")
        # One breaker for both lanes: they talk to the same server.
        breaker = CircuitBreaker.smtp(self.settings)
        for lane, logical_topic in LANES.items():
            # Each lane has its own connections: login codes never wait behind bulk mail.
            channel = EmailChannel(
                self.settings,
                self.contracts,
                self.catalog,
                self.topology,
                self.templates,
                email_provider(self.settings),
                self.suppressions,
                breaker,
                self.sink.deliver,
                self.clock,
            )
            self.app.agent(
                self._source(self.settings.topic(logical_topic)),
                name=f"herald.email.{lane}",
                concurrency=1,
            )(
                self._batched(
                    channel.handle,
                    registry_view,
                    self._malformed_other,
                    batch_max=self.settings.smtp_connections,
                )
            )

        async def follow_suppressions() -> None:
            await self.suppressions.run()

        self.app.task(follow_suppressions)

    def _wire_push(self) -> None:
        channel = PushChannel(
            self.settings,
            self.contracts,
            self.catalog,
            self.topology,
            self.templates,
            GatewayPublisher(self.settings),
            self.sink.deliver,
            self.clock,
        )
        # A batch's publications overlap (see BatchRun), so push takes full batches.
        self.app.agent(self._source(channel.requests_topic), name="herald.push", concurrency=1)(
            self._batched(channel.handle, self._registry("push"), self._malformed_other)
        )

        tokens = cast(MutableMapping[bytes, Any], self.invalid_tokens)
        feedback = self.feedback

        def record_feedback(raw: RawRecord, view: WriteBehind) -> list[Out]:
            return feedback.handle(raw, view, self.clock.now_ms())

        self.app.agent(
            self._source(feedback.feedback_topic, feedback.keyed_topic),
            name="herald.push.feedback",
            concurrency=1,
        )(self._batched(record_feedback, lambda: WriteBehind(tokens), self._malformed_other))

    def _continuity(self) -> Continuity:
        """Hole detection for the agents' streams (see :class:`Continuity`)."""
        compacted = {
            self.settings.topic(spec.name)
            for spec in self.topology.topics.values()
            if "compact" in spec.config.get("cleanup.policy", "")
        }

        async def start(topic: str, partition: int) -> int:
            # Faust's view of the group's commit (private, but the only copy that moves
            # with Faust's commits) once it has one; before that (it fills it only
            # after its seek, and not for offset 0) the broker's.
            offset = cast(Any, self.app.consumer)._committed_offset.get(TP(topic, partition))
            if offset is not None:
                return int(offset)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.watchdog.start_offset, topic, partition)

        async def seek(topic: str, partition: int, offset: int) -> None:
            # seek_wait runs on the consumer's own thread and waits for the position;
            # Consumer.seek sets it from this thread, racing the fetcher.
            await self.app.consumer.seek_wait({TP(topic, partition): offset})

        continuity = Continuity(lambda topic: topic not in compacted, start, seek)
        guarded: list[Any] = []

        async def on_assigned(sender: Any, assigned: Any, **_: Any) -> None:
            consumer = cast(Any, self.app.consumer)
            if consumer not in guarded:  # the consumer exists by the first assignment
                consumer.ack = continuity.guard(consumer.ack)
                consumer._add_gap = continuity.guard_gaps(consumer._add_gap)
                guarded.append(consumer)
            continuity.assigned((tp.topic, tp.partition) for tp in assigned)

        self.app.on_partitions_assigned.connect(cast(Any, on_assigned))

        return continuity

    def _wire_delays(self) -> None:
        malformed_topic = self.settings.topic("notification.malformed")
        for stage, policy in self.topology.retry.items():
            tiers = DelayTiers.of(policy, self.settings)
            for index, topic in enumerate(tiers.topics):
                run = DelayRun(
                    tiers,
                    index,
                    self.sink,
                    self.contracts,
                    malformed_topic,
                    self.clock,
                    self.continuity,
                )
                self.app.agent(
                    self._source(topic), name=f"herald.delay.{stage}.{index}", concurrency=1
                )(run.run)

    def _wire_watchdog(self) -> None:
        watchdog = self.watchdog
        streams = {
            self.intake.intents_topic,
            self.intake.keyed_topic,
            self.users.users_topic,
            self.users.keyed_topic,
            self.router.recipients_topic,
            self.router.rejoin_topic,
            # Channel lanes commit after every batch (a delivery times out after
            # HERALD_SMTP_TIMEOUT_S / HERALD_GATEWAY_TIMEOUT_S), so a lane that commits
            # nothing for the stall timeout is stuck. Delay tiers hold records on
            # purpose: not watched.
            *(self.settings.topic(t) for t in LANES.values()),
            self.settings.topic("notification.push.requested"),
            self.feedback.feedback_topic,
            self.feedback.keyed_topic,
        }

        reseeked: dict[tuple[str, int], int] = {}

        async def watch() -> None:
            owned = [
                (tp.topic, tp.partition)
                for tp in self.app.consumer.assignment()
                if tp.topic in streams
            ]
            loop = asyncio.get_running_loop()
            stuck = await loop.run_in_executor(None, watchdog.stalled, owned)
            fresh = {tp: offset for tp, offset in stuck.items() if reseeked.get(tp) != offset}
            if fresh:
                # First cure: read them again from the committed offset, in-process.
                log.warning("re-reading stalled partitions from their committed offsets: %s", fresh)
                await self.app.consumer.seek_wait(
                    {
                        TP(topic, partition): max(offset, 0)
                        for (topic, partition), offset in fresh.items()
                    }
                )
                reseeked.update(fresh)
                watchdog.restart_clock(fresh)
            elif stuck:
                log.critical("worker stalled; exiting %d so that it is restarted", EXIT_STALLED)
                os._exit(EXIT_STALLED)  # no shutdown commits: what is unfinished is re-read

        self.app.timer(5.0)(watch)

    def _wire_health(self) -> None:
        if not self.settings.metrics_port:
            return
        tables: Any = self.app.tables

        def recovered() -> bool:
            return bool(tables.recovery.completed.is_set())

        health = WorkerHealth(self.settings, self.sink, recovered)

        async def serve_health() -> None:
            await health.serve()

        self.app.task(serve_health)

    def _source(self, *topics: str) -> Any:
        return self.app.topic(*topics, key_serializer="raw", value_serializer="raw")

    def _malformed_other(self, raw: RawRecord, exc: Exception, now: int) -> Out:
        return malformed(
            self.contracts,
            self.settings.topic("notification.malformed"),
            raw,
            "processing_error",
            f"{type(exc).__name__}: {exc}",
            now,
        )

    def _batched(
        self,
        handle: Handle,
        new_view: Callable[[], WriteBehind],
        on_error: OnError,
        *,
        batch_max: int | None = None,
    ) -> Callable[[Any], Coroutine[Any, Any, None]]:
        """An agent body running a fresh :class:`BatchRun` each time Faust starts it."""

        async def agent(stream: Any) -> None:
            run = BatchRun(
                handle,
                on_error,
                self.sink,
                new_view(),
                clock=self.clock,
                batch_max=batch_max or self.settings.batch_max,
                linger_s=self.settings.batch_linger_s,
                continuity=self.continuity,
            )
            await run.run(stream)

        return agent

    def verify_topics(self) -> None:
        """Refuse to start on a broker whose topics differ from topologies/."""
        report = topology_admin.check(self.settings, self.topology)
        if report.drift:
            listing = "\n  ".join(map(str, report.drift))
            raise SystemExit(
                f"topics differ from topologies/ (run `herald topics apply`):\n  {listing}"
            )

    def run(self) -> None:
        """Run the worker until SIGINT/SIGTERM (blocking)."""
        self.verify_topics()
        self.settings.worker_dir.mkdir(parents=True, exist_ok=True)
        worker = faust.Worker(
            self.app,
            loglevel=self.settings.log_level.lower(),
            logging_config=logs.logging_config(self.settings),
        )
        worker.execute_from_commandline()
