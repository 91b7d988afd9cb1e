"""The client gateway: push payloads published to its Kafka topic.

The gateway topic is the push channel's outside world, so it gets a producer of its
own (confluent-kafka like Herald's own writes, acks=all, idempotent): its failures are
the channel's outcomes to classify, not something to retry forever the way Herald's
own writes are (pipeline.runtime.sink.AckedSink), and it may live on another cluster
(HERALD_GATEWAY_BOOTSTRAP_SERVERS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from aiokafka.errors import KafkaError as AIOKafkaError
from confluent_kafka import KafkaError, KafkaException

from pipeline.errors import (
    GatewayProducerResetError,
    GatewayTimeoutError,
    GatewayUnavailableError,
    HeraldError,
    KafkaDeliveryError,
    PushPayloadError,
)
from pipeline.logs import librdkafka_logger
from pipeline.runtime.producer import UNANSWERED, KafkaWriter
from pipeline.runtime.records import Out
from pipeline.settings import Settings
from pipeline.topology.partitioning import partition_for

#: librdkafka's codes for a cluster that does not answer (as opposed to one that refuses).
_UNANSWERED_CODES = frozenset(
    {KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN}
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PublishReceipt:
    """Where the gateway topic stored one push."""

    partition: int
    offset: int


#: One push to publish: its key (user_id), FlatBuffers bytes and headers.
Push = tuple[bytes, bytes, Sequence[tuple[str, bytes]]]


class GatewayPublisher:
    """Publishes push payloads to the gateway topic; raises classified errors."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.gateway_topic_name
        self._servers = settings.gateway_bootstrap_servers or settings.kafka_bootstrap_servers
        self._timeout_s = settings.gateway_timeout_s
        self._writer = KafkaWriter(
            {
                "bootstrap.servers": self._servers,
                "client.id": "herald-gateway",
                "enable.idempotence": True,
                "message.timeout.ms": int(self._timeout_s * 1000),
                "logger": librdkafka_logger("gateway"),
            }
        )
        self._reader: AIOKafkaConsumer | None = None
        self._reader_lock = asyncio.Lock()

    async def publish(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> PublishReceipt:
        """Publish one push and wait for the topic's acknowledgement."""
        (result,) = await self.publish_many([(key, value, headers)])
        if isinstance(result, HeraldError):
            raise result
        return result

    async def publish_many(self, pushes: Sequence[Push]) -> list[PublishReceipt | HeraldError]:
        """Publish ``pushes`` together; per push, its receipt or its classified error."""
        acks = await self._writer.write(
            [Out(self.topic, key, value, headers=tuple(headers)) for key, value, headers in pushes]
        )
        # librdkafka gives up after message.timeout.ms; this bounds the whole call.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(acks.done), timeout=self._timeout_s + 1)
        results: list[PublishReceipt | HeraldError] = []
        timeout: HeraldError | None = None  # one metadata look-up for all of them
        for (_, value, _), error, receipt in zip(pushes, acks.outcomes, acks.receipts, strict=True):
            if error is UNANSWERED or (
                isinstance(error, KafkaDeliveryError) and error.code == KafkaError._MSG_TIMED_OUT
            ):
                timeout = timeout or await self._timeout()
                results.append(timeout)
            elif isinstance(error, KafkaDeliveryError):
                results.append(await self._classified(error, len(value)))
            elif error is not None or receipt is None or min(receipt) < 0:
                # an acknowledged record has both a partition and an offset
                results.append(
                    GatewayTimeoutError(f"{self.topic} acknowledged a push without its offset")
                )
            else:
                results.append(PublishReceipt(partition=receipt[0], offset=receipt[1]))
        return results

    async def _classified(self, exc: KafkaDeliveryError, size: int) -> HeraldError:
        code = exc.code
        if code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE):
            return PushPayloadError(
                f"the gateway topic refused a {size}-byte push: {exc}", reason="payload_too_large"
            )
        if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            return GatewayUnavailableError(
                f"not authorised to write {self.topic}", reason="gateway_unauthorized"
            )
        if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
            return GatewayUnavailableError(
                f"topic {self.topic} does not exist", reason="gateway_topic_missing"
            )
        if code == KafkaError._MSG_TIMED_OUT:
            return await self._timeout()
        if code == KafkaError._FATAL:  # the writer starts a new producer at its next write
            return GatewayProducerResetError(f"the gateway producer failed: {exc}")
        return GatewayUnavailableError(
            f"publishing to {self.topic} failed: {exc}", reason="gateway_error"
        )

    async def _timeout(self) -> HeraldError:
        # librdkafka reports a missing topic as a timed-out record; the cluster's
        # metadata says which it was.
        try:
            partitions = await self._writer.partitions(self.topic, self._timeout_s)
        except KafkaException:
            partitions = -1  # the cluster does not answer: a plain timeout
        if partitions is None:
            return GatewayUnavailableError(
                f"topic {self.topic} does not exist (no acknowledgement in {self._timeout_s}s)",
                reason="gateway_topic_missing",
            )
        return GatewayTimeoutError(f"no acknowledgement from {self.topic} in {self._timeout_s}s")

    async def find(self, key: bytes, route_id: str, since_ms: int) -> PublishReceipt | None:
        """Where the push of ``route_id`` (keyed ``key``) was published at or after
        ``since_ms`` (broker timestamps), if it was: the check for a route whose
        previous owner died between publishing it and recording that it had."""
        try:
            partitions = await self._writer.partitions(self.topic, self._timeout_s)
            if partitions is None:
                raise GatewayUnavailableError(
                    f"topic {self.topic} does not exist", reason="gateway_topic_missing"
                )
            tp = TopicPartition(self.topic, partition_for(key, partitions))
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
        except (TimeoutError, KafkaConnectionError, KafkaTimeoutError) as exc:
            raise GatewayTimeoutError(
                f"cannot check {self.topic} for route {route_id}: the broker does not answer "
                f"({exc!r})"
            ) from exc
        except KafkaException as exc:
            if exc.args and exc.args[0].code() in _UNANSWERED_CODES:
                raise GatewayTimeoutError(
                    f"cannot check {self.topic} for route {route_id}: {exc!r}"
                ) from exc
            raise GatewayUnavailableError(
                f"cannot check {self.topic} for route {route_id}: {exc!r}", reason="gateway_error"
            ) from exc
        except AIOKafkaError as exc:
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

    async def close(self) -> None:
        """Flush and stop the producer (and the reader, if a check started it)."""
        async with self._reader_lock:
            if self._reader is not None:
                reader, self._reader = self._reader, None
                await reader.stop()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._writer.close, self._timeout_s)
