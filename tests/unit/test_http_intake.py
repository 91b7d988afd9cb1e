"""The HTTP intake's parts without a broker: the body as an intent, every problem at
once, the producer limits and their file."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.errors import (
    ConfigurationError,
    InvalidRequestError,
    RateLimitedError,
    ValidationError,
)
from pipeline.settings import Settings
from pipeline.stages.intake import check_all, validate
from pipeline.throttle import TokenBucket
from pipeline.topology import Catalog
from pipeline.topology.limits import Limits, Rate
from pipeline.web.intents import ProducerLimits, parse_intent
from tests.unit.helpers import TURN_READY_PAYLOAD, make_intent

BODY: dict[str, Any] = {
    "notification_type": "game.turn.ready",
    "recipient_user_ids": ["u1"],
    "occurred_at_ms": 1_790_000_000_000,
    "payload_json": TURN_READY_PAYLOAD,
}


def reasons(body: Any, key: str | None = "k-1", producer: str | None = "game-master") -> list[str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(InvalidRequestError) as info:
        parse_intent(raw, key, producer)
    return [p.reason for p in info.value.problems]


def test_a_body_becomes_the_intent_a_kafka_producer_would_write() -> None:
    intent = parse_intent(json.dumps(BODY).encode(), "k-1", "game-master")
    assert (intent.producer, intent.idempotency_key, intent.audience_kind) == (
        "game-master",
        "k-1",
        "user",
    )
    assert json.loads(intent.payload_json) == TURN_READY_PAYLOAD
    # The payload as text is taken as it is.
    text = {**BODY, "payload_json": json.dumps(TURN_READY_PAYLOAD)}
    assert parse_intent(json.dumps(text).encode(), "k-1", "game-master").payload_json == (
        json.dumps(TURN_READY_PAYLOAD)
    )
    # A trusted caller names the producer in the body.
    named = {**BODY, "producer": "lobby"}
    assert parse_intent(json.dumps(named).encode(), "k-1", None).producer == "lobby"


def test_every_problem_of_the_envelope_is_listed() -> None:
    body = {
        **BODY,
        "colour": "red",
        "recipient_user_ids": "u1",
        "priority": "urgent",
        "request_id": 7,
        "idempotency_key": "other",
        "producer": "lobby",
    }
    del body["occurred_at_ms"]
    assert reasons(body) == [
        "unknown_fields",
        "field_type",  # recipient_user_ids
        "missing_field",  # occurred_at_ms
        "field_type",  # request_id
        "field_type",  # priority
        "invalid_idempotency_key",
        "invalid_producer",
    ]
    assert reasons(b"{") == ["invalid_json"]
    assert reasons([BODY]) == ["invalid_json"]
    assert reasons(BODY, key=None) == ["invalid_idempotency_key"]
    assert reasons(BODY, producer=None) == ["invalid_producer"]
    assert reasons({**BODY, "occurred_at_ms": True}) == ["field_type"]
    assert reasons({**BODY, "recipient_user_ids": ["u1", 2]}) == ["field_type"]


def test_check_all_lists_every_rule_validate_stops_at_the_first(settings: Settings) -> None:
    catalog = Catalog.load(settings)
    intent = make_intent(
        producer="Game Master",
        recipient_user_ids=[],
        occurred_at_ms=0,
        payload={"game_id": "g", "turn_number": "x"},
    )
    assert [p.reason for p in check_all(intent, catalog, settings)[1]] == [
        "invalid_producer",
        "invalid_occurred_at",
        "empty_recipients",
        "missing_payload_fields",
        "payload_field_type",
    ]
    with pytest.raises(ValidationError) as info:
        validate(intent, catalog, settings)
    assert info.value.reason == "invalid_producer"
    unknown = make_intent(notification_type="no.such.type", recipient_user_ids=[])
    assert [p.reason for p in check_all(unknown, catalog, settings)[1]] == [
        "unknown_notification_type",
        "empty_recipients",
    ]
    valid, found = check_all(make_intent(), catalog, settings)
    assert valid is not None
    assert found == []


def test_a_token_bucket_spends_its_burst_then_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() == 0.0
    now[0] = 100.0  # a long quiet spell saves up no more than the burst
    assert [bucket.take() for _ in range(4)][-1] == pytest.approx(0.5)


def test_producer_limits_use_the_named_entry_or_the_default() -> None:
    now = [0.0]
    limits = Limits.from_dict(
        {"producers": {"*": {"per_second": 1, "burst": 1}, "bulk": {"per_second": 0.1}}}
    )
    spend = ProducerLimits(limits, clock=lambda: now[0]).spend
    spend("anyone")
    with pytest.raises(RateLimitedError) as info:
        spend("anyone")
    assert info.value.retry_after_s == 1
    spend("bulk")
    with pytest.raises(RateLimitedError) as info:
        spend("bulk")
    assert info.value.retry_after_s == 10
    unlimited = ProducerLimits(Limits()).spend
    for _ in range(1000):
        unlimited("anyone")


@pytest.mark.parametrize(
    "doc",
    [
        {"producers": {"a": {"per_second": 0}}},
        {"producers": {"a": {"per_second": "fast"}}},
        {"producers": {"a": {"per_second": 1, "burst": 0}}},
        {"producers": {"a": {"per_second": 1, "rate": 2}}},
        {"producers": {"a": 5}},
        {"senders": {}},
        ["producers"],
    ],
)
def test_a_bad_limits_file_is_refused(doc: Any) -> None:
    with pytest.raises(ConfigurationError):
        Limits.from_dict(doc)


def test_the_shipped_limits_load(settings: Settings) -> None:
    limits = Limits.load(settings)
    assert limits.producer("anyone") == Rate(1000.0, 2000)
