"""A seek back over a hole sticks although Faust's fetch loop keeps delivering the
batch it fetched before the seek (faust/transport/consumer.py, _drain_messages): the
cause of the two-worker stall of issue 13."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from faust.types import TP

from pipeline.runtime.continuity import REWIND_AGAIN_S, Continuity

T = "t.notification.intents"


def drain(read_offset: Any, batch: list[int], delivered: list[int]) -> None:
    """Faust's filter: drop what is below the read offset, else deliver and set it."""
    for offset in batch:
        seen = read_offset[TP(T, 0)]
        if seen is None or offset >= seen:
            delivered.append(offset)
            read_offset[TP(T, 0)] = offset


async def admitted_after_a_hole(floored: bool) -> list[int]:
    async def start(topic: str, partition: int) -> int:
        return 10

    async def seek(topic: str, partition: int, offset: int) -> None:
        read_offset[TP(topic, partition)] = offset  # what seek_wait does

    continuity = Continuity(lambda topic: True, start, seek)
    continuity.assigned([(T, 0)])
    read_offset: Any = defaultdict(lambda: None)
    if floored:
        read_offset = continuity.read_offsets(read_offset)
    tracker = continuity.tracker()
    admitted: list[int] = []
    delivered: list[int] = []
    drain(read_offset, [12, 13], delivered)  # 10 and 11 lost around a rebalance
    for offset in delivered:
        if await tracker.admits(T, 0, offset):
            admitted.append(offset)
    delivered.clear()
    drain(read_offset, [14, 15, 16], delivered)  # the rest of the batch fetched before
    drain(read_offset, list(range(10, 20)), delivered)  # fetched again from 10
    for offset in delivered:
        if await tracker.admits(T, 0, offset):
            admitted.append(offset)
    return admitted


async def test_without_the_floor_the_hole_read_again_is_dropped() -> None:
    assert 10 not in await admitted_after_a_hole(floored=False)


async def test_with_the_floor_the_hole_is_read_again_in_order() -> None:
    assert await admitted_after_a_hole(floored=True) == list(range(10, 20))


async def test_a_floor_ends_when_reached_or_at_a_new_assignment() -> None:
    async def start(topic: str, partition: int) -> int:
        return 0

    async def seek(topic: str, partition: int, offset: int) -> None:
        return None

    continuity = Continuity(lambda topic: True, start, seek)
    offsets = continuity.read_offsets({TP(T, 0): 50})
    assert continuity.read_offsets(offsets) is offsets  # installed once
    await continuity.rewind(T, 0, 7)
    assert offsets[TP(T, 0)] == 7
    continuity.reached(T, 0, 7)
    assert offsets[TP(T, 0)] == 50
    await continuity.rewind(T, 0, 7)
    continuity.assigned([(T, 0)])
    assert (offsets[TP(T, 0)], offsets[TP(T, 1)]) == (50, None)


async def test_a_compacted_partition_whose_first_record_is_late_is_read_once_more() -> None:
    """The users topic has holes of its own (compaction), so only the start of an
    ownership is checked: records Faust dropped there are read again, in order."""
    sought: list[int] = []

    async def start(topic: str, partition: int) -> int:
        return 0

    async def seek(topic: str, partition: int, offset: int) -> None:
        sought.append(offset)

    continuity = Continuity(lambda topic: False, start, seek)
    continuity.assigned([(T, 0)])
    tracker = continuity.tracker()
    first = [await tracker.admits(T, 0, offset) for offset in (1, 2, 4)]
    again = [await tracker.admits(T, 0, offset) for offset in (0, 1, 2, 4, 9)]
    assert (first, again, sought) == ([False] * 3, [True] * 5, [0])

    continuity.assigned([(T, 0)])  # a new ownership, starting where it should
    settled = Continuity(lambda topic: False, start, seek).tracker()
    assert [await settled.admits(T, 0, offset) for offset in (0, 3, 7)] == [True] * 3
    assert sought == [0]


async def test_an_assignment_floors_each_partition_at_where_its_ownership_starts() -> None:
    """After a rebalance Faust seeks a kept partition back to its commit, but its read
    offset still says 50 (what the stream skipped as of the old generation): without
    the floor, the fetch loop drops 40..49 and a partition with nothing after them
    stalls. With it they get through until a run admits the first."""
    delivered: list[int] = []

    async def start(topic: str, partition: int) -> int:
        return 40

    async def seek(topic: str, partition: int, offset: int) -> None:
        return None

    continuity = Continuity(lambda topic: True, start, seek)
    read_offset = continuity.read_offsets(defaultdict(lambda: None, {TP(T, 0): 50}))
    continuity.assigned([(T, 0), ("changelog", 0)])
    continuity.floor_starts({(T, 0): 40})
    drain(read_offset, list(range(40, 50)), delivered)
    assert delivered == list(range(40, 50))
    tracker = continuity.tracker()
    assert [await tracker.admits(T, 0, offset) for offset in (40, 41)] == [True, True]
    assert continuity.floors == {}


async def test_a_floor_not_reached_is_sought_again_while_records_wait() -> None:
    """A seek made while the group settles can be lost: the records read again never
    reach a run, and nothing after them reveals it. After 3 s without a run reaching
    the floor, the partition is sought there once more (not when it has nothing to
    read from there, nor when it is no longer owned)."""
    seeks: list[tuple[int, int]] = []

    async def start(topic: str, partition: int) -> int:
        return 0

    async def seek(topic: str, partition: int, offset: int) -> None:
        seeks.append((partition, offset))

    async def ends(tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        return {(T, 0): 51, (T, 1): 9, (T, 2): 99}

    async def tier_ends(tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        return {("tier", 0): 1}

    continuity = Continuity(lambda topic: True, start, seek)
    await continuity.rewind(T, 0, 14)
    continuity.floor_starts({(T, 1): 9, (T, 2): 30})
    await continuity.seek_unreached_floors([(T, 0), (T, 1)], ends)
    assert seeks == [(0, 14)]  # not due yet
    for tp in continuity._floored_at:
        continuity._floored_at[tp] -= REWIND_AGAIN_S
    await continuity.seek_unreached_floors([(T, 0), (T, 1)], ends)
    assert seeks == [(0, 14), (0, 14)]  # 1: nothing beyond 9; 2: not ours
    continuity.reached(T, 0, 14)
    assert (T, 0) not in continuity.floors
    # A delay tier's run holding a record (by design) cannot get to a floor meanwhile:
    # the time it had counts from the hold's end, and then the floor is sought too (the
    # watchdog does not watch tiers, so a lost seek there held its records for good).
    continuity.holding.add("tier")
    continuity.floor_starts({("tier", 0): 0})
    continuity._floored_at[("tier", 0)] -= 60
    await continuity.seek_unreached_floors([("tier", 0)], tier_ends)
    assert seeks == [(0, 14), (0, 14)]
    continuity.holding.discard("tier")
    await continuity.seek_unreached_floors([("tier", 0)], tier_ends)
    assert seeks == [(0, 14), (0, 14)]  # free for less than 3 s
    continuity._floored_at[("tier", 0)] -= REWIND_AGAIN_S
    await continuity.seek_unreached_floors([("tier", 0)], tier_ends)
    assert seeks == [(0, 14), (0, 14), (0, 0)]
