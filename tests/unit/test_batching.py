"""BatchRun: inputs are acked only after their outputs, idle batches still flush,
records Faust hands over twice are handled once, and records it skips are read again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.runtime.batches import BatchRun, Handle, HoldRun, OnError, then
from pipeline.runtime.continuity import Continuity, OffsetSet
from pipeline.runtime.records import Out, RawRecord
from pipeline.runtime.sink import AckedSink
from pipeline.runtime.tables import WriteBehind
from pipeline.times import Clock
from tests.unit.helpers import FakeBroker


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes | None = b"v"
    timestamp: float = 1.0
    headers: tuple[tuple[str, bytes], ...] = ()


class FakeInbox:
    """The slice of the runtime's inbox a stage's run uses: batches(), empty(), ack()."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self.acked: list[int] = []

    async def batches(self) -> AsyncIterator[list[Message]]:
        while (message := await self.queue.get()) is not None:
            yield [message]

    def empty(self) -> bool:
        return self.queue.empty()

    def ack(self, message: Message) -> None:
        self.acked.append(message.offset)


def batch_run(
    handle: Handle,
    on_error: OnError,
    broker: FakeBroker,
    *,
    table: dict[bytes, Any] | None = None,
    linger_s: float = 0.02,
    continuity: Continuity | None = None,
    in_flight: int = 0,
    batch_max: int = 100,
) -> BatchRun:
    """A BatchRun writing through ``broker`` into ``table``."""
    return BatchRun(
        handle,
        on_error,
        AckedSink(broker.write),
        WriteBehind({} if table is None else table),
        clock=Clock(),
        batch_max=batch_max,
        linger_s=linger_s,
        in_flight=in_flight,
        continuity=continuity,
    )


def echo(raw: RawRecord, view: WriteBehind) -> list[Out]:
    view[str(raw.offset).encode()] = raw.offset
    return [Out("out", None, str(raw.offset).encode())]


def failing_error(raw: RawRecord, exc: Exception, now: int) -> Out:
    raise AssertionError("no record fails here")


async def test_acks_follow_delivery_and_duplicates_are_handled_once() -> None:
    inbox, broker = FakeInbox(), FakeBroker()
    table: dict[bytes, Any] = {}
    run = batch_run(echo, failing_error, broker, table=table)
    broker.answering.clear()  # Kafka does not answer yet
    for offset in (0, 1, 2, 1, 2):  # 1 and 2 again, as after Faust's late seek
        inbox.queue.put_nowait(Message("in", 0, offset))
    task = asyncio.ensure_future(run.run(inbox))
    await asyncio.sleep(0.1)
    assert inbox.acked == []  # nothing acked while outputs are unacknowledged
    assert table == {}  # nor written to the table
    broker.answering.set()
    await asyncio.sleep(0.1)
    assert broker.acked == [b"0", b"1", b"2"]
    assert sorted(inbox.acked) == [0, 1, 1, 2, 2]
    assert table == {b"0": 0, b"1": 1, b"2": 2}
    inbox.queue.put_nowait(None)
    await task


async def test_a_batch_is_written_within_the_linger_time() -> None:
    inbox, broker = FakeInbox(), FakeBroker()
    inbox.empty = lambda: False  # type: ignore[method-assign]  # never looks idle
    run = batch_run(echo, failing_error, broker, linger_s=0.05)
    task = asyncio.ensure_future(run.run(inbox))
    inbox.queue.put_nowait(Message("in", 3, 7))
    await asyncio.sleep(0.2)
    assert broker.acked == [b"7"]
    assert inbox.acked == [7]
    inbox.queue.put_nowait(None)
    await task


async def test_a_failing_record_becomes_an_output_and_the_stream_goes_on() -> None:
    def explode(raw: RawRecord, view: WriteBehind) -> list[Out]:
        if raw.offset == 0:
            raise ValueError("bad record")
        return echo(raw, view)

    def to_malformed(raw: RawRecord, exc: Exception, now: int) -> Out:
        return Out("malformed", None, f"{raw.offset}:{exc}".encode())

    inbox, broker = FakeInbox(), FakeBroker()
    run = batch_run(explode, to_malformed, broker)
    for offset in (0, 1):
        inbox.queue.put_nowait(Message("in", 0, offset))
    inbox.queue.put_nowait(None)
    await run.run(inbox)
    assert broker.acked == [b"0:bad record", b"1"]
    assert inbox.acked == [0, 1]


