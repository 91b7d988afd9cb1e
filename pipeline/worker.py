"""A worker: Herald's stages, in flow order, wired into the runtime.

This is the one module that knows both sides: the stages (pipeline.stages, framework
free) and the runtime (pipeline.runtime, the only place that knows Faust and the
Kafka clients). Every worker runs every stage; scale out by starting more.
"""

from __future__ import annotations

import logging

from pipeline import metrics, tracing
from pipeline.errors import ConfigurationError, HeraldError
from pipeline.providers.gateway import GatewayPublisher
from pipeline.runtime.app import Runtime
from pipeline.runtime.batches import Handle
from pipeline.runtime.records import Out, RawRecord
from pipeline.runtime.tables import StageTable, WriteBehind
from pipeline.settings import Settings
from pipeline.stages.channel import DirectChannel
from pipeline.stages.channels import DIRECT, PUSH, DirectKind, routings
from pipeline.stages.context import StageContext
from pipeline.stages.delay import DelayRelease, DelayTiers
from pipeline.stages.deliveries import expired_entries
from pipeline.stages.digest import check_templates
from pipeline.stages.handoff import (
    DIGESTS,
    LIMITS,
    PUSH_REGISTRY,
    RouteAndPush,
    route_tables,
)
from pipeline.stages.intake import Intake
from pipeline.stages.outputs import malformed
from pipeline.stages.push import DeviceFeedbackLog, PushChannel
from pipeline.stages.route import Router
from pipeline.stages.users import UserDirectory
from pipeline.throttle import SharedRate

log = logging.getLogger(__name__)


