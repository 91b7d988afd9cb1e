"""Writing records: every write is acknowledged by Kafka (acks=all) before the inputs
it depends on may be committed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from pipeline import metrics
from pipeline.runtime.records import Out

log = logging.getLogger(__name__)


class SendFn(Protocol):
    """Enqueue one record; the returned awaitable resolves when Kafka acknowledged it."""

    def __call__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> Awaitable[Awaitable[Any]]: ...


class AckedSink:
    """Writes records and returns only when every one is acknowledged (acks=all).

    A record Kafka refuses is sent again after a pause, for as long as it takes: the
    agent's input stays unacknowledged meanwhile, which is exactly what keeps the
    promise that nothing accepted is lost. Resending is safe because every id Herald
    writes is deterministic, so a repeat is absorbed downstream.
    """

    def __init__(
        self, send: SendFn, *, max_backoff_s: float = 5.0, ack_timeout_s: float = 30.0
    ) -> None:
        self._send = send
        self._max_backoff_s = max_backoff_s
        self._ack_timeout_s = ack_timeout_s
        #: True while a write keeps failing (for the readiness check still to come).
        self.stalled = False

    async def deliver(self, records: Sequence[Out]) -> None:
        """Write ``records``; return when all are acknowledged."""
        pending = list(records)
        backoff = 0.1
        while pending:
            futures = [
                asyncio.ensure_future(
                    await self._send(r.topic, r.key, r.value, r.partition, r.headers)
                )
                for r in pending
            ]
            _, waiting = await asyncio.wait(futures, timeout=self._ack_timeout_s)
            for future in waiting:
                # A send Kafka never answered (seen after a worker restart): give up on it
                # and send the record again rather than wait forever.
                future.cancel()
            results = [
                TimeoutError(f"no acknowledgement in {self._ack_timeout_s}s")
                if future in waiting
                else future.exception() or future.result()
                for future in futures
            ]
            failed = [
                (record, result)
                for record, result in zip(pending, results, strict=True)
                if isinstance(result, BaseException)
            ]
            if not failed:
                self.stalled = False
                metrics.count(r.note for r in records)
                return
            self.stalled = True
            record, error = failed[0]
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