async def test_a_record_faust_skipped_is_handled_when_the_seek_brings_it_back() -> None:
    inbox, broker = FakeInbox(), FakeBroker()
    run = batch_run(echo, failing_error, broker)
    for offset in (0, 2, 0, 1, 2):  # 1 was dropped before the seek, then re-delivered
        inbox.queue.put_nowait(Message("in", 0, offset))
    inbox.queue.put_nowait(None)
    await run.run(inbox)
    assert sorted(v or b"" for v in broker.acked) == [b"0", b"1", b"2"]
    assert sorted(inbox.acked) == [0, 0, 1, 2, 2]


def test_offset_set_keeps_gaps() -> None:
    seen = OffsetSet()
    assert [seen.add(o) for o in (5, 6, 7, 9, 8, 6, 3, 4, 4, 10)] == [
        True,
        True,
        True,
        True,
        True,
        False,
        True,
        True,
        False,
        True,
    ]
    assert seen._spans == [[3, 10]]
    gaps = OffsetSet()
    for offset in (1, 3, 5):
        gaps.add(offset)
    assert gaps._spans == [[1, 1], [3, 3], [5, 5]]
    assert gaps.add(2)
    assert gaps._spans == [[1, 3], [5, 5]]


async def test_a_batchs_deliveries_overlap_and_are_written_together() -> None:
    """Awaitable outputs (a channel's deliveries) run side by side; the batch is written
    and acked once all are done, and a failing one becomes its own output."""
    in_flight: list[int] = []
    most = 0
    release = asyncio.Event()

    async def deliver(raw: RawRecord) -> list[Out]:
        nonlocal most
        in_flight.append(raw.offset)
        most = max(most, len(in_flight))
        await release.wait()
        in_flight.remove(raw.offset)
        if raw.offset == 2:
            raise RuntimeError("publisher bug")
        return [Out("out", None, str(raw.offset).encode())]

    def handle(raw: RawRecord, view: WriteBehind) -> Any:
        return deliver(raw)

    def to_malformed(raw: RawRecord, exc: Exception, now: int) -> Out:
        return Out("malformed", None, f"{raw.offset}:{exc}".encode())

    inbox, broker = FakeInbox(), FakeBroker()
    inbox.empty = lambda: False  # type: ignore[method-assign]  # a busy inbox
    run = batch_run(handle, to_malformed, broker, linger_s=0.2)
    task = asyncio.ensure_future(run.run(inbox))
    for offset in range(4):
        inbox.queue.put_nowait(Message("in", 0, offset))
    await asyncio.sleep(0.1)
    assert most == 4  # all four started before any finished
    assert inbox.acked == []
    release.set()
    await asyncio.sleep(0.3)
    assert sorted(v or b"" for v in broker.acked) == [b"0", b"1", b"2:publisher bug", b"3"]
    assert inbox.acked == [0, 1, 2, 3]
    inbox.queue.put_nowait(None)
    await task


async def test_records_the_stream_skipped_are_read_again_before_any_later_one_is_acked() -> None:
    """Faust hands over 0, 1, then (a rebalance later) 5: offsets 2..4 were skipped.
    The run seeks back to 2 and drops what comes before 2 does; nothing past the hole
    is acknowledged until the hole is filled. Compacted topics may have holes."""
    inbox, broker = FakeInbox(), FakeBroker()
    seeks: list[tuple[str, int, int]] = []

    async def seek(topic: str, partition: int, offset: int) -> None:
        seeks.append((topic, partition, offset))
        for again in range(offset, 8):  # what the consumer brings after the seek
            inbox.queue.put_nowait(Message("in", 0, again))

    async def start(topic: str, partition: int) -> int:
        return 0

    continuity = Continuity(lambda topic: topic != "compacted", start, seek)
    run = batch_run(echo, failing_error, broker, continuity=continuity)
    for offset in (0, 1, 5, 6):
        inbox.queue.put_nowait(Message("in", 0, offset))
    for offset in (0, 4, 9):
        inbox.queue.put_nowait(Message("compacted", 0, offset))
    task = asyncio.ensure_future(run.run(inbox))
    await asyncio.sleep(0.2)
    assert seeks == [("in", 0, 2)]  # once, not again for 6
    assert sorted(inbox.acked) == [0, 0, 1, 2, 3, 4, 4, 5, 6, 7, 9]
    assert [int(v or b"-1") for v in broker.acked] == [0, 1, 0, 4, 9, 2, 3, 4, 5, 6, 7]
    inbox.queue.put_nowait(None)
    await task


