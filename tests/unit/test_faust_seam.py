"""The Faust internals Herald's runtime relies on, pinned against the installed release."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import faust
import pytest
from faust.transport.consumer import Consumer
from faust.types import TP
from mode import Service
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from pipeline.errors import ConfigurationError, FaustSeamError
from pipeline.runtime.app import task_stacks
from pipeline.runtime.faust import (
    AIOKAFKA_VERSION,
    BEHIND_RECORDS,
    FAUST_VERSION,
    ConsumerSeam,
    FetchLoad,
    Inbox,
    PacedFetches,
    check_faust,
    drain_in_batches,
    table_entries,
)


def test_the_installed_faust_has_every_internal_the_runtime_uses() -> None:
    check_faust()


def test_a_renamed_internal_stops_the_worker_naming_the_faust_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(Consumer, "_add_gap")
    with pytest.raises(FaustSeamError, match=rf"faust-streaming {FAUST_VERSION}.*_add_gap"):
        check_faust()


def test_a_reshaped_internal_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    async def add_gap(self: Any, tp: Any, offsets: Any) -> None:
        return None

    monkeypatch.setattr(Consumer, "_add_gap", add_gap)
    with pytest.raises(FaustSeamError, match="_add_gap"):
        check_faust()


def test_a_reshaped_aiokafka_fetch_is_caught_naming_its_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiokafka.consumer.fetcher import Fetcher as KafkaFetcher

    async def fetch(self: Any, assignment: Any, node_id: int) -> bool:
        return False

    monkeypatch.setattr(KafkaFetcher, "_proc_fetch_request", fetch)
    with pytest.raises(FaustSeamError, match=rf"aiokafka {AIOKAFKA_VERSION}.*_proc_fetch_request"):
        check_faust()


def test_guarding_a_consumer_without_read_offsets_fails_loudly() -> None:
    class BareConsumer:
        def ack(self, message: Any) -> bool:
            return True

        async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
            return None

    class App:
        consumer = BareConsumer()

    seam = ConsumerSeam(App())  # type: ignore[arg-type]
    with pytest.raises(FaustSeamError, match="_read_offset"):
        seam.guard(lambda ack: ack, lambda add_gap: add_gap, lambda offsets: offsets)


def test_guard_wraps_ack_and_gap_once_per_consumer() -> None:
    class App:
        consumer: Any = None

    app = App()
    seam = ConsumerSeam(app)  # type: ignore[arg-type]
    app.consumer = faust.App("seam-test", broker="kafka://127.0.0.1:1").consumer
    wrapped: list[str] = []

    def wrap(name: str) -> Any:
        def wrapper(original: Any) -> Any:
            wrapped.append(name)
            return original

        return wrapper

    seam.guard(wrap("ack"), wrap("gap"), wrap("read"))
    seam.guard(wrap("ack"), wrap("gap"), wrap("read"))
    assert wrapped == ["ack", "gap", "read"]


def test_describe_reports_the_flow_and_never_fails_on_an_unstarted_consumer() -> None:
    app = faust.App("seam-describe", broker="kafka://127.0.0.1:1")
    report = ConsumerSeam(app).describe([("intents", 0)])
    assert "rebalancing=False" in report
    assert "recovered=False" in report
    assert "faust_committed={TP(topic='intents', partition=0): None}" in report
    assert "faust_acked (n, first, last)={TP(topic='intents', partition=0): ()}" in report
    # The aiokafka consumer does not exist before the worker starts: read as unknown.
    assert "aiokafka (position, paused)=unknown" in report


async def testtask_stacks_name_each_task_and_its_chain_of_awaits() -> None:
    async def inner() -> None:
        await asyncio.sleep(10)

    async def outer() -> None:
        await inner()

    task = asyncio.create_task(outer(), name="stuck")
    await asyncio.sleep(0)
    report = task_stacks()
    task.cancel()
    assert "stuck: outer (test_faust_seam.py:" in report
    assert "-> inner (test_faust_seam.py:" in report


class FetchLoop(Service):
    """What drain_in_batches reads of a Faust consumer, fed scripted batches."""

    def __init__(self, batches: list[list[int]], callback: Any, topic: str = "t") -> None:
        super().__init__()
        self.batches = batches
        self.topic = topic
        self.callback = callback
        self.diag = cast(
            Any, SimpleNamespace(set_flag=lambda flag: None, unset_flag=lambda flag: None)
        )
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True))
        self.transport = SimpleNamespace(app=SimpleNamespace(should_stop=False))
        self.consumer_stopped_errors = ()
        self.suspend_flow = asyncio.Event()
        self._commit_every = None
        self._n_acked = 0
        self._read_offset: dict[Any, int | None] = defaultdict(lambda: None)
        self.gaps: list[tuple[int, int]] = []

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        self.gaps.append((offset_from, offset_to))

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:  # noqa: ASYNC109
        self.suspend_flow.clear()  # Faust fetches again only once the rebalance is over
        if not self.batches:
            self._stopped.set()  # the worker stops: the loop ends
            return
        for offset in self.batches.pop(0):
            # Odd offsets are another topic's when the loop reads two (the inbox tests).
            topic = "other" if self.topic != "t" and offset % 2 else self.topic
            yield (topic, 0), SimpleNamespace(topic=topic, partition=0, offset=offset)


async def test_the_batched_fetch_loop_hands_over_what_faust_would() -> None:
    handed: list[int] = []
    load = FetchLoad()
    loads: list[int] = []

    async def callback(message: Any) -> None:
        handed.append(message.offset)
        loads.append(load.last)

    consumer = FetchLoop([[0, 1, 2], [1, 3, 7, 8]], callback)
    await drain_in_batches(consumer, Service(), load=load)
    # Offset 1 again is below the read offset once 2 was handed over: dropped.
    assert handed == [0, 1, 2, 3, 7, 8]
    # Each fetched batch's size, for fetch pacing: the first's while the second is
    # handed over, none after the last (empty) fetch.
    assert loads == [0, 0, 0, 3, 3, 3]
    assert load.last == 0
    assert consumer.gaps == [(4, 7)]  # the jump 3 -> 7, for Faust's gap bookkeeping
    assert consumer._read_offset[("t", 0)] == 8


async def test_a_rebalance_mid_batch_stops_that_batch_and_the_loop_goes_on() -> None:
    handed: list[int] = []
    consumer: FetchLoop

    async def callback(message: Any) -> None:
        if message.offset == 1:  # a rebalance starts while this record waits
            consumer.suspend_flow.set()
            await asyncio.sleep(10)
        handed.append(message.offset)

    consumer = FetchLoop([[0, 1, 2], [5]], callback)
    await asyncio.wait_for(drain_in_batches(consumer, Service()), timeout=5)
    assert handed == [0, 5]  # 1 was abandoned, 2 never handed over; the next batch came
    assert consumer._read_offset[("t", 0)] == 5


async def test_a_hand_over_cut_by_a_queue_clear_does_not_end_the_fetch_loop() -> None:
    # Faust clears its queues around a rebalance, cancelling a put that waits on a full
    # one; the error must not escape: Fetcher._fetcher would end quietly, and then no
    # partition, table changelogs included, is read again (the CI stall of stop 20).
    flow = FlowControlEvent(initially_suspended=False)
    queue: ThrowableQueue[int] = ThrowableQueue(maxsize=1, flow_control=flow)
    handed: list[int] = []

    async def callback(message: Any) -> None:
        if message.offset == 1:  # the queue is full: this put waits, then is cut
            asyncio.get_running_loop().call_later(0.01, queue.clear)
            await queue.put(message.offset)
        handed.append(message.offset)

    queue.put_nowait(-1)
    consumer = FetchLoop([[0, 1, 2], [5]], callback)
    await asyncio.wait_for(drain_in_batches(consumer, Service()), timeout=5)
    assert handed == [0, 5]  # 1 was cut, 2 dropped with it; the next batch came


async def test_a_stopped_fetch_loop_still_ends_on_its_cancellation() -> None:
    async def callback(message: Any) -> None:
        await asyncio.sleep(10)

    loop = asyncio.ensure_future(drain_in_batches(FetchLoop([[0]], callback), Service()))
    await asyncio.sleep(0.05)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop


def inbox_app(generation: int = 1) -> Any:
    """What an Inbox reads of a Faust app: flow control, the monitor, the consumer's ack
    (recording) and the consumer generation."""
    acked: list[int] = []
    return SimpleNamespace(
        flow_control=FlowControlEvent(initially_suspended=False),
        monitor=SimpleNamespace(stream_inbound_time={}),
        consumer=SimpleNamespace(ack=lambda message: acked.append(message.offset)),
        consumer_generation_id=generation,
        acked=acked,
    )


def message(offset: int, generation: int = 1) -> Any:
    return SimpleNamespace(
        topic="s", partition=0, tp=("s", 0), offset=offset, generation_id=generation
    )


async def taken(inbox: Inbox) -> list[list[int]]:
    return [[m.offset for m in messages] async for messages in inbox.batches()]


async def test_the_fetch_loop_hands_a_stages_records_to_its_inbox_a_fetched_batch_at_a_time() -> (
    None
):
    handed: list[int] = []

    async def callback(message: Any) -> None:
        handed.append(message.offset)

    app = inbox_app()
    inbox = Inbox(cast(Any, app))
    consumer = FetchLoop([[0, 1, 2, 4], [3, 6, 7]], callback, topic="s")
    await drain_in_batches(consumer, Service(), {"s": inbox})
    inbox.close()
    assert handed == [1, 3, 7]  # the other topic's records went to Faust's conductor
    assert [[m.offset for m in batch] for batch in inbox._lists] == [[0, 2, 4], [6]]
    assert consumer._read_offset[("s", 0)] == 6  # set as Faust's loop sets it


async def test_an_inbox_skips_records_of_an_earlier_generation_as_a_stream_does() -> None:
    app = inbox_app(generation=2)
    inbox = Inbox(cast(Any, app))
    waiting = asyncio.ensure_future(taken(inbox))  # the stage's run starts first ...
    await asyncio.sleep(0)
    guarded: list[int] = []
    app.consumer.ack = lambda message: guarded.append(message.offset)  # ... then the guard
    await inbox.put([message(0, generation=1), message(1, generation=2)])
    inbox.close()
    assert await waiting == [[1]]
    # Acked through the guarded consumer ack, which notes it to be read again.
    assert (guarded, app.acked) == ([0], [])
    assert ("s", 0) in app.monitor.stream_inbound_time  # Faust's idle-stream check reads it


async def test_an_inbox_is_cleared_when_flow_resumes_and_waits_when_full() -> None:
    app = inbox_app()
    inbox = Inbox(cast(Any, app), maxsize=2)
    await inbox.put([message(0), message(2)])  # a list goes in while fewer wait
    third = asyncio.ensure_future(inbox.put([message(1)]))
    await asyncio.sleep(0.01)
    assert not third.done()  # full: the fetch loop waits (raced against a rebalance)
    app.flow_control.suspend()
    app.flow_control.resume()  # the rebalance ended: what was fetched before is dropped
    await asyncio.wait_for(third, timeout=1)
    inbox.close()
    assert await taken(inbox) == [[1]]


async def test_a_closed_inbox_ends_once_what_waits_is_taken_and_opens_again() -> None:
    inbox = Inbox(cast(Any, inbox_app()))
    await inbox.put([message(0)])
    inbox.close()
    assert await taken(inbox) == [[0]]
    inbox.open()  # Faust restarted the stage's actor
    waiting = asyncio.ensure_future(taken(inbox))
    await inbox.put([message(1)])
    await asyncio.sleep(0.01)
    assert not waiting.done()
    inbox.close()
    assert await asyncio.wait_for(waiting, timeout=1) == [[1]]


def test_a_topic_has_one_inbox() -> None:
    app = inbox_app()
    app.conf = SimpleNamespace(stream_buffer_maxsize=4096)
    seam = ConsumerSeam(cast(Any, app))
    seam.inbox(["a", "b"])
    with pytest.raises(ConfigurationError, match="already has a stage"):
        seam.inbox(["b"])


def test_table_entries_are_the_dict_faust_recovery_fills() -> None:
    app = faust.App("seam-table", broker="kafka://127.0.0.1:1", store="memory://")
    table = app.Table("entries", default=None, partitions=1)
    entries = table_entries(table)
    recovered = SimpleNamespace(
        key=b"k", value=b"v", message=SimpleNamespace(value=b"v", partition=0)
    )
    cast(Any, table).data.apply_changelog_batch([recovered], lambda k: k, lambda v: v)
    assert entries == {b"k": b"v"}  # what recovery wrote, the stages read


def test_a_table_outside_a_memory_store_fails_loudly() -> None:
    with pytest.raises(FaustSeamError, match="memory store"):
        table_entries(SimpleNamespace(name="t", data={}))


async def test_fetches_to_a_broker_are_paced_and_the_first_goes_at_once() -> None:
    sent: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()

    async def fetch(assignment: Any, node_id: int, request: Any) -> bool:
        sent.append((node_id, loop.time()))
        return True

    paced = PacedFetches(fetch, 0.05)
    start = loop.time()
    assert await paced(None, 1, None)
    await paced(None, 2, None)  # another broker: not held back by the first
    await paced(None, 1, None)
    (first, t1), (second, t2), (third, t3) = sent
    assert (first, second, third) == (1, 2, 1)
    assert t1 - start < 0.02
    assert t2 - start < 0.02
    assert t3 - t1 >= 0.05


async def test_a_worker_that_is_behind_fetches_without_pacing() -> None:
    sent: list[float] = []
    loop = asyncio.get_running_loop()

    async def fetch(assignment: Any, node_id: int, request: Any) -> bool:
        sent.append(loop.time())
        return True

    load = FetchLoad()
    paced = PacedFetches(fetch, 10.0, load.behind)
    await paced(None, 1, None)
    load.last = BEHIND_RECORDS  # the last hand-over was a backlog's
    await asyncio.wait_for(paced(None, 1, None), timeout=1)
    assert len(sent) == 2


def test_a_committed_offset_behind_the_groups_commit_is_raised_so_faust_commits_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The previous owner's last commit landed after Faust read the commits: Faust took
    the first acked offset (the group's commit) for a hole after its own stale one and
    committed nothing (the rejoin test's stall). Raised to the group's commit, it
    commits the acked run; a newer offset of its own, or none, is left alone."""
    app = faust.App("seam-raise", broker="kafka://127.0.0.1:1")
    consumer: Any = app.consumer
    behind, ahead, unknown = TP("intents", 3), TP("intents", 4), TP("intents", 5)
    monkeypatch.setattr(consumer, "assignment", lambda: {behind, ahead, unknown})
    consumer._committed_offset[behind] = 8
    consumer._committed_offset[ahead] = 30
    consumer._acked[behind] = list(range(18, 55))
    consumer._acked_index[behind] = set(range(18, 55))
    assert consumer._new_offset(behind) is None  # Faust's own view: a hole at 9..17

    raised = ConsumerSeam(app).raise_committed(
        {("intents", 3): 18, ("intents", 4): 25, ("intents", 5): 7, ("intents", 9): 50}
    )
    assert raised == [(("intents", 3), 8, 18)]
    assert dict(consumer._committed_offset) == {behind: 18, ahead: 30}
    assert consumer._new_offset(behind) == 55
