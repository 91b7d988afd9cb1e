"""Standard Webhooks signatures (https://www.standardwebhooks.com/): how the webhook
channel (issue 15) signs each POST, and how a receiver checks one.

A message is signed over ``{webhook-id}.{webhook-timestamp}.{body}`` with HMAC-SHA256
under each of the endpoint's secrets (more than one while a secret is rotated); the
``webhook-signature`` header lists the results as ``v1,<base64>``, separated by
spaces. A secret is written ``whsec_<base64 of the key>``, as the specification's
libraries write it, so a receiver verifies Herald's deliveries with any of them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from pipeline.errors import ConfigurationError

#: The message's id (Herald sends the route_id: the same for every attempt).
WEBHOOK_ID = "webhook-id"
#: When the message was signed, in whole seconds since the epoch.
WEBHOOK_TIMESTAMP = "webhook-timestamp"
#: The signatures, ``v1,<base64>`` each, separated by spaces.
WEBHOOK_SIGNATURE = "webhook-signature"

SECRET_PREFIX = "whsec_"
#: The shortest key the specification allows (192 bits).
MIN_KEY_BYTES = 24
#: How far a receiver lets a timestamp be from its own clock (the specification's).
TOLERANCE_S = 300


def parse_secret(text: str) -> bytes:
    """The key of a ``whsec_...`` secret (the prefix may be left out); a
    ConfigurationError, which never repeats the secret, when it is not one."""
    encoded = text.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError("a webhook secret is not base64 after its whsec_ prefix") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"a webhook secret holds {len(key)} bytes; the Standard Webhooks minimum is "
            f"{MIN_KEY_BYTES}"
        )
    return key


def signature(key: bytes, message_id: str, timestamp_s: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``body`` under ``key``."""
    signed = f"{message_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signed_headers(
    keys: Sequence[bytes], message_id: str, timestamp_s: int, body: bytes
) -> dict[str, str]:
    """The three headers of a delivery signed under every key of ``keys``."""
    if not keys:
        raise ConfigurationError("a webhook is signed with at least one secret")
    return {
        WEBHOOK_ID: message_id,
        WEBHOOK_TIMESTAMP: str(timestamp_s),
        WEBHOOK_SIGNATURE: " ".join(signature(key, message_id, timestamp_s, body) for key in keys),
    }


def verify(
    keys: Sequence[bytes],
    headers: Mapping[str, str],
    body: bytes,
    now_s: int,
    tolerance_s: int = TOLERANCE_S,
) -> bool:
    """Whether ``headers`` carry a signature of ``body`` under one of ``keys``, made
    within ``tolerance_s`` of ``now_s`` (header names compared without case)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    message_id = lowered.get(WEBHOOK_ID)
    stamp = lowered.get(WEBHOOK_TIMESTAMP, "")
    if not message_id or not stamp.isdigit() or abs(now_s - int(stamp)) > tolerance_s:
        return False
    offered = lowered.get(WEBHOOK_SIGNATURE, "").split()
    return any(
        hmac.compare_digest(signature(key, message_id, int(stamp), body), candidate)
        for key in keys
        for candidate in offered
    )
