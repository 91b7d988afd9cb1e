"""The stall watchdog's decision, on offsets it is handed."""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.runtime.watchdog import Cures, StallWatchdog
from pipeline.settings import Settings

Offsets = dict[tuple[str, int], int]


class ScriptedWatchdog(StallWatchdog):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(Settings(), timeout_s)
        self.committed: Offsets = {}
        self.ends: Offsets = {}
        self.broker_away = False

    def _offsets(self, tps: list[TopicPartition]) -> tuple[Offsets, Offsets]:
        if self.broker_away:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return dict(self.committed), dict(self.ends)


def test_lag_without_commits_for_the_timeout_is_a_stall() -> None:
    dog = ScriptedWatchdog(timeout_s=0.05)
    owned = [("t", 0)]
    dog.committed, dog.ends = {("t", 0): 5}, {("t", 0): 9}
    assert not dog.stalled(owned)  # first look: the clock starts
    time.sleep(0.1)
    assert dog.stalled(owned)
    dog.committed = {("t", 0): 6}  # progress resets it
    assert not dog.stalled(owned)


def test_no_lag_or_no_partitions_is_never_a_stall() -> None:
    dog = ScriptedWatchdog(timeout_s=0.0)
    dog.committed, dog.ends = {("t", 0): 9}, {("t", 0): 9}
    assert not dog.stalled([("t", 0)])
    assert not dog.stalled([("t", 0)])
    assert not dog.stalled([])


def test_one_stuck_partition_is_a_stall_while_others_move() -> None:
    dog = ScriptedWatchdog(timeout_s=0.05)
    owned = [("t", 0), ("t", 1)]
    dog.committed, dog.ends = {("t", 0): 5, ("t", 1): 0}, {("t", 0): 9, ("t", 1): 100}
    assert not dog.stalled(owned)
    time.sleep(0.1)
    dog.committed[("t", 1)] = 50  # partition 1 moves on, partition 0 does not
    assert dog.stalled(owned)


def test_a_reread_partition_is_judged_afresh() -> None:
    dog = ScriptedWatchdog(timeout_s=0.05)
    owned = [("t", 0)]
    dog.committed, dog.ends = {("t", 0): 5}, {("t", 0): 9}
    dog.stalled(owned)
    time.sleep(0.1)
    assert dog.stalled(owned) == {("t", 0): 5}
    dog.restart_clock(owned)
    assert dog.stalled(owned) == {}
    time.sleep(0.1)
    assert dog.stalled(owned) == {("t", 0): 5}


def test_a_broker_outage_is_not_a_stall() -> None:
    """Nothing is committed while the broker is away (the restart drill): once it is
    back, the worker gets the full timeout to move again, not an instant verdict."""
    dog = ScriptedWatchdog(timeout_s=0.05)
    owned = [("t", 0)]
    dog.committed, dog.ends = {("t", 0): 5}, {("t", 0): 9}
    dog.stalled(owned)
    dog.broker_away = True
    time.sleep(0.1)
    assert dog.stalled(owned) == {}
    dog.broker_away = False
    assert dog.stalled(owned) == {}


def test_a_partition_stuck_at_one_offset_is_reread_then_rejoined_then_exits() -> None:
    cures = Cures()
    assert cures.next({("t", 0): 5}) == {Cures.RESEEK: {("t", 0): 5}}
    assert cures.next({("t", 0): 5}) == {Cures.REJOIN: {("t", 0): 5}}
    assert cures.next({("t", 0): 5}) == {Cures.EXIT: {("t", 0): 5}}


def test_a_partition_that_moved_starts_the_cures_over() -> None:
    cures = Cures()
    cures.next({("t", 0): 5})
    cures.next({("t", 0): 5})
    # It moved on (the rejoin worked) and got stuck later, elsewhere: a re-read first.
    assert cures.next({("t", 0): 9}) == {Cures.RESEEK: {("t", 0): 9}}


def test_the_ladder_holds_across_the_verdicts_in_between() -> None:
    cures = Cures()
    cures.next({("t", 0): 5})
    # Each cure restarts the partition's clock: the next verdicts leave it out until
    # it has been stuck for the timeout again. That must not reset its ladder.
    assert cures.next({}) == {}
    assert cures.next({("t", 1): 3}) == {Cures.RESEEK: {("t", 1): 3}}
    assert cures.next({("t", 0): 5}) == {Cures.REJOIN: {("t", 0): 5}}


def test_each_partition_climbs_on_its_own() -> None:
    cures = Cures()
    cures.next({("t", 0): 5})
    assert cures.next({("t", 0): 5, ("t", 1): 2}) == {
        Cures.REJOIN: {("t", 0): 5},
        Cures.RESEEK: {("t", 1): 2},
    }