async def test_after_a_new_assignment_the_committed_offset_is_the_expectation() -> None:
    """A partition taken over starts at the group's committed offset: a first record
    beyond it is a hole; one handled in an older ownership is no expectation."""
    inbox, broker = FakeInbox(), FakeBroker()
    seeks: list[int] = []

    async def seek(topic: str, partition: int, offset: int) -> None:
        seeks.append(offset)

    async def start(topic: str, partition: int) -> int:
        return 10

    continuity = Continuity(lambda topic: True, start, seek)
    run = batch_run(echo, failing_error, broker, continuity=continuity)
    continuity.assigned([("in", 0)])
    inbox.queue.put_nowait(Message("in", 0, 12))
    task = asyncio.ensure_future(run.run(inbox))
    await asyncio.sleep(0.1)
    assert (seeks, inbox.acked) == ([10], [])
    inbox.queue.put_nowait(Message("in", 0, 10))
    await asyncio.sleep(0.1)
    assert inbox.acked == [10]
    continuity.assigned([("in", 0)])  # lost and won back; someone else got to 10 meanwhile
    inbox.queue.put_nowait(Message("in", 0, 10))
    await asyncio.sleep(0.1)
    assert (seeks, inbox.acked) == ([10], [10, 10])
    inbox.queue.put_nowait(None)
    await task


def test_faust_acks_of_records_no_run_handled_are_withheld() -> None:
    """A Faust inbox acks the records it skips (stale generation after a rebalance);
    let through, they would move the commit past records nobody handled. Withheld,
    they are noted per partition (the first one) to be read again, in a compacted
    topic too; topics no run reads (changelogs) pass untouched."""
    passed: list[int] = []

    def ack(message: Any) -> bool:
        passed.append(message.offset)
        return True

    async def seek(topic: str, partition: int, offset: int) -> None:
        return None

    async def start(topic: str, partition: int) -> int:
        return 0

    continuity = Continuity(
        lambda topic: topic != "compacted", start, seek, lambda topic: topic != "changelog"
    )
    guarded = continuity.guard(ack)
    continuity.allow("in", 0, 1)
    assert guarded(Message("in", 0, 0)) is False  # skipped by Faust, not handled
    assert guarded(Message("in", 0, 1)) is True  # handled by a run
    assert guarded(Message("in", 0, 1)) is False  # once per allowance
    assert guarded(Message("compacted", 0, 7)) is False
    assert guarded(Message("compacted", 0, 5)) is False
    assert guarded(Message("changelog", 0, 3)) is True
    for _ in range(2):  # a record handed over twice: both copies acked by the run
        continuity.allow("in", 0, 2)
    assert (guarded(Message("in", 0, 2)), guarded(Message("in", 0, 2))) == (True, True)
    assert passed == [1, 3, 2, 2]
    assert continuity.skipped == {("in", 0): 0, ("compacted", 0): 5}
    continuity.allow("compacted", 0, 5)  # Faust's own seek brought it again
    assert continuity.skipped == {("in", 0): 0}


async def test_skipped_records_are_read_again_on_partitions_still_owned() -> None:
    """The last records of a partition Faust skipped: no later record reveals the
    hole, so the skipped ones themselves are sought again (not on a partition that
    moved away, nor below the group's commit)."""
    seeks: list[tuple[str, int, int]] = []

    async def seek(topic: str, partition: int, offset: int) -> None:
        seeks.append((topic, partition, offset))

    async def start(topic: str, partition: int) -> int:
        return {0: 3, 1: 0, 2: 9}[partition]

    continuity = Continuity(lambda topic: False, start, seek)
    guarded = continuity.guard(lambda message: True)
    for partition, offset in ((0, 4), (0, 3), (1, 0), (2, 8), (3, 1)):
        assert guarded(Message("users", partition, offset)) is False
    await continuity.reread_skipped([("users", 0), ("users", 1), ("users", 2)])
    assert seeks == [("users", 0, 3), ("users", 1, 0)]  # 2: committed since; 3: not ours
    assert continuity.floors == {("users", 0): 3, ("users", 1): 0}
    assert continuity.skipped == {}


