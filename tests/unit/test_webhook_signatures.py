"""Standard Webhooks signatures, against the specification's published test vector."""

from __future__ import annotations

import base64

import pytest

from pipeline.errors import ConfigurationError
from pipeline.providers.webhook import (
    WEBHOOK_ID,
    WEBHOOK_SIGNATURE,
    WEBHOOK_TIMESTAMP,
    parse_secret,
    signature,
    signed_headers,
    verify,
)

# The specification's test vector (github.com/standard-webhooks/standard-webhooks).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MESSAGE_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
EXPECTED = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_specifications_vector() -> None:
    key = parse_secret(SECRET)
    assert signature(key, MESSAGE_ID, TIMESTAMP, BODY) == EXPECTED
    assert signed_headers([key], MESSAGE_ID, TIMESTAMP, BODY) == {
        WEBHOOK_ID: MESSAGE_ID,
        WEBHOOK_TIMESTAMP: str(TIMESTAMP),
        WEBHOOK_SIGNATURE: EXPECTED,
    }
    assert parse_secret(SECRET.removeprefix("whsec_")) == key


def test_a_receiver_accepts_the_signature_and_nothing_altered() -> None:
    key = parse_secret(SECRET)
    headers = signed_headers([key], MESSAGE_ID, TIMESTAMP, BODY)
    assert verify([key], headers, BODY, now_s=TIMESTAMP + 10)
    assert verify([key], {k.title(): v for k, v in headers.items()}, BODY, now_s=TIMESTAMP)
    assert not verify([key], headers, BODY + b" ", now_s=TIMESTAMP)
    assert not verify([key], {**headers, WEBHOOK_ID: "msg_other"}, BODY, now_s=TIMESTAMP)
    moved = {**headers, WEBHOOK_TIMESTAMP: str(TIMESTAMP + 1)}
    assert not verify([key], moved, BODY, now_s=TIMESTAMP)
    # Too old or too far ahead: a replayed delivery is refused.
    assert not verify([key], headers, BODY, now_s=TIMESTAMP + 301)
    assert not verify([key], headers, BODY, now_s=TIMESTAMP - 301)
    assert not verify([bytes(32)], headers, BODY, now_s=TIMESTAMP)


def test_while_a_secret_is_rotated_both_sign_and_either_verifies() -> None:
    old, new = parse_secret(SECRET), bytes(range(32))
    headers = signed_headers([new, old], MESSAGE_ID, TIMESTAMP, BODY)
    assert headers[WEBHOOK_SIGNATURE].split() == [
        signature(new, MESSAGE_ID, TIMESTAMP, BODY),
        EXPECTED,
    ]
    assert verify([old], headers, BODY, now_s=TIMESTAMP)
    assert verify([new], headers, BODY, now_s=TIMESTAMP)


@pytest.mark.parametrize(
    "secret",
    ["whsec_%%%%secret%%%%", "whsec_" + base64.b64encode(b"too short").decode(), ""],
)
def test_a_bad_secret_is_a_configuration_error_that_does_not_repeat_it(secret: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_secret(secret)
    encoded = secret.removeprefix("whsec_")
    if encoded:
        assert encoded not in str(info.value)


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ConfigurationError):
        signed_headers([], MESSAGE_ID, TIMESTAMP, BODY)
