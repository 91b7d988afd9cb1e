"""The producer API answers an oversized record with Herald's error, not librdkafka's."""

from __future__ import annotations

import logging

import pytest

from pipeline.errors import BrokerUnavailableError, PermanentError, RecordTooLargeError
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from tests.smtp import free_port


def test_an_intent_over_the_size_limit_is_refused_with_herald_s_error() -> None:
    """librdkafka refuses it before any broker is asked (message.max.bytes): the
    caller gets a permanent RecordTooLargeError naming the topic and the size, never a
    raw cimpl.KafkaException (issue 14, item 5)."""
    settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    herald = HeraldProducer(settings)
    with pytest.raises(RecordTooLargeError) as refused:
        herald.publish_intent(
            notification_type="game.turn.ready",
            producer="size-test",
            idempotency_key="big",
            recipient_user_ids=["u1"],
            payload={"game_name": "x" * 2_000_000},
            wait=False,
        )
    assert isinstance(refused.value, PermanentError)
    assert "notification.intents" in str(refused.value)
    assert "bytes" in str(refused.value)


def test_a_broker_that_is_down_is_reported_once_not_every_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """librdkafka's own log goes through Python logging, each distinct line once, and
    the caller gets BrokerUnavailableError (issue 14, item 5)."""
    settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    herald = HeraldProducer(settings, None, **{"message.timeout.ms": 2500})
    herald.publish_intent(
        notification_type="game.turn.ready",
        producer="down-test",
        idempotency_key="k",
        recipient_user_ids=["u1"],
        wait=False,
    )
    with caplog.at_level(logging.INFO, logger="librdkafka"), pytest.raises(BrokerUnavailableError):
        herald.flush(timeout_s=5)
    refused = [r for r in caplog.records if "Connection refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]
