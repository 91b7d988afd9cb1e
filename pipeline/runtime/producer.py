"""The worker's one producer path: confluent-kafka (librdkafka), acknowledged in bulk.

librdkafka batches, sends and retries on its own threads; a poll thread of ours
collects delivery reports and hands them to the event loop in bulk (one wake-up for
however many reports arrived), so an acknowledged write costs the event loop little
more than the ``produce`` call. Records written together share one future (their
:class:`Acks`), so a batch of any size costs the loop one wake-up to resume. Records
without an explicit partition go to the murmur2 partition of their key, as Java
clients and Faust do, which keeps Herald's copartitioned topics aligned.
"""

from __future__ import annotations

import asyncio
import collections
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
    record has its answer.
    """

    __slots__ = ("_remaining", "done", "outcomes", "receipts")

    def __init__(self, count: int) -> None:
        self.outcomes: list[BaseException | None] = [UNANSWERED] * count
        #: (partition, offset) of each acknowledged record.
        self.receipts: list[tuple[int, int] | None] = [None] * count
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._remaining = count
        if not count:
            self.done.set_result(None)

    def report(
        self, index: int, error: BaseException | None, receipt: tuple[int, int] | None
    ) -> None:
        """Record the answer for record ``index`` (the first one counts)."""
        if self.outcomes[index] is not UNANSWERED:
            return
        self.outcomes[index] = error
        self.receipts[index] = receipt
        self._remaining -= 1
        if not self._remaining and not self.done.done():
            self.done.set_result(None)


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
        #: Set (on the loop) when librdkafka reported a fatal error: that producer
        #: takes no more records, and the next write starts a new one.
        self._fatal: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: collections.deque[tuple[Acks, int, KafkaError | None, Message]] = (
            collections.deque()
        )
        self._drain_scheduled = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def _started(self) -> Producer:
        if self._producer is None:
            self._loop = asyncio.get_running_loop()
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
        reports = self._reports
        for index, record in enumerate(records):

            def delivered(error: KafkaError | None, message: Message, index: int = index) -> None:
                reports.append((acks, index, error, message))

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
        """The poll thread: serve delivery reports, wake the loop once per bunch."""
        while not self._closed.is_set():
            producer = self._producer
            if producer is None:
                return
            producer.poll(_POLL_S)
            if self._reports:
                with self._lock:
                    if self._drain_scheduled:
                        continue
                    self._drain_scheduled = True
                loop = self._loop
                if loop is None or loop.is_closed():
                    return
                try:
                    loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop closed meanwhile (shutdown)
                    return

    def _drain(self) -> None:
        """On the event loop: hand every report that arrived to its Acks."""
        with self._lock:
            self._drain_scheduled = False
        reports = self._reports
        while reports:
            acks, index, error, message = reports.popleft()
            if error is None:
                partition, offset = message.partition(), message.offset()
                receipt = None if partition is None or offset is None else (partition, offset)
                acks.report(index, None, receipt)
            else:
                acks.report(index, self._delivery_error(error), None)

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
