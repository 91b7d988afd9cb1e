"""The worker's one producer path: confluent-kafka (librdkafka), acknowledged in bulk.

librdkafka batches, sends and retries on its own threads; a poll thread of ours
serves the delivery reports, each noting its answer in the :class:`Acks` of the
records written with it, and only the last answer of a write wakes the event loop:
an acknowledged write costs the loop little more than its ``produce`` calls and one
wake-up, however many records it holds. Records
without an explicit partition go to the murmur2 partition of their key, as Java
clients and Faust do, which keeps Herald's copartitioned topics aligned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.errors import KafkaDeliveryError
from pipeline.runtime.records import Out

log = logging.getLogger(__name__)

#: How long the poll thread waits for delivery reports per call.
_POLL_S = 0.05
#: How long ``send`` yields when librdkafka's local queue is full.
_QUEUE_FULL_WAIT_S = 0.005


class Acks:
    """Kafka's answers for records written together, awaitable as a whole.

    ``outcomes[i]`` is None once record i is acknowledged, the error Kafka reported
    for it, or :data:`UNANSWERED` while no answer came; ``done`` resolves when every
    record has its answer. Answers may come from librdkafka's poll thread
    (:meth:`answer`); the loop is woken once, when the last one came.
    """

    __slots__ = ("_lock", "_loop", "_remaining", "_where", "done", "outcomes")

    def __init__(self, count: int) -> None:
        self.outcomes: list[BaseException | None] = [UNANSWERED] * count
        #: Per record: its (partition, offset), or the librdkafka Message to read them
        #: from (only the gateway asks, so the others never pay for it).
        self._where: list[tuple[int, int] | Message | None] = [None] * count
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._lock = threading.Lock()
        self._remaining = count
        if not count:
            self.done.set_result(None)

    @property
    def receipts(self) -> list[tuple[int, int] | None]:
        """(partition, offset) of each acknowledged record."""
        return [_receipt(where) for where in self._where]

    def report(
        self, index: int, error: BaseException | None, receipt: tuple[int, int] | None
    ) -> None:
        """Record the answer for record ``index`` (the first one counts); on the loop."""
        if self._count(index, error, receipt):
            self._resolve()

    def answer(self, index: int, error: BaseException | None, message: Message) -> None:
        """Record librdkafka's answer for record ``index``, from any thread."""
        if self._count(index, error, None if error else message):
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): none waits
                self._loop.call_soon_threadsafe(self._resolve)

    def _count(
        self, index: int, error: BaseException | None, where: tuple[int, int] | Message | None
    ) -> bool:
        """Note the answer; True when it was the last one missing."""
        with self._lock:
            if self.outcomes[index] is not UNANSWERED:
                return False
            self.outcomes[index] = error
            self._where[index] = where
            self._remaining -= 1
            return not self._remaining

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _receipt(where: tuple[int, int] | Message | None) -> tuple[int, int] | None:
    if where is None or isinstance(where, tuple):
        return where
    partition, offset = where.partition(), where.offset()
    return None if partition is None or offset is None else (partition, offset)


#: The outcome of a record Kafka has not answered (yet).
UNANSWERED: BaseException = TimeoutError("no acknowledgement from Kafka")


class KafkaWriter:
    """An asyncio face on one confluent-kafka Producer (acks=all)."""

    def __init__(
        self, config: dict[str, Any], producer: Callable[[dict[str, Any]], Producer] = Producer
    ) -> None:
        self._new_producer = producer
        self._config = {
            "acks": "all",
            "partitioner": "murmur2_random",  # Java's (and Faust's) key -> partition
            # No linger: a batch's records are produced in one go and librdkafka batches
            # what queues while a request is in flight; a lone write (a mail's registry
            # entry) is acknowledged in ~0.5 ms instead of ~3.
            "linger.ms": 0,
            **config,
        }
        self._producer: Producer | None = None
        #: Set when librdkafka reported a fatal error: that producer takes no more
        #: records, and the next write starts a new one.
        self._fatal: str | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def _started(self) -> Producer:
        if self._producer is None:
            self._producer = self._new_producer(self._config)
            self._thread = threading.Thread(target=self._poll, name="herald-producer", daemon=True)
            self._thread.start()
        elif self._fatal is not None:
            self._replace_producer()
        return self._producer

    def _replace_producer(self) -> None:
        """A new producer in place of one librdkafka declared failed (an idempotent
        producer's sequence error after a broker restart is fatal to it): the poll
        thread serves the new one from its next round. What the old one still held
        is purged, so that its writers learn of it and send it again."""
        old = self._producer
        log.error("the Kafka producer failed (%s); a new one takes over", self._fatal)
        self._fatal = None
        self._producer = self._new_producer(self._config)
        if old is not None:
            with contextlib.suppress(KafkaException, RuntimeError):
                old.purge()
                old.poll(0)  # serves the purged records' reports

    async def write(self, records: Sequence[Out]) -> Acks:
        """Enqueue ``records``; their :class:`Acks` resolve as Kafka answers (a refused
        record's outcome is a :class:`~pipeline.errors.KafkaDeliveryError`)."""
        produce = self._started().produce
        acks = Acks(len(records))
        answer = acks.answer
        delivery_error = self._delivery_error
        for index, record in enumerate(records):

            def delivered(error: KafkaError | None, message: Message, index: int = index) -> None:
                answer(index, None if error is None else delivery_error(error), message)

            partition = -1 if record.partition is None else record.partition  # -1: by key
            headers: list[tuple[str, str | bytes | None]] | None = (
                list(record.headers) if record.headers else None
            )
            while True:
                try:
                    produce(
                        record.topic,
                        record.value,
                        record.key,
                        partition,
                        on_delivery=delivered,
                        headers=headers,
                    )
                    break
                except BufferError:  # librdkafka's queue is full: let it drain
                    await asyncio.sleep(_QUEUE_FULL_WAIT_S)
                except KafkaException as exc:  # refused at once (e.g. over message.max.bytes)
                    acks.report(index, self._delivery_error(exc.args[0]), None)
                    break
        return acks

    async def partitions(self, topic: str, timeout_s: float) -> int | None:
        """How many partitions ``topic`` has, or None when the cluster has no such
        topic (a metadata request, off the event loop)."""
        producer = self._started()
        loop = asyncio.get_running_loop()
        metadata = await loop.run_in_executor(
            None, lambda: producer.list_topics(topic, timeout=timeout_s)
        )
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            return None
        return len(found.partitions)

    def _poll(self) -> None:
        """The poll thread: serve delivery reports (each answers its Acks)."""
        while not self._closed.is_set():
            producer = self._producer
            if producer is None:
                return
            try:
                producer.poll(_POLL_S)
            except Exception:  # a report's callback failed: the others still need serving
                log.exception("a delivery report could not be handled")

    def _delivery_error(self, error: KafkaError) -> KafkaDeliveryError:
        """Herald's error for a refused record; a fatal one also retires the producer
        (reported as ``_FATAL``: the record may or may not have been written)."""
        if error.fatal():
            self._fatal = error.str()
            return KafkaDeliveryError(error.str(), code=KafkaError._FATAL)
        return KafkaDeliveryError(error.str(), code=error.code())

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for queued records (blocking); how many remain."""
        if self._producer is None:
            return 0
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is queued, then stop the poll thread (blocking)."""
        remaining = self.flush(timeout_s)
        if remaining:
            log.warning("%d record(s) not acknowledged at close", remaining)
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
