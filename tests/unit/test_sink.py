"""AckedSink: returns only when every record was acknowledged, resending refusals."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.errors import KafkaDeliveryError
from pipeline.runtime.producer import KafkaWriter
from pipeline.runtime.records import Out
from pipeline.runtime.sink import AckedSink
from tests.unit.helpers import FakeBroker


async def test_refused_records_are_resent_until_acknowledged() -> None:
    broker = FakeBroker(failures=2, refuse_topic="b")
    sink = AckedSink(broker.send, max_backoff_s=0.01)
    await sink.deliver([Out("a", None, b"1"), Out("b", None, b"2"), Out("a", None, b"3")])
    assert sorted(v or b"" for v in broker.acked) == [b"1", b"2", b"3"]
    assert broker.acked.count(b"1") == 1  # what was acknowledged is not sent again
    assert not sink.stalled


async def test_a_send_never_answered_is_sent_again() -> None:
    broker = FakeBroker(unanswered=1)
    sink = AckedSink(broker.send, max_backoff_s=0.01, ack_timeout_s=0.05)
    await sink.deliver([Out("a", None, b"1"), Out("a", None, b"2")])
    assert sorted(v or b"" for v in broker.acked) == [b"1", b"2"]


async def test_a_record_kafka_never_takes_fails_with_a_transient_error() -> None:
    writer = KafkaWriter({"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 300})
    future = await writer.send("t", b"k", b"v", None, ())
    with pytest.raises(KafkaDeliveryError) as failed:
        await asyncio.wait_for(future, 10)
    assert failed.value.transient
    writer.close(timeout_s=0.1)
