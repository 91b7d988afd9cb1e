"""Intent validation rules and the idempotency fingerprint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from pipeline.errors import ValidationError
from pipeline.settings import Settings
from pipeline.stages.intake import ValidIntent, fingerprint, validate
from pipeline.topology import Catalog
from tests.unit.helpers import TURN_READY_PAYLOAD, make_intent


@pytest.fixture
def catalog(settings: Settings) -> Catalog:
    return Catalog.load(settings)


def check(intent_kwargs: Mapping[str, Any], catalog: Catalog, settings: Settings) -> ValidIntent:
    return validate(make_intent(**intent_kwargs), catalog, settings)


def test_valid_intent_is_normalised(catalog: Catalog, settings: Settings) -> None:
    valid = check({"recipient_user_ids": ["u2", "u1", "u2"]}, catalog, settings)
    assert valid.recipients == ("u2", "u1")
    assert valid.payload == TURN_READY_PAYLOAD
    assert valid.priority == "normal"


def test_type_priority_floor_raises_priority(catalog: Catalog, settings: Settings) -> None:
    valid = check(
        {"notification_type": "auth.login_code", "payload": {"code": "123456"}},
        catalog,
        settings,
    )
    assert valid.priority == "critical"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"notification_type": "game.unknown"}, "unknown_notification_type"),
        ({"producer": "Game Master"}, "invalid_producer"),
        ({"producer": "a:b"}, "invalid_producer"),
        ({"idempotency_key": ""}, "invalid_idempotency_key"),
        ({"idempotency_key": "k" * 257}, "invalid_idempotency_key"),
        ({"audience_kind": "admin_email", "recipient_user_ids": []}, "audience_not_allowed"),
        ({"recipient_user_ids": []}, "empty_recipients"),
        ({"recipient_user_ids": ["u1", ""]}, "invalid_recipient"),
        ({"occurred_at_ms": 0}, "invalid_occurred_at"),
        ({"payload_json": "[1, 2]"}, "payload_not_json_object"),
        ({"payload_json": "{not json"}, "payload_not_json_object"),
        ({"payload": {"game_id": "g"}}, "missing_payload_fields"),
        ({"payload": {**TURN_READY_PAYLOAD, "game_name": ""}}, "missing_payload_fields"),
        ({"payload": {**TURN_READY_PAYLOAD, "blob": "x" * 70_000}}, "payload_too_large"),
    ],
)
def test_invalid_intents_are_rejected_with_a_reason(
    overrides: dict[str, object], reason: str, catalog: Catalog, settings: Settings
) -> None:
    with pytest.raises(ValidationError) as info:
        check(overrides, catalog, settings)
    assert info.value.reason == reason
    assert info.value.detail


def test_admin_email_takes_no_recipients(catalog: Catalog, settings: Settings) -> None:
    admin = {
        "notification_type": "geo.review_recommended",
        "audience_kind": "admin_email",
        "payload": {"user_id": "u9", "review_reason": "sudden jump"},
    }
    assert check({**admin, "recipient_user_ids": []}, catalog, settings).recipients == ()
    with pytest.raises(ValidationError, match="admin_email") as info:
        check(admin, catalog, settings)  # the default intent carries two recipients
    assert info.value.reason == "unexpected_recipients"


def test_too_many_recipients(catalog: Catalog) -> None:
    small = Settings(max_recipients=2)
    with pytest.raises(ValidationError) as info:
        check({"recipient_user_ids": ["a", "b", "c"]}, catalog, small)
    assert info.value.reason == "too_many_recipients"


def test_fingerprint_ignores_request_and_trace_ids_and_ordering(
    catalog: Catalog, settings: Settings
) -> None:
    base = fingerprint(check({}, catalog, settings))
    same = check(
        {
            "request_id": "r-2",
            "trace_id": "t-9",
            "recipient_user_ids": ["u2", "u1"],
            "payload_json": json.dumps(dict(reversed(TURN_READY_PAYLOAD.items()))),
        },
        catalog,
        settings,
    )
    assert fingerprint(same) == base


@pytest.mark.parametrize(
    "change",
    [
        {"recipient_user_ids": ["u1"]},
        {"payload": {**TURN_READY_PAYLOAD, "turn_number": 8}},
        {"occurred_at_ms": 1_700_000_000_001},
        {"priority": "high"},
        {"tenant_id": "t-1"},
    ],
)
def test_fingerprint_sees_content_changes(
    change: dict[str, object], catalog: Catalog, settings: Settings
) -> None:
    assert fingerprint(check(change, catalog, settings)) != fingerprint(
        check({}, catalog, settings)
    )
