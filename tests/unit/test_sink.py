"""AckedSink: returns only when every record was acknowledged, resending refusals."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError

from pipeline.errors import KafkaDeliveryError
from pipeline.runtime.producer import UNANSWERED, KafkaWriter
from pipeline.runtime.records import Out
from pipeline.runtime.sink import AckedSink
from tests.unit.helpers import FakeBroker


async def test_refused_records_are_resent_until_acknowledged() -> None:
    broker = FakeBroker(failures=2, refuse_topic="b")
    sink = AckedSink(broker.write, max_backoff_s=0.01)
    await sink.deliver([Out("a", None, b"1"), Out("b", None, b"2"), Out("a", None, b"3")])
    assert sorted(v or b"" for v in broker.acked) == [b"1", b"2", b"3"]
    assert broker.acked.count(b"1") == 1  # what was acknowledged is not sent again
    assert not sink.stalled


async def test_table_changelog_records_are_written_after_the_outputs_are_acknowledged() -> None:
    """A worker killed mid-write must never leave a table entry without the outputs it
    stands for (the input, read again, would be found done and its outputs lost)."""
    broker = FakeBroker(failures=1, refuse_topic="out")
    writes: list[list[str]] = []
    write = broker.write

    async def recording(records: Any) -> Any:
        writes.append([record.topic for record in records])
        return await write(records)

    sink = AckedSink(recording, max_backoff_s=0.01)
    sink.state_topics.add("table.changelog")
    await sink.deliver(
        [Out("out", None, b"1"), Out("table.changelog", None, b"2"), Out("status", None, b"3")]
    )
    # The refused output is sent again, and only then the table's entry.
    assert writes == [["out", "status"], ["out"], ["table.changelog"]]
    await sink.deliver([Out("table.changelog", None, b"4")])  # a write-ahead on its own
    assert writes[-1] == ["table.changelog"]


async def test_a_send_never_answered_is_sent_again() -> None:
    broker = FakeBroker(unanswered=1)
    sink = AckedSink(broker.write, max_backoff_s=0.01, ack_timeout_s=0.05)
    await sink.deliver([Out("a", None, b"1"), Out("a", None, b"2")])
    assert sorted(v or b"" for v in broker.acked) == [b"1", b"2"]


async def test_a_record_kafka_never_takes_fails_with_a_transient_error() -> None:
    writer = KafkaWriter({"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 300})
    acks = await writer.write([Out("t", b"k", b"v")])
    await asyncio.wait_for(acks.done, 10)
    failed = acks.outcomes[0]
    assert isinstance(failed, KafkaDeliveryError)
    assert failed.transient
    assert acks.receipts == [None]
    writer.close(timeout_s=0.1)


async def test_records_written_together_are_answered_one_by_one() -> None:
    broker = FakeBroker(failures=1, refuse_topic="b", unanswered=1)
    acks = await broker.write([Out("a", None, b"1"), Out("b", None, b"2"), Out("a", None, b"3")])
    assert not acks.done.done()  # the first record has no answer yet
    assert acks.outcomes[0] is UNANSWERED
    assert isinstance(acks.outcomes[1], RuntimeError)
    assert acks.outcomes[2] is None
    assert acks.receipts[2] == (0, 0)
    acks.report(0, None, (0, 1))
    acks.report(0, RuntimeError("late"), None)  # a second answer does not count
    assert acks.done.done()
    assert acks.outcomes[0] is None


class SequenceBrokenProducer:
    """A stand-in for confluent-kafka's Producer: the first one made reports every
    record with a fatal error (an idempotent producer's sequence error after a broker
    restart); the ones made after it deliver."""

    made: list[SequenceBrokenProducer] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.fatal = not SequenceBrokenProducer.made
        self.pending: list[Any] = []
        self.purged = False
        SequenceBrokenProducer.made.append(self)

    def produce(self, topic: str, value: Any, key: Any, partition: int, **kw: Any) -> None:
        self.pending.append(kw["on_delivery"])

    def poll(self, timeout: float) -> int:
        pending, self.pending = self.pending, []
        for delivered in pending:
            if self.fatal:
                error = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "seq", fatal=True)
                delivered(error, None)
            else:
                delivered(None, SimpleNamespace(partition=lambda: 0, offset=lambda: 7))
        if not pending:
            time.sleep(timeout)
        return len(pending)

    def purge(self) -> None:
        self.purged = True

    def flush(self, timeout: float) -> int:
        return 0


async def test_a_producer_that_failed_fatally_is_replaced_and_the_record_sent_again() -> None:
    SequenceBrokenProducer.made.clear()
    writer = KafkaWriter({}, producer=SequenceBrokenProducer)  # type: ignore[arg-type]
    sink = AckedSink(writer.write, max_backoff_s=0.01)
    await asyncio.wait_for(sink.deliver([Out("t", b"k", b"v")]), 10)
    first, second = SequenceBrokenProducer.made
    assert first.purged  # what it still held is reported, to be sent again
    assert (first.fatal, second.fatal) == (True, False)
    acks = await writer.write([Out("t", b"k", b"w")])
    await asyncio.wait_for(acks.done, 10)
    assert (acks.outcomes, acks.receipts) == ([None], [(0, 7)])
    assert len(SequenceBrokenProducer.made) == 2  # a healthy producer is kept
    writer.close(timeout_s=0.1)


async def test_a_fatal_refusal_reads_as_such_to_the_writer() -> None:
    SequenceBrokenProducer.made.clear()
    writer = KafkaWriter({}, producer=SequenceBrokenProducer)  # type: ignore[arg-type]
    acks = await writer.write([Out("t", b"k", b"v")])
    await asyncio.wait_for(acks.done, 10)
    (failed,) = acks.outcomes
    assert isinstance(failed, KafkaDeliveryError)
    assert failed.code == KafkaError._FATAL
    writer.close(timeout_s=0.1)
