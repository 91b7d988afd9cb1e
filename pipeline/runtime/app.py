"""The runtime: one worker process's Faust app, its stages' loops, writes and guards.

Stages (pipeline.stages) are framework-free: a handle takes a RawRecord and a table
view and returns Out records. The runtime runs each over its topics in batches,
writes the outputs and waits for Kafka's acknowledgement before it acks the inputs
(so Faust commits only handled offsets), keeps tables, timers and background tasks,
and watches for stalls and skipped records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

import faust
from confluent_kafka import KafkaException

from pipeline import logs, tracing
from pipeline.runtime.batches import BatchRun, Handle, HoldRun, OnError, Release
from pipeline.runtime.continuity import Continuity
from pipeline.runtime.faust import (
    ConsumerSeam,
    Inbox,
    KeyPartitionedTable,
    create_faust_app,
    table_entries,
)
from pipeline.runtime.health import WorkerHealth
from pipeline.runtime.memory import tune_gc
from pipeline.runtime.producer import KafkaWriter
from pipeline.runtime.sink import AckedSink
from pipeline.runtime.tables import (
    Changelog,
    StageTable,
    WriteBehind,
    encode_json,
    encode_raw,
)
from pipeline.runtime.watchdog import EXIT_STALLED, Cures, StallWatchdog
from pipeline.settings import Settings
from pipeline.times import Clock
from pipeline.topology import Topology
from pipeline.topology import admin as topology_admin

log = logging.getLogger(__name__)


class Runtime:
    """Faust app, acknowledged writes and guards of one worker."""

    def __init__(self, settings: Settings, topology: Topology, clock: Clock) -> None:
        self.settings = settings
        self.topology = topology
        self.clock = clock
        longest_hold_s = max(t for r in topology.retry.values() for t in r.tiers)
        self.app = create_faust_app(settings, longest_hold_s)
        self.seam = ConsumerSeam(self.app)
        self.writer = KafkaWriter(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "client.id": f"{settings.app_id}-worker",
                # librdkafka gives up on a record after this long and reports it, so
                # the sink sends it again (deterministic ids make the copy harmless).
                "message.timeout.ms": int(settings.kafka_ack_timeout_s * 1000),
                "logger": logs.librdkafka_logger("worker"),
            }
        )
        self.sink = AckedSink(self.writer.write, ack_timeout_s=settings.kafka_ack_timeout_s + 5)
        self.watchdog = StallWatchdog(settings, settings.stall_timeout_s)
        #: The topics the stages and holds read (the ones Continuity guards).
        self._streams: set[str] = set()
        self.continuity = self._continuity()

    def table(
        self,
        name: str,
        changelog: str,
        value_serializer: str = "raw",
        *,
        write_changelog: bool = True,
    ) -> StageTable:
        """A table on a declared changelog topic: Faust recovers it (and keeps it with
        the partitions it goes with); the runtime writes its changelog with each
        batch's outputs, unless ``write_changelog`` is False (the stage writes it)."""
        spec = self.topology.spec(changelog)
        table = self.app.tables.add(
            KeyPartitionedTable(
                self.app,
                name=name,
                default=None,
                beacon=self.app.tables.beacon,
                partitions=spec.partitions,
                changelog_topic=self.app.topic(
                    self.settings.topic(changelog),
                    partitions=spec.partitions,
                    key_serializer="raw",
                    value_serializer=value_serializer,
                ),
                key_type=bytes,
                value_type=bytes if value_serializer == "raw" else None,
            )
        )
        encode = encode_raw if value_serializer == "raw" else encode_json
        topic = self.settings.topic(changelog)
        self.sink.state_topics.add(topic)
        return StageTable(
            table_entries(table),
            Changelog(topic, spec.partitions, encode) if write_changelog else None,
        )

    def stage(
        self,
        name: str,
        topics: Sequence[str],
        handle: Handle,
        table: StageTable | None,
        on_error: OnError,
        *,
        batch_max: int | None = None,
        in_flight: int | None = None,
        attached: dict[str, StageTable] | None = None,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        """Run ``handle`` over ``topics`` (physical names) in batches; ``table`` is the
        table its views write to once a batch is acknowledged; ``in_flight`` batches
        are written while the next is handled (default HERALD_BATCHES_IN_FLIGHT);
        ``attached`` tables are further ones the stage writes (``view.attached(name)``);
        ``on_flush`` is called as each batch is closed, before its deliveries are awaited."""
        table = table or StageTable({})
        inbox = self.seam.inbox(topics)

        async def agent(stream: Any) -> None:
            tracer = tracing.tracer()
            run = BatchRun(
                handle,
                on_error,
                self.sink,
                WriteBehind(
                    table.store,
                    table.changelog,
                    {
                        name: WriteBehind(other.store, other.changelog)
                        for name, other in (attached or {}).items()
                    },
                ),
                clock=self.clock,
                batch_max=batch_max or self.settings.batch_max,
                linger_s=self.settings.batch_linger_s,
                in_flight=self.settings.batches_in_flight if in_flight is None else in_flight,
                continuity=self.continuity,
                on_flush=on_flush,
                tracing=None if tracer is None else tracing.StageTracing(tracer, name),
            )
            inbox.open()
            stopping = asyncio.ensure_future(close_when_ended(stream, inbox))
            try:
                async with self._reread_on_crash(topics):
                    await run.run(inbox)
            finally:
                stopping.cancel()

        # The agent subscribes the topics and gives the stage Faust's lifecycle; its
        # records bypass the stream (the fetch loop hands them to the inbox).
        self.app.agent(self._source(topics), name=name, concurrency=1)(agent)

    def hold(self, name: str, topic: str, release: Release) -> None:
        """Run a delay tier topic: each record held until ``release`` returns it."""

        async def agent(stream: Any) -> None:
            async with self._reread_on_crash([topic]):
                await HoldRun(release, self.sink, self.continuity).run(stream)

        self.app.agent(self._source([topic]), name=name, concurrency=1)(agent)

    @contextlib.asynccontextmanager
    async def _reread_on_crash(self, topics: Sequence[str]) -> AsyncIterator[None]:
        """A run that crashes (Faust restarts its agent) took records it never acked,
        and the stream will not hand them over again: its owned partitions are read
        again from the group's commits, so the new run gets them (a crashed delay tier
        run otherwise held its routes until the next rebalance)."""
        try:
            yield
        except Exception:
            owned = [tp for tp in self.seam.assignment() if tp[0] in topics]
            log.exception("a stage run crashed; re-reading %s from the commits", owned)
            for tp in owned:
                with contextlib.suppress(Exception):  # no longer ours: its owner reads it
                    await self.continuity.rewind(*tp, await self.continuity.start(*tp))
            raise

    def owned_share(self, topic: str, partitions: int) -> float:
        """The share of ``topic``'s partitions this worker owns now (0.0 before its
        first assignment)."""
        try:
            owned = sum(1 for name, _ in self.seam.assignment() if name == topic)
        except Exception:  # no consumer yet
            return 0.0
        return owned / partitions

    def timer(self, interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` every ``interval_s`` while the worker runs."""

        async def tick() -> None:
            await action()

        self.app.timer(interval_s)(tick)

    def task(self, action: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``action`` in the background while the worker runs."""

        async def background() -> None:
            await action()

        self.app.task(background)

    def _source(self, topics: Sequence[str]) -> Any:
        self._streams.update(topics)
        return self.app.topic(*topics, key_serializer="raw", value_serializer="raw")

    def _continuity(self) -> Continuity:
        """Hole detection for the stages' streams (see :class:`Continuity`)."""
        compacted = {
            self.settings.topic(spec.name)
            for spec in self.topology.topics.values()
            if "compact" in spec.config.get("cleanup.policy", "")
        }
        seam = self.seam

        async def start(topic: str, partition: int) -> int:
            # The broker's commit, never Faust's _committed_offset: Faust clears that on
            # revoke, but a commit finishing in the rebalance window writes it again for
            # the revoked partitions and nothing clears it after, so a partition that
            # comes back would find its earlier ownership's offset.
            loop = asyncio.get_running_loop()
            backoff = 0.2
            while True:
                try:
                    return await loop.run_in_executor(
                        None, self.watchdog.start_offset, topic, partition
                    )
                except KafkaException as exc:  # the broker is away: wait, never crash the run
                    log.warning("no committed offset for %s[%d] yet: %s", topic, partition, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

        async def seek(topic: str, partition: int, offset: int) -> None:
            await seam.seek({(topic, partition): offset})

        streams = self._streams
        continuity = Continuity(
            lambda topic: topic not in compacted, start, seek, lambda topic: topic in streams
        )

        async def assigned(partitions: list[tuple[str, int]]) -> None:
            # The consumer exists by the first assignment.
            seam.guard(continuity.guard, continuity.guard_gaps, continuity.read_offsets)
            await seam.pace_fetches(self.settings.fetch_interval_ms / 1000)
            continuity.assigned(partitions)
            guarded = [tp for tp in partitions if continuity.guards(tp[0])]
            loop = asyncio.get_running_loop()
            try:
                starts = await loop.run_in_executor(None, self.watchdog.start_offsets, guarded)
            except KafkaException as exc:  # the runs' hole checks still stand
                log.warning("no floors for this assignment: %s", exc)
                return
            continuity.floor_starts(starts)

        seam.on_assigned(assigned)

        async def ends(tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.watchdog.end_offsets, tps)

        async def reread() -> None:
            if not seam.streaming():
                return  # in a rebalance: Faust seeks to the commits when it ends
            owned = seam.assignment()
            if continuity.skipped:
                await continuity.reread_skipped(owned)
            try:
                await continuity.seek_unreached_floors(owned, ends)
            except KafkaException as exc:  # the broker is away; the next tick tries again
                log.info("floors not checked: %s", exc)

        self.timer(1.0, reread)
        return continuity

    def watch(self, streams: Iterable[str]) -> None:
        """Cure owned partitions of ``streams`` that commit nothing for the stall timeout
        although records wait: re-read them, then rejoin the group, then exit to be
        restarted (see pipeline.runtime.watchdog)."""
        watched = set(streams)
        watchdog = self.watchdog
        cures = Cures()

        async def watch() -> None:
            if self.seam.fetcher_ended():
                log.error(
                    "Faust's fetch loop ended by itself; starting it again. Flow: %s",
                    self.seam.describe([]),
                )
                await self.seam.restart_fetcher()
            owned = [tp for tp in self.seam.assignment() if tp[0] in watched]
            loop = asyncio.get_running_loop()
            stuck = await loop.run_in_executor(None, watchdog.stalled, owned)
            if self.seam.streaming():  # not while a rebalance rewrites Faust's view
                raised = self.seam.raise_committed(watchdog.committed)
                if raised:
                    log.warning(
                        "Faust's committed offset was behind the group's commit (a commit "
                        "that landed after the assignment read them), so it committed "
                        "nothing more there; raised (partition, Faust's, the group's): %s",
                        raised,
                    )
            if not stuck:
                return
            plan = cures.next(stuck)
            if Cures.EXIT in plan:
                log.critical(
                    "worker stalled; exiting %d so that it is restarted. Flow: %s. Tasks:\n%s",
                    EXIT_STALLED,
                    self.seam.describe(stuck),
                    task_stacks(),
                )
                os._exit(EXIT_STALLED)  # no shutdown commits: what is unfinished is re-read
            if Cures.REJOIN in plan:
                log.error(
                    "partitions %s still stalled after a re-read; rejoining the group. "
                    "Flow: %s. Tasks:\n%s",
                    sorted(plan[Cures.REJOIN]),
                    self.seam.describe(plan[Cures.REJOIN]),
                    task_stacks(),
                )
                try:
                    await self.seam.rejoin()
                except Exception:  # the next verdict exits instead
                    log.exception("could not rejoin the group")
            fresh = plan.get(Cures.RESEEK, {})
            if fresh:
                log.warning(
                    "re-reading stalled partitions from their committed offsets: %s (flow: %s)",
                    fresh,
                    self.seam.describe(fresh),
                )
                for (topic, partition), offset in fresh.items():  # with floors (continuity)
                    await self.continuity.rewind(topic, partition, max(offset, 0))
            watchdog.restart_clock(stuck)

        self.timer(5.0, watch)

    def serve_health(self) -> None:
        """Serve /metrics, /healthz and /readyz on HERALD_METRICS_PORT (0: none)."""
        if not self.settings.metrics_port:
            return
        health = WorkerHealth(self.settings, self.sink, self.seam.tables_recovered)
        self.task(health.serve)

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
        tune_gc(self.settings.gc_young_threshold)
        worker = faust.Worker(
            self.app,
            loglevel=self.settings.log_level.lower(),
            logging_config=logs.logging_config(self.settings),
        )
        worker.execute_from_commandline()


async def close_when_ended(stream: Any, inbox: Inbox) -> None:
    """Close ``inbox`` when the agent's stream ends: Faust stops an agent by ending
    its stream, and the stage then writes what it handled."""
    async for _ in stream.noack():
        pass  # none come: the fetch loop hands this stage's records to its inbox
    inbox.close()


def task_stacks() -> str:
    """Where each of the loop's tasks waits (its chain of awaits): what an operator
    needs to see why a worker stalled, since it exits right after."""
    lines = []
    for task in asyncio.all_tasks():
        chain: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(chain) < 16:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                break
            chain.append(
                f"{frame.f_code.co_name} "
                f"({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
            )
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        lines.append(f"{task.get_name()}: {' -> '.join(chain) or 'done'}")
    return "\n".join(sorted(lines))
