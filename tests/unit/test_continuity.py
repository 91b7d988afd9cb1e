"""A seek back over a hole sticks although Faust's fetch loop keeps delivering the
batch it fetched before the seek (faust/transport/consumer.py, _drain_messages): the
cause of the two-worker stall of issue 13."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from faust.types import TP

from pipeline.runtime.continuity import Continuity

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
