"""Intent validation rules and the idempotency fingerprint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from pipeline.contracts.push import BODY_TABLES
from pipeline.errors import ConfigurationError, ValidationError
from pipeline.settings import Settings
from pipeline.stages.intake import ValidIntent, fingerprint, validate
from pipeline.topology import Catalog, payload_type_error
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
        ({"payload_json": '{"game_name": "A\\udc00"}'}, "payload_not_json_object"),
        ({"payload": {"game_id": "g"}}, "missing_payload_fields"),
        ({"payload": {**TURN_READY_PAYLOAD, "game_name": ""}}, "missing_payload_fields"),
        ({"payload": {**TURN_READY_PAYLOAD, "blob": "x" * 70_000}}, "payload_too_large"),
        # Issue 14, item 3: the catalog's field types are checked at the door.
        ({"payload": {**TURN_READY_PAYLOAD, "turn_number": "x"}}, "payload_field_type"),
        ({"payload": {**TURN_READY_PAYLOAD, "turn_number": "7"}}, "payload_field_type"),
        ({"payload": {**TURN_READY_PAYLOAD, "turn_number": True}}, "payload_field_type"),
        ({"payload": {**TURN_READY_PAYLOAD, "turn_number": 7.5}}, "payload_field_type"),
        ({"payload": {**TURN_READY_PAYLOAD, "turn_number": -1}}, "payload_field_type"),
        ({"payload": {**TURN_READY_PAYLOAD, "turn_number": 2**32}}, "payload_field_type"),
        ({"payload": {**TURN_READY_PAYLOAD, "game_name": ["A"]}}, "payload_field_type"),
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


def test_a_wrong_type_is_refused_naming_the_field_and_the_type(
    catalog: Catalog, settings: Settings
) -> None:
    payload = {**TURN_READY_PAYLOAD, "turn_number": "x", "game_name": 3}
    with pytest.raises(ValidationError) as info:
        check({"payload": payload}, catalog, settings)
    assert info.value.detail == (
        "game.turn.ready: game_name must be a string, not 3; "
        'turn_number must be a whole number from 0 to 4294967295, not "x"'
    )


def test_the_largest_count_and_fields_beyond_the_catalog_pass(
    catalog: Catalog, settings: Settings
) -> None:
    payload = {**TURN_READY_PAYLOAD, "turn_number": 2**32 - 1, "extra": [1, {"a": None}]}
    assert check({"payload": payload}, catalog, settings).payload == payload


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("string", "x", 1),
        ("integer", -3, 1.0),
        ("count", 0, -1),
        ("number", 1.5, "1.5"),
        ("number", 2, True),
        ("boolean", False, 0),
        ("any", None, None),
    ],
)
def test_each_catalog_type_accepts_its_json_values(kind: str, good: object, bad: object) -> None:
    assert payload_type_error(kind, good) is None
    if kind != "any":
        assert payload_type_error(kind, bad)


def test_a_catalog_declaring_an_unknown_type_does_not_load() -> None:
    doc = {
        "types": {
            "t.x": {"channels": {"user": ["email"]}, "required": {"when": "timestamp"}},
        }
    }
    with pytest.raises(ConfigurationError, match="'when' has unknown type 'timestamp'"):
        Catalog.from_dict(doc, ("email",))


def test_a_catalog_listing_names_declares_them_untyped() -> None:
    doc = {"types": {"t.x": {"channels": {"user": ["email"]}, "required": ["a", "b"]}}}
    spec = Catalog.from_dict(doc, ("email",)).types["t.x"]
    assert spec.required == ("a", "b")
    assert spec.fields == {"a": "any", "b": "any"}


def test_every_push_field_the_catalog_types_fits_its_flatbuffers_field(
    catalog: Catalog,
) -> None:
    fits = {str: {"string"}, int: {"integer", "count"}, float: {"number"}, bool: {"boolean"}}
    for spec in catalog.types.values():
        if spec.push_payload is None:
            continue
        kinds = BODY_TABLES[spec.push_payload][1]
        for name, kind in spec.fields.items():
            if name in kinds:
                assert kind in fits[kinds[name]], (spec.name, name, kind)