async def test_faust_does_not_fill_a_jump_in_a_stream_topic_as_acked() -> None:
    filled: list[tuple[str, int, int]] = []

    async def add_gap(tp: Any, offset_from: int, offset_to: int) -> None:
        filled.append((tp.topic, offset_from, offset_to))

    async def start(topic: str, partition: int) -> int:
        return 0

    async def seek(topic: str, partition: int, offset: int) -> None:
        return None

    continuity = Continuity(lambda topic: topic != "compacted", start, seek)
    guarded = continuity.guard_gaps(add_gap)
    await guarded(Message("in", 0, 0), 58, 65)  # records Faust lost: no fill
    await guarded(Message("compacted", 0, 0), 3, 9)  # compaction: fill as before
    assert filled == [("compacted", 3, 9)]


async def test_batches_in_flight_overlap_but_land_in_order_after_their_acks() -> None:
    """With two batches in flight, the third waits; a later batch acked first is not
    recorded before the earlier one, and reads see the unacknowledged writes."""
    seen: list[Any] = []

    def count(raw: RawRecord, view: WriteBehind) -> list[Out]:
        seen.append(view.get(b"n"))
        view[b"n"] = (view.get(b"n") or 0) + 1
        return [Out(f"t{raw.offset}", None, str(raw.offset).encode())]

    inbox, broker = FakeInbox(), FakeBroker()
    table: dict[bytes, Any] = {}
    run = batch_run(count, failing_error, broker, table=table, in_flight=2, batch_max=1)
    broker.answering.clear()
    for offset in range(4):
        inbox.queue.put_nowait(Message("in", 0, offset))
    task = asyncio.ensure_future(run.run(inbox))
    await asyncio.sleep(0.1)
    # Batches 0 and 1 are in flight, 2 is handled and waits for room: 3 is not.
    assert seen == [None, 1, 2]
    assert (inbox.acked, table) == ([], {})
    broker.answering.set()
    await asyncio.sleep(0.1)
    assert seen == [None, 1, 2, 3]
    assert inbox.acked == [0, 1, 2, 3]
    assert table == {b"n": 4}
    inbox.queue.put_nowait(None)
    await task


async def test_a_window_of_deliveries_moves_on_as_the_oldest_ends() -> None:
    """The email lanes' window (one route per connection): with batches of one and
    two in flight, three deliveries run at once, and the fourth starts as soon as the
    oldest ends, without waiting for the other two."""
    gates = {offset: asyncio.Event() for offset in range(5)}
    running: list[int] = []

    async def deliver(raw: RawRecord) -> list[Out]:
        running.append(raw.offset)
        await gates[raw.offset].wait()
        running.remove(raw.offset)
        return [Out("out", None, str(raw.offset).encode())]

    def handle(raw: RawRecord, view: WriteBehind) -> Any:
        return deliver(raw)

    inbox, broker = FakeInbox(), FakeBroker()
    run = batch_run(handle, failing_error, broker, in_flight=2, batch_max=1)
    for offset in range(5):
        inbox.queue.put_nowait(Message("in", 0, offset))
    task = asyncio.ensure_future(run.run(inbox))
    await asyncio.sleep(0.05)
    assert running == [0, 1, 2]
    gates[0].set()
    await asyncio.sleep(0.05)
    assert running == [1, 2, 3]
    assert inbox.acked == [0]
    for gate in gates.values():
        gate.set()
    await asyncio.sleep(0.05)
    assert inbox.acked == [0, 1, 2, 3, 4]
    inbox.queue.put_nowait(None)
    await task


def test_sealed_layers_reach_the_table_only_in_order() -> None:
    table: dict[bytes, Any] = {b"a": 0}
    view = WriteBehind(table)
    view[b"a"] = 1
    first = view.seal()
    del view[b"a"]
    second = view.seal()
    view[b"b"] = 2
    assert (view.get(b"a"), view[b"b"], sorted(view)) == (None, 2, [b"b"])
    with pytest.raises(KeyError):
        view[b"a"]  # deleted in a sealed layer: hides the table's entry
    view[b"c"] = 3
    del view[b"c"]
    assert (view.get(b"c", "none"), view.get(b"x", "none")) == ("none", "none")
    table[b"t"] = 9
    assert (view[b"t"], view.get(b"t")) == (9, 9)  # no layer has it: the table's
    del table[b"t"]
    with pytest.raises(RuntimeError, match="order"):
        view.commit(second)
    view.commit(first)
    assert table == {b"a": 1}
    view.commit()
    assert table == {b"b": 2}


