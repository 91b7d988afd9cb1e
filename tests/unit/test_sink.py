"""AckedSink: returns only when every record was acknowledged, resending refusals."""

from __future__ import annotations

import asyncio

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
