"""Guards against records a Faust stream skips: they are read again, never committed past.

faust-streaming can drop records of a partition around a rebalance and still let its
commit pass them (see :class:`Continuity`); these guards, and :class:`OffsetSet` (the
offsets a run handled, so that a record handed over twice is handled once), keep
every record of Herald's stream topics handled exactly once per run before its offset
is committed.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)


class OffsetSet:
    """The offsets of one partition an agent has handled, as merged intervals.

    Offsets arrive mostly in order, so this stays a handful of intervals; a gap stays
    a gap, so a record that was skipped once (faust can drop one in-process around a
    rebalance and hand it over again after its seek) is still handled when it comes.
    """

    __slots__ = ("_spans",)

    def __init__(self) -> None:
        self._spans: list[list[int]] = []  # sorted, disjoint, non-adjacent [first, last]

    def add(self, offset: int) -> bool:
        """Record ``offset``; False if it was already there."""
        spans = self._spans
        if spans and spans[-1][1] + 1 == offset:  # the common case: the next offset
            spans[-1][1] = offset
            return True
        index = bisect.bisect_right(spans, [offset, float("inf")])
        if index and spans[index - 1][1] >= offset:
            return False
        joins_left = bool(index) and spans[index - 1][1] + 1 == offset
        joins_right = index < len(spans) and spans[index][0] - 1 == offset
        if joins_left and joins_right:
            spans[index - 1][1] = spans[index][1]
            del spans[index]
        elif joins_left:
            spans[index - 1][1] = offset
        elif joins_right:
            spans[index][0] = offset
        else:
            spans.insert(index, [offset, offset])
        return True


#: A partition sought back over a hole whose records past the hole keep coming this
#: long after is sought again.
REWIND_AGAIN_S = 3.0


class FlooredReadOffsets(dict[Any, Any]):
    """Faust's ``Consumer._read_offset`` with a floor per partition sought back.

    Faust's fetch loop drops every record below a partition's read offset and, for
    each record it hands on, sets that offset to the record's, also for the rest of a
    batch it fetched before a seek: a seek back is undone within milliseconds and the
    re-fetched records are dropped (its dev-level "DROPPED MESSAGE ROFF"), so the hole
    is sought again and again while records keep coming (the two-worker stall of
    issue 13). While a partition has a floor (the first offset of a hole), its read
    offset reads as at most the floor, so the records from the floor on get through,
    whatever the loop wrote meanwhile.
    """

    def __init__(self, floors: dict[tuple[str, int], int], *args: Any) -> None:
        super().__init__(*args)
        self._floors = floors

    def __getitem__(self, key: Any) -> int | None:  # Faust's was defaultdict(lambda: None)
        value = dict.get(self, key)
        floor = self._floors.get(key)  # Faust's TP is a (topic, partition) named tuple
        if floor is None or value is None:
            return None if value is None else int(value)
        return min(int(value), floor)


class Continuity:
    """Catches records a stream skipped, and has them read again.

    faust-streaming can drop records of a partition around a rebalance (seen after a
    worker was killed: a survivor's stream jumped from offset 55 to 65 of a partition
    it had just taken over), acks records it skips, and commits the highest run of
    acknowledged offsets without checking where that run starts: the records were
    lost. Three guards, for the topics Herald's runs read:

    - :meth:`guard` wraps the consumer's ack: only acks of records a run handled
      (:meth:`allow`) count, so the commit cannot pass a record nobody handled, and
      each record Faust skipped that way is noted and, once the stream flows again,
      read again (:meth:`reread_skipped`): also the last records of a partition, which
      no later record would reveal (unguarded, a users partition whose profiles all
      came in one batch Faust skipped could be committed past, its users lost);
    - :meth:`guard_gaps` stops Faust from filling a jump in the offsets it read as if
      acked, in stream topics (not compacted, no transactions, so no holes of their
      own);
    - each run's :class:`SequenceTracker` expects every partition's next offset; past
      a hole it drops (does not handle, does not acknowledge) that partition's records
      until the consumer, sought back, brings the first missing one.
    """

    def __init__(
        self,
        gapless: Callable[[str], bool],
        start: Callable[[str, int], Awaitable[int]],
        seek: Callable[[str, int, int], Awaitable[None]],
        guarded: Callable[[str], bool] = lambda topic: True,
    ) -> None:
        self._gapless = gapless
        self._start = start
        self._seek = seek
        self._guarded = guarded
        #: Acks a run gave (a record handed over twice is acked twice).
        self._allowed: Counter[tuple[str, int, int]] = Counter()
        #: Per partition, the first record Faust acked without a run (skipped): read
        #: again by :meth:`reread_skipped`.
        self.skipped: dict[tuple[str, int], int] = {}
        #: Partitions sought back over a hole: the hole's first offset, until a run
        #: admits it (see :class:`FlooredReadOffsets`).
        self.floors: dict[tuple[str, int], int] = {}
        #: When each floor was set, and how often it was sought again since
        #: (see :meth:`seek_unreached_floors`).
        self._floored_at: dict[tuple[str, int], float] = {}
        self._reseeks: dict[tuple[str, int], int] = {}
        #: Delay tier topics whose run holds a record now (for its delay, by design):
        #: their floors wait, as their runs cannot get there meanwhile.
        self.holding: set[str] = set()
        #: Bumped per partition at each assignment: an expectation from an older
        #: ownership does not hold (someone else may have moved the partition on).
        self.epochs: dict[tuple[str, int], int] = {}

    def assigned(self, partitions: Iterable[tuple[str, int]]) -> None:
        """A new assignment: expectations and floors of the last one no longer hold.
        Call it in the rebalance, before anything else can await."""
        for tp in partitions:
            self.epochs[tp] = self.epochs.get(tp, 0) + 1
            self.floors.pop(tp, None)
            self._floored_at.pop(tp, None)
            self._reseeks.pop(tp, None)

    def floor_starts(self, starts: Mapping[tuple[str, int], int]) -> None:
        """Floor each partition of a new assignment at where its ownership starts (the
        group's commit) until a run admits that far. Faust seeks there, but its fetch
        loop drops what it reads below the read offset it had reached before (records
        its stream then skipped as of a stale generation), so without the floor those
        came again only once a later record revealed the hole, or never when they were
        the partition's last (a stall)."""
        now = time.monotonic()
        for tp, start in starts.items():
            if tp not in self.floors:  # a run's rewind got there first
                self.floors[tp] = start
                self._floored_at[tp] = now

    def read_offsets(self, faust_read_offsets: Any) -> FlooredReadOffsets:
        """The consumer's ``_read_offset`` to install (see :class:`FlooredReadOffsets`)."""
        if isinstance(faust_read_offsets, FlooredReadOffsets):
            return faust_read_offsets
        return FlooredReadOffsets(self.floors, faust_read_offsets)

    def gapless(self, topic: str) -> bool:
        return self._gapless(topic)

    def guards(self, topic: str) -> bool:
        """Whether ``topic`` is one the runs read (its acks guarded, its floors kept)."""
        return self._guarded(topic)

    async def start(self, topic: str, partition: int) -> int:
        """Where this ownership of the partition starts: the group's committed offset,
        or the partition's first offset when the group never committed one."""
        return await self._start(topic, partition)

    async def rewind(self, topic: str, partition: int, offset: int) -> None:
        """Read ``topic[partition]`` again from ``offset``."""
        # The floor first: Faust's fetch loop must not drop the records read again.
        self.floors[(topic, partition)] = offset
        self._floored_at[(topic, partition)] = time.monotonic()
        await self._seek(topic, partition, offset)

    def reached(self, topic: str, partition: int, offset: int) -> None:
        """A run admitted ``offset``: a floor at or below it has done its work."""
        floor = self.floors.get((topic, partition))
        if floor is not None and offset >= floor:
            del self.floors[(topic, partition)]
            self._floored_at.pop((topic, partition), None)
            self._reseeks.pop((topic, partition), None)

    def allow(self, topic: str, partition: int, offset: int) -> None:
        """The next ack of this record is a run's own (see :meth:`guard`)."""
        if self._guarded(topic):
            self._allowed[(topic, partition, offset)] += 1
            if self.skipped.get((topic, partition)) == offset:
                del self.skipped[(topic, partition)]  # read again already (Faust's seek)

    def guard(self, ack: Callable[[Any], bool]) -> Callable[[Any], bool]:
        """``ack`` (the Faust consumer's) letting through only the acks of records a
        run handled. A Faust stream acks the records it skips (a stale generation
        after a rebalance, flow control off), which would let the commit pass them;
        those are noted instead, to be read again."""

        def guarded(message: Any) -> bool:
            key = (message.topic, message.partition, message.offset)
            if not self._guarded(message.topic):
                return ack(message)
            allowed = self._allowed
            if not allowed[key]:
                del allowed[key]
                tp = (message.topic, message.partition)
                self.skipped[tp] = min(self.skipped.get(tp, message.offset), message.offset)
                log.debug("ack of unhandled %s[%d]@%d withheld", *key)
                return False
            allowed[key] -= 1
            if not allowed[key]:
                del allowed[key]
            return ack(message)

        return guarded

    async def seek_unreached_floors(
        self,
        owned: Iterable[tuple[str, int]],
        ends: Callable[[list[tuple[str, int]]], Awaitable[dict[tuple[str, int], int]]],
    ) -> None:
        """Seek again to each floor no run has reached for REWIND_AGAIN_S although its
        partition has records from there (``ends``: the partitions' end offsets). A
        seek can be lost (one made while the group settles: the records read again
        were dropped before any run saw them, and nothing after them revealed it: a
        kill test stalled 20 s on one partition until the watchdog). Delay tiers too,
        counting only the time their run holds no record: the watchdog does not watch
        them (they commit nothing while they hold one), so a tier partition whose seek
        was lost held its records for good (a recipient waiting for its user was never
        routed after a worker was killed)."""
        owned = set(owned)
        now = time.monotonic()
        for tp in self._floored_at:
            if tp[0] in self.holding:
                self._floored_at[tp] = now  # the time a run had counts from the hold's end
        due = [
            tp
            for tp, since in self._floored_at.items()
            if tp in owned
            # Backing off: a busy run (a slow SMTP lane) may simply not have got there.
            and now - since >= min(REWIND_AGAIN_S * 2 ** self._reseeks.get(tp, 0), 60.0)
        ]
        if not due:
            return
        end = await ends(due)
        for tp in due:
            floor = self.floors.get(tp)
            if floor is None:
                continue  # reached meanwhile
            if end.get(tp, 0) <= floor:
                self._floored_at[tp] = time.monotonic()  # nothing to read yet
                continue
            log.warning(
                "%s[%d]: offset %d still not read again; seeking there once more", *tp, floor
            )
            self._reseeks[tp] = self._reseeks.get(tp, 0) + 1
            try:
                await self.rewind(*tp, floor)
            except Exception:  # no longer ours (rebalance): its new owner reads it
                log.warning("could not seek %s[%d] back", *tp, exc_info=True)

    async def reread_skipped(self, owned: Iterable[tuple[str, int]]) -> None:
        """Read again, from the first one, the records Faust skipped on partitions
        still ``owned`` (call it while the stream flows: after a rebalance, not in
        one). A partition no longer owned is its new owner's: the group's commit
        never passed the skipped records, so it reads them."""
        skipped, self.skipped = self.skipped, {}
        owned = set(owned)
        for (topic, partition), offset in skipped.items():
            if (topic, partition) not in owned:
                continue
            if offset < await self._start(topic, partition):
                continue  # committed since (by an owner in between): handled
            log.warning(
                "%s[%d]: the stream skipped records from offset %d; reading them again",
                topic,
                partition,
                offset,
            )
            try:
                await self.rewind(topic, partition, offset)
            except Exception:  # no longer ours (rebalance): its new owner reads it
                log.warning("could not seek %s[%d] back", topic, partition, exc_info=True)

    def guard_gaps(
        self, add_gap: Callable[[Any, int, int], Awaitable[None]]
    ) -> Callable[[Any, int, int], Awaitable[None]]:
        """``add_gap`` (the Faust consumer's) ignoring gaps in Herald's stream topics.
        Faust fills a jump in the offsets it reads (meant for compacted topics) as if
        those records had been acked; in a stream topic the jump is records it lost."""

        async def guarded(tp: Any, offset_from: int, offset_to: int) -> None:
            if self._gapless(tp.topic):
                log.debug(
                    "gap %s[%d] %d..%d not filled", tp.topic, tp.partition, offset_from, offset_to
                )
                return
            await add_gap(tp, offset_from, offset_to)

        return guarded

    def tracker(self) -> SequenceTracker:
        """Hole detection for one agent run."""
        return SequenceTracker(self)


class SequenceTracker:
    """One run's expectation of each partition's next offset (see :class:`Continuity`)."""

    def __init__(self, continuity: Continuity) -> None:
        self._continuity = continuity
        #: Per partition: (assignment epoch, next offset the stream should bring).
        self._next: dict[tuple[str, int], tuple[int, int]] = {}
        #: Partitions sought back over a hole, still waiting for its first record:
        #: when they were sought.
        self._rewinding: dict[tuple[str, int], float] = {}
        #: Compacted partitions: (assignment epoch, the offset that made the run read
        #: the partition again from its start, or None once it reads on).
        self._compacted: dict[tuple[str, int], tuple[int, int | None]] = {}

    async def admits(self, topic: str, partition: int, offset: int) -> bool:
        """False for a record beyond a hole the stream left: the run drops it
        (unhandled, unacknowledged); the consumer, sought back, brings it again."""
        continuity = self._continuity
        if not continuity.gapless(topic):
            return await self._admits_compacted(topic, partition, offset)
        tp = (topic, partition)
        epoch = continuity.epochs.get(tp, 0)
        known = self._next.get(tp)
        expected = known[1] if known and known[0] == epoch else await continuity.start(*tp)
        if offset > expected:
            sought = self._rewinding.get(tp)
            # Records past the hole still coming a while after the seek: a rebalance
            # undid it (Faust seeks on its own then); seek again.
            if sought is None or time.monotonic() - sought > REWIND_AGAIN_S:
                self._rewinding[tp] = time.monotonic()
                log.warning(
                    "%s[%d]: the stream skipped offsets %d..%d; reading them again",
                    topic,
                    partition,
                    expected,
                    offset - 1,
                )
                try:
                    await continuity.rewind(topic, partition, expected)
                except Exception:  # no longer ours (rebalance): its new owner reads it
                    log.warning("could not seek %s[%d] back", topic, partition, exc_info=True)
                    self._rewinding.pop(tp, None)
            self._next[tp] = (epoch, expected)
            return False
        self._rewinding.pop(tp, None)
        continuity.reached(topic, partition, offset)
        self._next[tp] = (epoch, max(offset + 1, expected))
        return True

    async def _admits_compacted(self, topic: str, partition: int, offset: int) -> bool:
        """A compacted topic (the users) has holes of its own, so a jump proves nothing
        mid-stream. But the records Faust drops around an assignment (fetched before
        its seek) are at the start of an ownership: when its first record lies beyond
        where the ownership starts, the partition is read once more from there; the
        records past the first one are dropped until the re-read reaches them, so
        profiles are applied in order."""
        continuity = self._continuity
        tp = (topic, partition)
        epoch = continuity.epochs.get(tp, 0)
        state = self._compacted.get(tp)
        if state is not None and state[0] == epoch:
            trigger = state[1]
            if trigger is None:
                continuity.reached(topic, partition, offset)
                return True
            if offset > trigger:
                return False  # the rest of what was fetched before the seek
            self._compacted[tp] = (epoch, None)
            continuity.reached(topic, partition, offset)
            return True
        start = await continuity.start(topic, partition)
        if offset <= start:
            self._compacted[tp] = (epoch, None)
            continuity.reached(topic, partition, offset)
            return True
        log.warning(
            "%s[%d]: this ownership starts at %d but its first record is %d; reading "
            "the partition once more from %d",
            topic,
            partition,
            start,
            offset,
            start,
        )
        self._compacted[tp] = (epoch, offset)
        try:
            await continuity.rewind(topic, partition, start)
        except Exception:  # no longer ours (rebalance): its new owner reads it
            log.warning("could not seek %s[%d] back", topic, partition, exc_info=True)
            self._compacted[tp] = (epoch, None)
            return True
        return False
