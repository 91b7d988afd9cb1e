"""The seam between Herald and faust-streaming: every Faust internal Herald touches.

Faust stays Herald's framework (agents, tables with changelogs, the consumer group,
timers), but Herald relies on a few of its internals to keep its guarantees (see
pipeline.runtime.continuity): the consumer's ``ack`` and ``_add_gap`` (wrapped), its
``_read_offset`` (replaced by one with floors), ``seek_wait``, the manual-ack stream
API and the table recovery event. They are all reached through this module, and :func:`check_faust`
verifies each at start-up: a Faust release that renames or reshapes one stops the
worker with the Faust version and what is missing, instead of quietly losing the
guarantee. tests/unit/test_faust_seam.py pins them against the installed release.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any, cast

import aiokafka
import faust
from aiokafka.consumer.consumer import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher as KafkaFetcher
from aiokafka.consumer.group_coordinator import GroupCoordinator
from faust.agents.actor import Actor
from faust.sensors.monitor import Monitor
from faust.stores.memory import Store as MemoryStore
from faust.tables.recovery import Recovery
from faust.transport.consumer import CONSUMER_FETCHING, Consumer, Fetcher
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP, Message
from mode.utils.queues import FlowControlEvent

from pipeline.errors import ConfigurationError, FaustSeamError
from pipeline.settings import Settings
from pipeline.topology.partitioning import partition_for

FAUST_VERSION: str = faust.__version__
AIOKAFKA_VERSION: str = aiokafka.__version__


def _params(function: Any) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


#: (what, check) pairs: each check is true on a Faust release Herald can run on.
_CHECKS: tuple[tuple[str, Callable[[], bool]], ...] = (
    ("Consumer.ack(message) -> bool", lambda: _params(Consumer.ack) == ["message"]),
    (
        "async Consumer._add_gap(tp, offset_from, offset_to)",
        lambda: (
            inspect.iscoroutinefunction(Consumer._add_gap)
            and _params(Consumer._add_gap) == ["tp", "offset_from", "offset_to"]
        ),
    ),
    (
        "Consumer._read_offset (set in Consumer.__init__)",
        lambda: "self._read_offset" in inspect.getsource(Consumer.__init__),
    ),
    (
        "Consumer._drain_messages: getmany, then per record the read offset (filtered by "
        "_read_offset.__getitem__), the gap, "
        "commit_every and the callback raced against suspend_flow (mirrored by "
        "drain_in_batches)",
        lambda: (
            all(
                part in inspect.getsource(Consumer._drain_messages)
                for part in (
                    "getmany(timeout=1.0)",
                    "self._read_offset.__getitem__",
                    "self._add_gap(tp, r_offset + 1, offset)",
                    "self._n_acked >= commit_every",
                    "callback(message), self.suspend_flow.wait()",
                    "set_read_offset(tp, offset)",
                    'self.log.exception("Drain messages raised: %r", exc)',
                )
            )
            and inspect.isasyncgenfunction(Consumer.getmany)
            and "consumer._drain_messages(self)" in inspect.getsource(Fetcher._fetcher.fun)
        ),
    ),
    (
        "Fetcher._fetcher sets shutdown when it ends; App._stop_fetcher stops and resets it",
        lambda: (
            "self.set_shutdown()" in inspect.getsource(Fetcher._fetcher.fun)
            and "self._fetcher.service_reset()" in inspect.getsource(faust.App._stop_fetcher)
        ),
    ),
    ("async Consumer.seek_wait(partitions)", lambda: _params(Consumer.seek_wait) == ["partitions"]),
    ("Consumer.assignment()", lambda: callable(getattr(Consumer, "assignment", None))),
    ("Stream.noack()", lambda: callable(getattr(faust.Stream, "noack", None))),
    ("Stream.events()", lambda: inspect.isasyncgenfunction(faust.Stream.events)),
    ("async Stream.ack(event)", lambda: _params(faust.Stream.ack) == ["event"]),
    (
        "Message.generation_id and App.consumer_generation_id (a stream skips a record "
        "fetched in an earlier generation; Inbox does too)",
        lambda: (
            "self.generation_id" in inspect.getsource(Message.__init__)
            and hasattr(faust.App, "consumer_generation_id")
        ),
    ),
    (
        "FlowControlEvent.manage_queue(queue) clears the queue on resume",
        lambda: (
            _params(FlowControlEvent.manage_queue) == ["queue"]
            and "queue.clear()" in inspect.getsource(FlowControlEvent.clear)
        ),
    ),
    (
        "Consumer._committed_offset (set in __init__), which _new_offset compares the "
        "first acked offset against (ConsumerSeam.raise_committed)",
        lambda: (
            "self._committed_offset" in inspect.getsource(Consumer.__init__)
            and "committed_offset = self._committed_offset[tp]"
            in inspect.getsource(Consumer._new_offset)
        ),
    ),
    (
        "Monitor.stream_inbound_time (the consumer's idle-stream warnings read it)",
        lambda: "self.stream_inbound_time = {}" in inspect.getsource(Monitor.__init__),
    ),
    (
        "the memory Store keeps its entries in one dict, .data, changed only in place",
        lambda: (
            "self.data: MutableMapping = {}" in inspect.getsource(MemoryStore.__post_init__)
            and "self.data ="
            not in inspect.getsource(MemoryStore).replace("self.data: MutableMapping = {}", "")
        ),
    ),
    (
        "Actor.cancel() ends the actor's stream (a shutdown ends a stage's inbox with it)",
        lambda: "StopAsyncIteration()" in inspect.getsource(Actor.cancel),
    ),
    (
        "Recovery.completed (set in Recovery.__init__)",
        lambda: "self.completed" in inspect.getsource(Recovery.__init__),
    ),
    ("Table.partition_for_key(key)", lambda: _params(faust.Table.partition_for_key) == ["key"]),
    (
        "App.flow_control.is_active() (suspended while rebalancing)",
        lambda: (
            "flow_control.suspend" in inspect.getsource(faust.App._on_partitions_revoked)
            and callable(FlowControlEvent.is_active)
        ),
    ),
    (
        "GroupCoordinator.request_rejoin(); the consumer thread's call_thread, _ensure_consumer",
        lambda: (
            _params(GroupCoordinator.request_rejoin) == []
            and inspect.iscoroutinefunction(AIOKafkaConsumerThread.call_thread)
            and callable(AIOKafkaConsumerThread._ensure_consumer)
        ),
    ),
    (
        "aiokafka: async Fetcher._proc_fetch_request(assignment, node_id, request), one "
        "per broker at a time, on the Fetcher made in AIOKafkaConsumer.start (fetch pacing)",
        lambda: (
            inspect.iscoroutinefunction(KafkaFetcher._proc_fetch_request)
            and _params(KafkaFetcher._proc_fetch_request) == ["assignment", "node_id", "request"]
            and "self._in_flight.add(node_id)"
            in inspect.getsource(KafkaFetcher._fetch_requests_routine)
            and "self._fetcher = Fetcher(" in inspect.getsource(AIOKafkaConsumer.start)
        ),
    ),
    (
        "App.rebalancing (True from on_rebalance_start until recovery ends)",
        lambda: (
            "self.rebalancing = True" in inspect.getsource(faust.App.on_rebalance_start)
            and "self.rebalancing = False" in inspect.getsource(faust.App.on_rebalance_end)
        ),
    ),
)


def check_faust() -> None:
    """Raise FaustSeamError unless the installed Faust has every internal Herald uses."""
    missing = []
    for what, check in _CHECKS:
        try:
            ok = check()
        except (AttributeError, TypeError, ValueError, OSError):
            ok = False
        if not ok:
            missing.append(what)
    if missing:
        raise FaustSeamError(
            f"faust-streaming {FAUST_VERSION} (aiokafka {AIOKAFKA_VERSION}) lacks what "
            "pipeline/runtime/faust.py relies on: "
            + "; ".join(missing)
            + " (pin the release in constraints.txt that tests/unit/test_faust_seam.py passes on)"
        )


class PacedFetches:
    """aiokafka's fetch to one broker, started no sooner than ``interval_s`` after the
    previous one to that broker.

    Every fetch names all ~130 partitions a worker reads and costs the consumer thread
    ~2.5 ms of CPU to encode and decode in pure Python, whatever it returns; and with
    aiokafka's ``fetch_min_bytes`` of 1 the broker answers as soon as any partition has
    a record. A trickle of records thus became a fetch per record, and the consumer
    thread's work, in the same process, delayed every wake-up of the event loop by
    milliseconds (docs/performance.md, fifth pass). Pacing bounds the fetches per second without
    costing an idle worker anything: a fetch that finds nothing still waits at the
    broker (up to Faust's 1.5 s), and the next one goes out at once.

    The fetch waits before it is sent, never after its answer, so records it brings are
    handed over at once; the records that reach the broker during the wait come with
    the next fetch. A worker that is behind (``behind()``: its last hand-over was
    large) fetches at once: its fetches come back full, and pacing them only slowed a
    backlog's drain.
    """

    def __init__(
        self,
        fetch: Callable[[Any, int, Any], Awaitable[bool]],
        interval_s: float,
        behind: Callable[[], bool] = lambda: False,
    ) -> None:
        self._fetch = fetch
        self._interval_s = interval_s
        self._behind = behind
        self._last: dict[int, float] = {}

    async def __call__(self, assignment: Any, node_id: int, request: Any) -> bool:
        loop = asyncio.get_running_loop()
        wait = self._last.get(node_id, -self._interval_s) + self._interval_s - loop.time()
        if wait > 0 and not self._behind():
            # aiokafka sends no other fetch to this broker meanwhile (one in flight
            # each), and answers for partitions moved meanwhile are dropped by its
            # position checks as for any fetch in flight.
            await asyncio.sleep(wait)
        self._last[node_id] = loop.time()
        return await self._fetch(assignment, node_id, request)


#: Records in one hand-over of the fetch loop from which a worker counts as behind
#: (PacedFetches): ~6,000 records a second at the default pace, several times what one
#: worker handles.
BEHIND_RECORDS = 256


class FetchLoad:
    """The size of the fetch loop's last hand-over: written by :func:`drain_in_batches`
    on the event loop, read by :class:`PacedFetches` on the consumer's thread."""

    def __init__(self) -> None:
        self.last = 0

    def behind(self) -> bool:
        """True when the last hand-over held BEHIND_RECORDS records or more."""
        return self.last >= BEHIND_RECORDS


class Inbox:
    """The records of a stage's topics, handed over by the fetch loop a fetched batch
    at a time, instead of one by one through Faust's conductor, topic channel and
    stream (per record: a lock, an event object, sensors, a queue hand-off and a turn
    of the event loop).

    What a Faust stream does for its records, an inbox does per batch: it is cleared
    when flow control resumes after a rebalance (``manage_queue``), it skips records
    fetched in an earlier generation or while flow is suspended (acking them through
    the guarded ``ack``, which notes them to be read again), it keeps the monitor's
    per-partition inbound time (Faust warns about idle streams from it), and it ends
    when the stage's Faust actor is stopped (:meth:`close`).
    """

    def __init__(self, app: faust.App, maxsize: int = 4096) -> None:
        self._app: Any = app
        #: Records waiting at most (Faust's stream buffer default), as a stream's
        #: queue bounds them: the fetch loop waits while the stage is behind.
        self._maxsize = maxsize
        self._waiting = 0
        self._lists: collections.deque[Sequence[Any]] = collections.deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._closed = False
        app.flow_control.manage_queue(cast(Any, self))

    def clear(self) -> None:
        """Drop what waits (flow control resumed: a rebalance ended)."""
        self._lists.clear()
        self._waiting = 0
        self._room.set()

    def open(self) -> None:
        """Let :meth:`batches` run (a stage's run starts; Faust restarts a crashed one)."""
        self._closed = False

    def close(self) -> None:
        """End :meth:`batches` once what waits is taken (the stage stops)."""
        self._closed = True
        self._ready.set()

    def empty(self) -> bool:
        return not self._lists

    async def put(self, messages: Sequence[Any]) -> None:
        """Hand over ``messages``; waits while ``maxsize`` records or more wait."""
        while self._waiting >= self._maxsize:
            self._room.clear()
            await self._room.wait()
        self._lists.append(messages)
        self._waiting += len(messages)
        self._ready.set()

    async def batches(self) -> AsyncIterator[Sequence[Any]]:
        app = self._app
        while True:
            while not self._lists:
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
            messages = self._lists.popleft()
            self._waiting -= len(messages)
            self._room.set()
            generation = app.consumer_generation_id
            flowing = app.flow_control.is_active()
            now = time.monotonic()
            inbound = app.monitor.stream_inbound_time
            current = []
            for message in messages:
                if flowing and message.generation_id == generation:
                    current.append(message)
                    inbound[message.tp] = now
                else:  # as a stream acks what it skips; the guarded ack notes it instead
                    self.ack(message)
            if current:
                yield current

    def ack(self, message: Any) -> None:
        # Looked up each time: the seam guards the consumer's ack at the first
        # assignment, after the stage's run began waiting here.
        self._app.consumer.ack(message)


async def drain_in_batches(
    consumer: Any,
    fetcher: Any,
    inboxes: Mapping[str, Inbox] | None = None,
    load: FetchLoad | None = None,
) -> None:
    """Faust's ``Consumer._drain_messages`` (the fetch loop), racing each fetched batch
    against a rebalance's ``suspend_flow`` instead of each record, and handing the
    records of ``inboxes``' topics to them as one list per fetched batch.

    Faust races every record's delivery against ``suspend_flow`` with ``wait_first``:
    four futures and an ``asyncio.wait`` per record, ~100 us of a 2-core box's event
    loop, the largest single cost of a record's trip through a worker. The records of
    a batch are already fetched (getmany does no I/O after its first record), so one
    race per batch aborts a rebalanced batch just as promptly. Everything else is
    Faust's, in its order: records below the read offset dropped, gaps noted, the
    ``commit_every`` commit, the read offset set once a record is handed over (to
    Faust's conductor, or to the list its inbox gets at the end of the batch). ``load``
    learns how many records each fetched batch held.
    """
    inboxes = inboxes or {}
    load = load or FetchLoad()
    callback = consumer.callback
    consumer_should_stop = consumer._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    set_flag = consumer.diag.set_flag
    unset_flag = consumer.diag.unset_flag
    acks_enabled_for = consumer.app.topics.acks_enabled_for
    commit_every = consumer._commit_every

    async def deliver(first: tuple[Any, Any], records: Any) -> None:
        read_offset = consumer._read_offset  # looked up per batch: the seam replaces it
        handed: dict[Inbox, list[Any]] = {}
        item: tuple[Any, Any] | None = first
        since_yield = 0
        count = 0
        while item is not None:
            count += 1
            tp, message = item
            offset = message.offset
            r_offset = read_offset[tp]
            if r_offset is None or offset >= r_offset:
                if offset - (r_offset or 0) > 1 and r_offset and acks_enabled_for(message.topic):
                    await consumer._add_gap(tp, r_offset + 1, offset)
                if commit_every is not None and consumer._n_acked >= commit_every:
                    consumer._n_acked = 0
                    await consumer.commit()
                inbox = inboxes.get(message.topic)
                if inbox is None:
                    await callback(message)
                    since_yield += 1
                else:
                    handed.setdefault(inbox, []).append(message)
                read_offset[tp] = offset
            if since_yield >= 100:  # let the streams take what was handed over
                since_yield = 0
                await asyncio.sleep(0)
            item = await anext(records, None)
        load.last = count
        for inbox, messages in handed.items():
            await inbox.put(messages)

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(CONSUMER_FETCHING)
            records = consumer.getmany(timeout=1.0)
            await consumer.sleep(0)
            if consumer.should_stop:
                continue
            first = await anext(records, None)  # the fetch: outside the race
            if first is None:
                load.last = 0
            else:
                try:
                    await consumer.wait_first(deliver(first, records), consumer.suspend_flow.wait())
                except asyncio.CancelledError:
                    if _cancelling():  # the fetch loop itself is stopped
                        raise
                    # A hand-over waiting on a full Faust queue was cut: clearing the
                    # queues (flow control, around a rebalance) cancels their waiting
                    # putters. The rest of the batch is dropped, as when a rebalance
                    # wins the race; letting the error out would end all fetching
                    # (Fetcher._fetcher ends quietly outside a rebalance).
                    consumer.log.info("a hand-over was cut by a queue clear; fetching on")
                await records.aclose()
            unset_flag(CONSUMER_FETCHING)
    except consumer.consumer_stopped_errors:
        if consumer.transport.app.should_stop:
            return
        raise
    except asyncio.CancelledError:
        if consumer.transport.app.should_stop:
            return
        raise
    except Exception as exc:
        consumer.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(CONSUMER_FETCHING)


def _cancelling() -> bool:
    """True when the running task was asked to stop (not a future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def create_faust_app(settings: Settings, longest_hold_s: float) -> faust.App:
    """A Faust app configured from ``settings`` (no agents yet).

    Raw bytes everywhere (stages decode, so a poison record cannot crash a stream),
    acks=all, no topic creation by Faust (topologies/ owns every topic, changelogs
    included), and a session timeout short enough that a killed worker's partitions
    move quickly.
    """
    check_faust()
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
    writes outside an event (the expiry sweep) and within batches. Every stage
    processes each key on exactly that partition, so both agree.
    """

    def partition_for_key(self, key: Any) -> int:
        if not self.partitions:
            raise ConfigurationError(f"table {self.name} was declared without partitions")
        return partition_for(key, self.partitions)


def table_entries(table: Any) -> MutableMapping[bytes, Any]:
    """The dict a memory-store table keeps its entries in, for stages to read and
    write directly: through Faust's Store a missing key (the common lookup: a new
    notification) costs two raised KeyErrors. Faust's recovery fills the same dict."""
    store = cast(Any, table).data
    if not isinstance(store, MemoryStore) or not isinstance(store.data, dict):
        raise FaustSeamError(
            f"faust-streaming {FAUST_VERSION}: table {table.name} is not kept in a memory "
            "store's dict (pipeline/runtime/faust.py relies on it)"
        )
    return store.data


class ConsumerSeam:
    """Herald's access to the Faust consumer of ``app``: committed offsets, seeks, the
    assignment and the ack/gap guards (pipeline.runtime.continuity)."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._guarded: list[Any] = []
        self._inboxes: dict[str, Inbox] = {}
        #: What the fetch loop handed over last (fetch pacing reads it).
        self.load = FetchLoad()

    def inbox(self, topics: Iterable[str]) -> Inbox:
        """The inbox the fetch loop hands ``topics``' records to (a stage's)."""
        inbox = Inbox(self._app, self._app.conf.stream_buffer_maxsize)
        for topic in topics:
            if topic in self._inboxes:
                raise ConfigurationError(f"topic {topic} already has a stage reading it")
            self._inboxes[topic] = inbox
        return inbox

    @property
    def _consumer(self) -> Any:
        return cast(Any, self._app.consumer)

    async def seek(self, partitions: dict[tuple[str, int], int]) -> None:
        """Seek on the consumer's own thread and wait for the position (Consumer.seek
        sets it from this thread, racing the fetcher)."""
        await self._consumer.seek_wait(
            {TP(topic, partition): offset for (topic, partition), offset in partitions.items()}
        )

    async def rejoin(self) -> None:
        """Have the consumer rejoin its group: a rebalance for the whole group, after
        which Faust rebuilds its view of every partition (paused, active, read offsets)
        and recovers the tables again. Runs on the consumer's own thread."""
        thread = self._consumer._thread

        async def request() -> None:
            thread._ensure_consumer()._coordinator.request_rejoin()

        await thread.call_thread(request)

    async def pace_fetches(self, interval_s: float) -> None:
        """Pace the consumer's fetches (:class:`PacedFetches`); once per aiokafka
        consumer, on its own thread. Nothing when ``interval_s`` is 0."""
        if interval_s <= 0:
            return
        thread = self._consumer._thread

        async def install() -> None:
            fetcher = thread._ensure_consumer()._fetcher
            if fetcher is None or isinstance(fetcher._proc_fetch_request, PacedFetches):
                return
            fetcher._proc_fetch_request = PacedFetches(
                fetcher._proc_fetch_request, interval_s, self.load.behind
            )

        await thread.call_thread(install)

    def fetcher_ended(self) -> bool:
        """True when Faust's fetch loop ended by itself while the worker runs: its task
        swallows a CancelledError met outside a rebalance and ends, and then no
        partition, table changelogs included, is read again."""
        fetcher: Any = cast(Any, self._app)._fetcher
        return bool(
            fetcher._started.is_set()
            and fetcher._shutdown.is_set()
            and not fetcher._stopped.is_set()
            and not self._app.should_stop
        )

    async def restart_fetcher(self) -> None:
        """Start Faust's fetch loop again, as Faust itself does after a rebalance that
        stopped it (``App._stop_fetcher``, then ``maybe_start``)."""
        fetcher: Any = cast(Any, self._app)._fetcher
        await fetcher.stop()
        fetcher.service_reset()
        await fetcher.maybe_start()

    def assignment(self) -> list[tuple[str, int]]:
        """The partitions this worker owns now."""
        return [(tp.topic, tp.partition) for tp in self._consumer.assignment()]

    def raise_committed(
        self, group_commits: Mapping[tuple[str, int], int]
    ) -> list[tuple[tuple[str, int], int, int]]:
        """Raise Faust's committed offset of each owned partition to the group's commit
        on the broker where it is lower; the (partition, Faust's, the group's) raised.

        Faust reads the commits when it seeks after an assignment; a commit the
        partition's previous owner makes after that (its last, as it leaves) lands
        behind Faust's back. Faust then commits nothing more on the partition: its
        ``_new_offset`` takes a first acked offset more than one past its committed
        offset for a hole, and the records in between, handled by that owner, are
        never acked here (seen in the rejoin test: committed 8 against the group's 18,
        acks 18..54, no commit for 25 s until the next rebalance)."""
        consumer = self._consumer
        committed = consumer._committed_offset
        owned = set(consumer.assignment())
        raised = []
        for (topic, partition), offset in group_commits.items():
            tp = TP(topic, partition)
            mine = committed.get(tp)
            if tp in owned and mine is not None and offset > mine:
                committed[tp] = offset
                raised.append(((topic, partition), mine, offset))
        return raised

    def guard(
        self,
        ack: Callable[[Callable[[Any], bool]], Callable[[Any], bool]],
        add_gap: Callable[[Any], Any],
        read_offsets: Callable[[Any], Any],
    ) -> None:
        """Wrap the consumer's ``ack`` and ``_add_gap``, replace its ``_read_offset``
        and its fetch loop (:func:`drain_in_batches`): once per consumer, at its first
        assignment, before the fetch loop starts."""
        consumer = self._consumer
        if consumer in self._guarded:
            return
        for name in ("ack", "_add_gap", "_read_offset", "_drain_messages"):
            if not hasattr(consumer, name):
                raise FaustSeamError(
                    f"faust-streaming {FAUST_VERSION}: the consumer has no {name} "
                    "(pipeline/runtime/faust.py relies on it)"
                )
        consumer.ack = ack(consumer.ack)
        consumer._add_gap = add_gap(consumer._add_gap)
        consumer._read_offset = read_offsets(consumer._read_offset)
        consumer._drain_messages = functools.partial(
            drain_in_batches, consumer, inboxes=self._inboxes, load=self.load
        )
        self._guarded.append(consumer)

    def on_assigned(self, callback: Callable[[list[tuple[str, int]]], Awaitable[None]]) -> None:
        """Await ``callback`` with the partitions of every new assignment (in the
        rebalance: before the streams resume)."""

        async def assigned(sender: Any, assigned: Any, **_: Any) -> None:
            await callback([(tp.topic, tp.partition) for tp in assigned])

        self._app.on_partitions_assigned.connect(cast(Any, assigned))

    def streaming(self) -> bool:
        """True while the streams flow: not in a rebalance nor its table recovery (which
        resumes flow control to read the changelogs, and a seek then can stall it)."""
        return bool(self._app.flow_control.is_active()) and not self._app.rebalancing

    def tables_recovered(self) -> bool:
        """True once Faust recovered the tables of the partitions it owns."""
        return bool(cast(Any, self._app.tables).recovery.completed.is_set())

    def describe(self, partitions: Iterable[tuple[str, int]]) -> str:
        """Faust's and aiokafka's view of the flow and of ``partitions``: what a stall
        report needs (diagnostics only: an internal that moved reads as unknown)."""
        app: Any = self._app
        consumer = self._consumer
        facts: list[str] = []

        def fact(name: str, read: Callable[[], object]) -> None:
            try:
                facts.append(f"{name}={read()}")
            except Exception as exc:  # a diagnostic never fails the caller
                facts.append(f"{name}=unknown ({type(exc).__name__})")

        recovery = app.tables.recovery
        fact("rebalancing", lambda: app.rebalancing)
        # A fetch loop that ended while the service runs reads no partition at all.
        fact("fetcher", lambda: (app._fetcher.state, app._fetcher._shutdown.is_set()))
        fact("flow_control", lambda: app.flow_control.is_active())
        fact("consumer_flow", lambda: consumer.flow_active)
        fact("in_recovery", lambda: recovery.in_recovery)
        fact("recovered", lambda: recovery.completed.is_set())
        fact("changelog_queue", lambda: app.tables.changelog_queue.qsize())
        fact("producer_buffer", lambda: app.producer.buffer.size)
        tps = [TP(topic, partition) for topic, partition in partitions]
        fact("paused", lambda: sorted(tp for tp in tps if tp in consumer._paused_partitions))
        fact(
            "inactive",
            lambda: sorted(tp for tp in tps if tp not in (consumer._active_partitions or ())),
        )
        # As the fetch loop filters by them (floors included), not the stored values.
        fact("read_offsets", lambda: {tp: consumer._read_offset[tp] for tp in tps})
        # Faust's commit bookkeeping: a commit stuck while the read offset moved on is
        # an ack that never came (a hole at the head of the acked offsets) or a stale
        # committed offset.
        fact("faust_committed", lambda: {tp: consumer._committed_offset.get(tp) for tp in tps})

        def acked() -> dict[TP, object]:
            spans = {tp: sorted(consumer._acked.get(tp) or ()) for tp in tps}
            return {tp: (len(a), a[0], a[-1]) if a else () for tp, a in spans.items()}

        fact("faust_acked (n, first, last)", acked)

        def positions() -> dict[TP, object]:
            assignment = consumer._thread._ensure_consumer()._subscription.subscription.assignment
            states = {tp: assignment.state_value(tp) for tp in tps}
            return {
                tp: (state.position, state.paused) if state else None
                for tp, state in states.items()
            }

        fact("aiokafka (position, paused)", positions)
        return "; ".join(facts)
