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
import time
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
from pipeline.values import value_class

#: librdkafka's codes for a cluster that does not answer (as opposed to one that refuses).
_UNANSWERED_CODES = frozenset(
    {KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN}
)

log = logging.getLogger(__name__)


@value_class
class PublishReceipt:
    """Where the gateway topic stored one push."""

    partition: int
    offset: int


#: One push to publish: its key (user_id), FlatBuffers bytes and headers.
Push = tuple[bytes, bytes, Sequence[tuple[str, bytes]]]

#: A partition's scan is forgotten after this long without a question, or once it
#: holds this many routes: the next question reads from its own starting time.
_SCAN_IDLE_S = 30.0
_SCAN_MAX_ROUTES = 200_000


@dataclass(slots=True)
class _Question:
    """One in-doubt route to look for, and where its answer goes."""

    tp: TopicPartition
    route_id: bytes
    since_ms: int
    answer: asyncio.Future[PublishReceipt | None]


@dataclass(slots=True)
class _Scan:
    """One gateway partition as read for in-doubt routes: every route id published
    from the offset of ``since_ms`` up to ``end``, with its offset."""

    since_ms: int
    end: int
    routes: dict[bytes, int]
    used: float


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
        self._partitions: int | None = None
        self._scans: dict[TopicPartition, _Scan] = {}
        self._questions: list[_Question] = []
        self._answering: asyncio.Task[None] | None = None

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
        previous owner died between publishing it and recording that it had.

        A worker that takes over partitions under load may hold hundreds of such
        routes; checking each by reading its partition from its own time took half a
        second each, one after the other (the two-worker stall of issue 13). So the
        questions asked meanwhile are answered together, with one request for the
        partitions' ends, and each partition is read once and what was read is kept
        (:class:`_Scan`): a later round reads only what was published since. A route
        id seen earlier than its own ``since_ms`` was published all the same."""
        try:
            partitions = await self._partition_count()
        except KafkaException as exc:
            raise self._check_error(exc) from exc
        tp = TopicPartition(self.topic, partition_for(key, partitions))
        question = _Question(
            tp, route_id.encode(), since_ms, asyncio.get_running_loop().create_future()
        )
        self._questions.append(question)
        if self._answering is None or self._answering.done():
            self._answering = asyncio.ensure_future(self._answer())
        return await question.answer

    async def _answer(self) -> None:
        """Answer the questions asked, in rounds, until none waits."""
        async with self._reader_lock:
            while self._questions:
                questions, self._questions = self._questions, []
                try:
                    receipts = await self._round(questions)
                except Exception as exc:  # every question of the round gets the error
                    error = self._check_error(exc)
                    for question in questions:
                        if not question.answer.done():
                            question.answer.set_exception(error)
                    continue
                for question, receipt in zip(questions, receipts, strict=True):
                    if not question.answer.done():  # its asker may have been cancelled
                        question.answer.set_result(receipt)

    async def _round(self, questions: list[_Question]) -> list[PublishReceipt | None]:
        reader = await self._reader_started()
        earliest: dict[TopicPartition, int] = {}  # per partition, the earliest time asked
        for question in questions:
            earliest[question.tp] = min(
                question.since_ms, earliest.get(question.tp, question.since_ms)
            )
        if not earliest.keys() <= reader.assignment():
            reader.assign(sorted(earliest.keys() | reader.assignment()))
        ends = await reader.end_offsets(sorted(earliest))
        now = time.monotonic()
        for tp, since_ms in sorted(earliest.items()):
            scan = self._scans.get(tp)
            if (
                scan is None
                or since_ms < scan.since_ms
                or scan.end > ends[tp]  # the topic was recreated
                or now - scan.used > _SCAN_IDLE_S
                or len(scan.routes) > _SCAN_MAX_ROUTES
            ):
                found = (await reader.offsets_for_times({tp: since_ms}))[tp]
                scan = _Scan(since_ms, found.offset if found is not None else ends[tp], {}, now)
                self._scans[tp] = scan
            scan.used = now
            await self._read(reader, tp, scan, ends[tp])
        receipts: list[PublishReceipt | None] = []
        for question in questions:
            offset = self._scans[question.tp].routes.get(question.route_id)
            receipts.append(
                None if offset is None else PublishReceipt(question.tp.partition, offset)
            )
        return receipts

    def _check_error(self, exc: Exception) -> Exception:
        """Herald's error for a check that could not read the gateway topic (any other
        exception is a bug, passed on as it is)."""
        what = f"cannot check {self.topic} for in-doubt routes"
        if isinstance(exc, (TimeoutError, KafkaConnectionError, KafkaTimeoutError)):
            return GatewayTimeoutError(f"{what}: the broker does not answer ({exc!r})")
        code = exc.args[0].code() if isinstance(exc, KafkaException) and exc.args else None
        if code in _UNANSWERED_CODES:
            return GatewayTimeoutError(f"{what}: {exc!r}")
        if isinstance(exc, (KafkaException, AIOKafkaError)):
            return GatewayUnavailableError(f"{what}: {exc!r}", reason="gateway_error")
        return exc

    async def _partition_count(self) -> int:
        if self._partitions is None:
            partitions = await self._writer.partitions(self.topic, self._timeout_s)
            if partitions is None:
                raise GatewayUnavailableError(
                    f"topic {self.topic} does not exist", reason="gateway_topic_missing"
                )
            self._partitions = partitions
        return self._partitions

    async def _read(
        self, reader: AIOKafkaConsumer, tp: TopicPartition, scan: _Scan, end: int
    ) -> None:
        """Read ``tp`` from where ``scan`` ended to ``end`` at least, noting each route id."""
        if scan.end >= end:
            return
        reader.seek(tp, scan.end)
        while scan.end < end:
            batch = await reader.getmany(tp, timeout_ms=int(self._timeout_s * 1000))
            if not batch:
                raise GatewayTimeoutError(f"reading {tp} stalled before offset {end}")
            for message in batch.get(tp, []):  # those past ``end`` too: published as well
                for name, value in message.headers:
                    if name == "route_id":
                        scan.routes.setdefault(value, message.offset)
            scan.end = await reader.position(tp)

    async def _reader_started(self) -> AIOKafkaConsumer:
        if self._reader is None:
            reader = AIOKafkaConsumer(
                bootstrap_servers=self._servers,
                client_id="herald-gateway-check",
                group_id=None,
                enable_auto_commit=False,
                # It reads only up to offsets it knows exist: never wait for more.
                fetch_max_wait_ms=50,
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
