"""The client gateway: push payloads published to its Kafka topic.

The gateway topic is the push channel's outside world, so it gets a producer of its
own (acks=all, idempotent): its failures are the channel's outcomes to classify, not
something to retry forever the way Herald's own writes are (pipeline.agents.base.
AckedSink), and it may live on another cluster (HERALD_GATEWAY_BOOTSTRAP_SERVERS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from pipeline.errors import (
    GatewayTimeoutError,
    GatewayUnavailableError,
    HeraldError,
    PushPayloadError,
)
from pipeline.settings import Settings
from pipeline.topology.partitioning import partition_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PublishReceipt:
    """Where the gateway topic stored one push."""

    partition: int
    offset: int


class GatewayPublisher:
    """Publishes push payloads to the gateway topic; raises classified errors."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.gateway_topic_name
        self._servers = settings.gateway_bootstrap_servers or settings.kafka_bootstrap_servers
        self._timeout_s = settings.gateway_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._reader_lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._servers,
                    client_id="herald-gateway",
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=2,
                    request_timeout_ms=int(self._timeout_s * 1000),
                )
                try:
                    await producer.start()
                except KafkaError as exc:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise GatewayUnavailableError(
                        f"cannot reach the gateway cluster {self._servers}: {exc!r}",
                        reason="gateway_unreachable",
                    ) from exc
                self._producer = producer
            return self._producer

    async def publish(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> PublishReceipt:
        """Publish one push and wait for the topic's acknowledgement."""
        producer = await self._started()
        try:
            metadata = await asyncio.wait_for(
                producer.send_and_wait(self.topic, value, key=key, headers=list(headers)),
                # aiokafka bounds each request by request_timeout_ms; this bounds the
                # whole call (metadata wait included) a little later.
                timeout=self._timeout_s + 1,
            )
        except (TimeoutError, KafkaTimeoutError) as exc:
            raise self._timeout(producer) from exc
        except (MessageSizeTooLargeError, RecordTooLargeError) as exc:
            raise PushPayloadError(
                f"the gateway topic refused a {len(value)}-byte push: {exc!r}",
                reason="payload_too_large",
            ) from exc
        except TopicAuthorizationFailedError as exc:
            raise GatewayUnavailableError(
                f"not authorised to write {self.topic}", reason="gateway_unauthorized"
            ) from exc
        except UnknownTopicOrPartitionError as exc:
            raise GatewayUnavailableError(
                f"topic {self.topic} does not exist", reason="gateway_topic_missing"
            ) from exc
        except KafkaError as exc:
            raise GatewayUnavailableError(
                f"publishing to {self.topic} failed: {exc!r}", reason="gateway_error"
            ) from exc
        return PublishReceipt(partition=metadata.partition, offset=metadata.offset)

    async def find(self, key: bytes, route_id: str, since_ms: int) -> PublishReceipt | None:
        """Where the push of ``route_id`` (keyed ``key``) was published at or after
        ``since_ms`` (broker timestamps), if it was: the check for a route whose
        previous owner died between publishing it and recording that it had."""
        producer = await self._started()
        try:
            partitions = await asyncio.wait_for(
                producer.partitions_for(self.topic), timeout=self._timeout_s
            )
            tp = TopicPartition(self.topic, partition_for(key, len(partitions)))
            async with self._reader_lock:
                reader = await self._reader_started()
                reader.assign([tp])
                found = (await reader.offsets_for_times({tp: since_ms}))[tp]
                end = (await reader.end_offsets([tp]))[tp]
                reader.seek(tp, found.offset if found is not None else end)
                while await reader.position(tp) < end:
                    batch = await reader.getmany(tp, timeout_ms=int(self._timeout_s * 1000))
                    for message in batch.get(tp, []):
                        ids = [value for name, value in message.headers if name == "route_id"]
                        if message.offset < end and route_id.encode() in ids:
                            return PublishReceipt(message.partition, message.offset)
                    if not batch:
                        raise GatewayTimeoutError(f"reading {tp} stalled before offset {end}")
        except (TimeoutError, KafkaError) as exc:
            raise GatewayUnavailableError(
                f"cannot check {self.topic} for route {route_id}: {exc!r}", reason="gateway_error"
            ) from exc
        return None

    async def _reader_started(self) -> AIOKafkaConsumer:
        if self._reader is None:
            reader = AIOKafkaConsumer(
                bootstrap_servers=self._servers,
                client_id="herald-gateway-check",
                group_id=None,
                enable_auto_commit=False,
                request_timeout_ms=int(self._timeout_s * 1000) + 1000,
            )
            await reader.start()
            self._reader = reader
        return self._reader

    def _timeout(self, producer: AIOKafkaProducer) -> HeraldError:
        # aiokafka reports a missing or forbidden topic as a metadata timeout; its
        # cluster view says which.
        cluster = producer.client.cluster
        if self.topic in cluster.unauthorized_topics:
            return GatewayUnavailableError(
                f"not authorised to write {self.topic}", reason="gateway_unauthorized"
            )
        if self.topic not in cluster.topics():
            return GatewayUnavailableError(
                f"topic {self.topic} does not exist (no metadata in {self._timeout_s}s)",
                reason="gateway_topic_missing",
            )
        return GatewayTimeoutError(f"no acknowledgement from {self.topic} in {self._timeout_s}s")

    async def close(self) -> None:
        """Flush and stop the producer (and the reader, if a check started it)."""
        async with self._reader_lock:
            if self._reader is not None:
                reader, self._reader = self._reader, None
                await reader.stop()
        async with self._lock:
            if self._producer is not None:
                producer, self._producer = self._producer, None
                await producer.stop()