class Worker:
    """Herald's stages wired into one runtime."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tracing.configure(settings, "herald-worker")
        self.ctx = ctx = StageContext.load(settings)
        metrics.declare_tenants(ctx.limits.tenants)
        self.runtime = Runtime(settings, ctx.topology, ctx.clock)
        self.app = self.runtime.app
        self.intake = Intake(ctx)
        self.users = UserDirectory(ctx)
        self.feedback = DeviceFeedbackLog(ctx)
        self.invalid_tokens = self.runtime.table("push-tokens", "herald.push.tokens.changelog")
        self.router = Router(ctx, routings(ctx, self.invalid_tokens.store))
        # A worker runs the channels its catalog uses: each other one would add its
        # lanes, tiers and registry to every fetch (docs/channels.md). Email is always
        # on (the API's login codes), and push (the route stage's hand-off).
        self.channels = [c for c in ctx.topology.channels if c in ctx.catalog.channels()]
        if paced := set(ctx.limits.channels) - set(DIRECT):
            raise ConfigurationError(
                f"limits.yaml paces {sorted(paced)}: only a channel that calls a provider "
                f"({', '.join(DIRECT)}) can be paced; push publishes to a Kafka topic"
            )
        check_templates(ctx.catalog, ctx.templates)
        self.direct = {name: DIRECT[name](ctx) for name in self.channels if name != PUSH}
        # One push channel for the push stage and the route stage's hand-off: its
        # in-flight set keeps the two from publishing one route at once.
        self.push = PushChannel(ctx, GatewayPublisher(settings), self.runtime.sink.deliver)
        self.push_registry = self._registry("push")
        self._wire_intake()
        self._wire_routing()
        for name, kind in self.direct.items():
            self._wire_direct(name, kind)
        self._wire_push()
        self._wire_delays()
        self._wire_watchdog()
        self.runtime.task(ctx.cancellations.followed())
        self.runtime.task(ctx.template_archive.followed())
        self.runtime.task(self._archive_templates)
        self.runtime.serve_health()

    async def _archive_templates(self) -> None:
        """Archive the versions of this worker's templates the archive lacks, so that a
        resend can render them after a deploy changed them (docs/channels.md)."""
        archive = self.ctx.template_archive
        await archive.ready.wait()
        records = archive.entries(self.ctx.templates, self.ctx.clock.now_ms())
        if not records:
            return
        try:
            await self.runtime.sink.deliver(records)
        except HeraldError as exc:  # only a resend of these versions misses them
            for record in records:
                archive.put(record.key or b"", None)  # not archived after all
            log.warning("template archive: %d version(s) not archived: %s", len(records), exc)
            return
        log.info("template archive: %d new version(s) archived", len(records))

    def _wire_intake(self) -> None:
        runtime, intake, clock = self.runtime, self.intake, self.ctx.clock
        table = runtime.table("intake-idempotency", "herald.intake.idempotency.changelog", "json")

        def handle(raw: RawRecord, view: WriteBehind) -> list[Out]:
            return intake.handle(raw, view, clock.now_ms())

        runtime.stage(
            "herald.intake",
            [intake.intents_topic, intake.keyed_topic],
            handle,
            table,
            intake.processing_error,
        )

        async def sweep_idempotency() -> None:
            expired = intake.expired_keys(table.store, clock.now_ms())
            if table.changelog is not None:
                await runtime.sink.deliver([table.changelog.record(key, None) for key in expired])
            for key in expired:
                table.store.pop(key, None)
            if expired:
                log.info("idempotency sweep: %d expired keys deleted", len(expired))

        runtime.timer(self.settings.idempotency_sweep_interval_s, sweep_idempotency)

    def _wire_routing(self) -> None:
        runtime, clock = self.runtime, self.ctx.clock
        users = runtime.table("users", "herald.users.changelog")
        directory, router = self.users, self.router

        def apply_profile(raw: RawRecord, view: WriteBehind) -> list[Out]:
            return directory.handle(raw, view, clock.now_ms())

        def route(raw: RawRecord, view: WriteBehind) -> list[Out]:
            return router.handle(raw, view, clock.now_ms(), route_tables(view))

        handle: Handle = route
        # Each user's limit counts and open digests, on the user's partition
        # (docs/limits.md, docs/digests.md).
        attached = {
            LIMITS: runtime.table(LIMITS, "herald.limits.changelog", "json"),
            DIGESTS: runtime.table(DIGESTS, "herald.digests.changelog", "json"),
        }
        on_flush = None
        if self.settings.push_handoff:
            handle = RouteAndPush(self.ctx, router, self.push).handle
            attached[PUSH_REGISTRY] = self.push_registry
            on_flush = self.push.flush

        runtime.stage(
            "herald.users",
            [directory.users_topic, directory.keyed_topic],
            apply_profile,
            users,
            self._malformed_other,
        )
        runtime.stage(
            "herald.route",
            [router.recipients_topic, router.rejoin_topic],
            handle,
            users,
            self._malformed_other,
            attached=attached,
            on_flush=on_flush,
        )

    def _registry(self, channel: str) -> StageTable:
        """A channel's delivery registry store, and its expiry sweep.

        The channel writes each entry's changelog record itself and waits for it
        (pipeline.stages.deliveries), so views write the table's store directly,
        without Faust's own (unawaited) changelog send."""
        changelog = self.ctx.topology.channel(channel).registry
        registry = self.runtime.table(f"{channel}-deliveries", changelog, write_changelog=False)
        data = registry.store
        registry_topic = self.settings.topic(changelog)
        sink, clock = self.runtime.sink, self.ctx.clock

        async def sweep_registry() -> None:
            expired = expired_entries(
                data, registry_topic, self.settings.idempotency_window_s * 1000, clock.now_ms()
            )
            if expired:
                await sink.deliver(expired)
                log.info("%s registry sweep: %d expired routes dropped", channel, len(expired))

        self.runtime.timer(self.settings.idempotency_sweep_interval_s, sweep_registry)
        return registry

    def _wire_direct(self, name: str, kind: DirectKind) -> None:
        registry = self._registry(name)
        spec = self.ctx.topology.channel(name)
        pace = None
        if (rate := self.ctx.limits.channels.get(name)) is not None:
            # The lanes of a channel are copartitioned: the bulk lane's share is the
            # worker's share of the channel (docs/limits.md).
            bulk, runtime = self.settings.topic(spec.lanes["bulk"]), self.runtime
            partitions = self.ctx.topology.spec(spec.lanes["bulk"]).partitions
            pace = SharedRate(
                rate.per_second, rate.burst, lambda: runtime.owned_share(bulk, partitions)
            )
        for lane, logical_topic in spec.lanes.items():
            # Each lane has its own transport (its own connections): critical routes
            # never wait behind bulk ones.
            channel = DirectChannel(
                self.ctx,
                name,
                kind.transport(self.runtime.sink.deliver),
                self.runtime.sink.deliver,
                pace,
            )
            self.runtime.stage(
                f"herald.{name}.{lane}",
                [self.settings.topic(logical_topic)],
                channel.handle,
                registry,
                self._malformed_other,
                # A window: the next route starts as soon as the oldest is done, and a
                # lane never has more routes at the provider (each written `sending`
                # first) than its window (docs/email.md).
                batch_max=1,
                in_flight=kind.window - 1,
            )
        for task in kind.tasks():
            self.runtime.task(task)

    def _wire_push(self) -> None:
        channel = self.push
        # A batch's publications overlap (see BatchRun), so push takes full batches.
        self.runtime.stage(
            "herald.push",
            [channel.requests_topic],
            channel.handle,
            self.push_registry,
            self._malformed_other,
            on_flush=channel.flush,
        )
        feedback, clock = self.feedback, self.ctx.clock

        def record_feedback(raw: RawRecord, view: WriteBehind) -> list[Out]:
            return feedback.handle(raw, view, clock.now_ms())

        self.runtime.stage(
            "herald.push.feedback",
            [feedback.feedback_topic, feedback.keyed_topic],
            record_feedback,
            self.invalid_tokens,
            self._malformed_other,
        )

    def _wire_delays(self) -> None:
        for stage, policy in self.ctx.topology.retry.items():
            if stage in self.ctx.topology.channels and stage not in self.channels:
                continue
            tiers = DelayTiers.of(policy, self.settings)
            for index, topic in enumerate(tiers.topics):
                release = DelayRelease(self.ctx, tiers, index)
                self.runtime.hold(f"herald.delay.{stage}.{index}", topic, release.release)

    def _wire_watchdog(self) -> None:
        self.runtime.watch(
            [
                self.intake.intents_topic,
                self.intake.keyed_topic,
                self.users.users_topic,
                self.users.keyed_topic,
                self.router.recipients_topic,
                self.router.rejoin_topic,
                # Channel lanes commit after every batch (a delivery times out after
                # its provider's timeout setting), so a lane that
                # commits nothing for the stall timeout is stuck. Delay tiers hold
                # records on purpose: not watched.
                *(
                    self.settings.topic(lane)
                    for lane, channel in self.ctx.topology.lanes().items()
                    if channel in self.channels
                ),
                self.feedback.feedback_topic,
                self.feedback.keyed_topic,
            ]
        )

    def _malformed_other(self, raw: RawRecord, exc: Exception, now: int) -> Out:
        return malformed(
            self.ctx.contracts,
            self.settings.topic("notification.malformed"),
            raw,
            "processing_error",
            f"{type(exc).__name__}: {exc}",
            now,
        )

    def run(self) -> None:
        """Run the worker until SIGINT/SIGTERM (blocking)."""
        self.runtime.run()