async def test_deliveries_waiting_for_the_batch_to_close_are_started_by_on_flush() -> None:
    """A handle may return a future that only the batch's close starts (the push
    channel's publications): on_flush is called before the batch's deliveries are
    awaited, so they complete and the batch is written."""
    inbox, broker = FakeInbox(), FakeBroker()
    waiting: list[tuple[RawRecord, asyncio.Future[list[Out]]]] = []
    flushes: list[int] = []

    def deferred(raw: RawRecord, view: WriteBehind) -> asyncio.Future[list[Out]]:
        future: asyncio.Future[list[Out]] = asyncio.get_running_loop().create_future()
        waiting.append((raw, future))
        return future

    def on_flush() -> None:
        flushes.append(len(waiting))
        for raw, future in waiting:
            future.set_result([Out("out", None, str(raw.offset).encode())])
        waiting.clear()

    run = BatchRun(
        deferred,
        failing_error,
        AckedSink(broker.write),
        WriteBehind({}),
        clock=Clock(),
        batch_max=100,
        linger_s=0.02,
        on_flush=on_flush,
    )
    for offset in range(3):
        inbox.queue.put_nowait(Message("in", 0, offset))
    task = asyncio.ensure_future(run.run(inbox))
    await asyncio.sleep(0.1)
    assert flushes == [3]  # one close for the three records, which were all waiting
    assert broker.acked == [b"0", b"1", b"2"]
    assert inbox.acked == [0, 1, 2]
    inbox.queue.put_nowait(None)
    await task


async def test_then_chains_results_failures_and_cancellation_both_ways() -> None:
    loop = asyncio.get_running_loop()
    source: asyncio.Future[int] = loop.create_future()
    doubled = then(source, lambda n: n * 2)
    source.set_result(21)
    assert await doubled == 42

    source = loop.create_future()
    failing = then(source, lambda n: n)
    source.set_exception(RuntimeError("gone"))
    with pytest.raises(RuntimeError, match="gone"):
        await failing

    source = loop.create_future()
    broken = then(source, lambda n: 1 // n)
    source.set_result(0)
    with pytest.raises(ZeroDivisionError):
        await broken

    source = loop.create_future()
    then(source, lambda n: n).cancel()
    await asyncio.sleep(0)
    assert source.cancelled()  # cancelling the chained future cancels its source

    source = loop.create_future()
    chained = then(source, lambda n: n)
    source.cancel()
    await asyncio.sleep(0)
    assert chained.cancelled()


class FakeTierStream:
    """The slice of a Faust stream a delay tier's run uses: noack().events(), ack()."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.acked: list[int] = []

    def noack(self) -> FakeTierStream:
        return self

    async def events(self) -> AsyncIterator[Any]:
        for message in self.messages:
            yield type("Event", (), {"message": message})()

    async def ack(self, event: Any) -> None:
        self.acked.append(event.message.offset)


async def test_a_tier_run_says_while_it_holds_a_record() -> None:
    """While a delay tier's run holds a record, the floors of its topic wait for it
    (Continuity.seek_unreached_floors); once released, they count again."""
    broker, seen = FakeBroker(), []

    async def start(topic: str, partition: int) -> int:
        return 0

    async def seek(topic: str, partition: int, offset: int) -> None:
        raise AssertionError("nothing is sought here")

    continuity = Continuity(lambda topic: True, start, seek)

    async def release(raw: RawRecord) -> Out:
        seen.append((raw.offset, set(continuity.holding)))
        await asyncio.sleep(0.01)
        return Out("target", None, raw.value)

    stream = FakeTierStream([Message("tier", 0, 0), Message("tier", 0, 1)])
    await HoldRun(release, AckedSink(broker.write), continuity).run(stream)
    assert seen == [(0, {"tier"}), (1, {"tier"})]
    assert continuity.holding == set()
    assert (stream.acked, len(broker.acked)) == ([0, 1], 2)
