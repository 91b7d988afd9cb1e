"""Writing records: every write is acknowledged by Kafka (acks=all) before the inputs
it depends on may be committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from pipeline import metrics
from pipeline.runtime.producer import UNANSWERED, Acks
from pipeline.runtime.records import Out

log = logging.getLogger(__name__)


#: Enqueues records; the returned Acks resolve as Kafka answers (KafkaWriter.write).
WriteFn = Callable[[Sequence[Out]], Awaitable[Acks]]


class AckedSink:
    """Writes records and returns only when every one is acknowledged (acks=all).

    A record Kafka refuses is sent again after a pause, for as long as it takes: the
    agent's input stays unacknowledged meanwhile, which is exactly what keeps the
    promise that nothing accepted is lost. Resending is safe because every id Herald
    writes is deterministic, so a repeat is absorbed downstream.

    A table's changelog never runs ahead of the outputs it stands for: records to
    ``state_topics`` are written once the others are acknowledged. A worker killed in
    the middle of a write can thus leave outputs without their table entries (the
    input is read again and its outputs written again, with the same ids), never table
    entries without their outputs (the input would be read again, found done in its
    table, and its outputs lost: an accepted intent never routed, a sent mail without
    its status event).
    """

    def __init__(
        self, write: WriteFn, *, max_backoff_s: float = 5.0, ack_timeout_s: float = 30.0
    ) -> None:
        self._write = write
        self._max_backoff_s = max_backoff_s
        self._ack_timeout_s = ack_timeout_s
        #: True while a write keeps failing (for the readiness check still to come).
        self.stalled = False
        #: The tables' changelog topics (the runtime adds each table's).
        self.state_topics: set[str] = set()

    async def deliver(self, records: Sequence[Out]) -> None:
        """Write ``records``; return when all are acknowledged (the tables' changelog
        records after the others)."""
        outputs: list[Out] = []
        changelog: list[Out] = []
        for record in records:
            (changelog if record.topic in self.state_topics else outputs).append(record)
        if outputs and changelog:
            await self._deliver(outputs)
            await self._deliver(changelog)
        else:
            await self._deliver(records)

    async def _deliver(self, records: Sequence[Out]) -> None:
        pending = list(records)
        backoff = 0.1
        while pending:
            acks = await self._write(pending)
            # A record Kafka never answers (seen after a worker restart) is given up on
            # and sent again rather than waited for forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(acks.done), self._ack_timeout_s)
            failed = [
                (record, outcome)
                for record, outcome in zip(pending, acks.outcomes, strict=True)
                if outcome is not None
            ]
            if not failed:
                self.stalled = False
                metrics.count(r.note for r in records)
                return
            self.stalled = True
            record, error = failed[0]
            if error is UNANSWERED:
                error = TimeoutError(f"no acknowledgement in {self._ack_timeout_s}s")
            log.warning(
                "Kafka refused %d record(s) (first: topic %s: %r); retrying in %.1fs",
                len(failed),
                record.topic,
                error,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
            pending = [record for record, _ in failed]
