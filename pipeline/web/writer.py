"""The API's writes: records it must know are in Kafka before it answers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pipeline import logs, metrics, tracing
from pipeline.errors import BrokerUnavailableError
from pipeline.runtime.producer import KafkaWriter
from pipeline.runtime.records import Out
from pipeline.settings import Settings


class RequestWriter:
    """Writes records and waits for their acknowledgement (acks=all), within
    ``HERALD_API_KAFKA_TIMEOUT_S``. The worker's producer path (confluent-kafka):
    librdkafka's own threads batch and send, so the event loop that answers requests
    only enqueues (with aiokafka's Python client instead, a POST's P50 at 500/s was
    9.8 ms rather than 5.3; docs/http-intake.md)."""

    def __init__(self, settings: Settings) -> None:
        self._timeout_s = settings.api_kafka_timeout_s
        self._writer = KafkaWriter(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "client.id": f"{settings.app_id}-api",
                "enable.idempotence": True,
                # Requests from many callers share one produce request to the broker
                # per 2 ms: at 500/s, one request each cost the broker ~0.8 ms of CPU
                # per POST, ~0.5 ms with this (docs/http-intake.md).
                "linger.ms": 2,
                "message.timeout.ms": int(self._timeout_s * 1000),
                "logger": logs.librdkafka_logger("api"),
            }
        )

    async def deliver(self, records: Sequence[Out]) -> None:
        """Write ``records``; BrokerUnavailableError unless all are acknowledged in time.
        Traced, they carry the request's span context: the trace goes on in the workers."""
        records = tracing.stamp_current(records)
        try:
            async with asyncio.timeout(self._timeout_s):
                acks = await self._writer.write(records)
                await acks.done
        except TimeoutError:
            raise BrokerUnavailableError(
                f"Kafka did not acknowledge in {self._timeout_s}s"
            ) from None
        if failed := [error for error in acks.outcomes if error is not None]:
            raise BrokerUnavailableError(f"Kafka refused a write: {failed[0]}")
        metrics.count(r.note for r in records)

    async def close(self) -> None:
        """Flush what is queued and stop the producer."""
        await asyncio.to_thread(self._writer.close, self._timeout_s)
