"""SMS: the recipient's number in E.164, how many segments a text takes, and the
providers that send one (Twilio's API, or a stub).

A text that fits the GSM 03.38 default alphabet travels in 7-bit units: 160 in a lone
message, 153 per segment of a longer one (the rest of each carries the concatenation
header), and a character of the alphabet's extension table (``€ [ ] { } | ~ ^ \\``
and form feed) takes two units that are never split between segments. Any other
character sends the whole text as UCS-2: 70 UTF-16 units alone, 67 per segment, and a
character outside the Basic Multilingual Plane (an emoji) takes two units, never
split. Providers bill per segment; the channel caps a text by its segments.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote, urlencode

import phonenumbers

from pipeline.errors import ConfigurationError, InvalidAddressError
from pipeline.settings import Settings
from pipeline.values import value_class

if TYPE_CHECKING:  # the producer library checks numbers without loading aiohttp
    from pipeline.providers.http import HttpPoster

log = logging.getLogger(__name__)

#: GSM 03.38 default alphabet, in code order (the escape at 0x1B left out).
GSM7 = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
#: Its extension table: two units each (the escape, then the character).
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

#: What a recipient's number may be written with.
_DIALLED = re.compile(r"\+[0-9][0-9 ()\-.]*")
#: (units in a lone message, units per segment of a longer one) per encoding.
_LIMITS = {"GSM-7": (160, 153), "UCS-2": (70, 67)}


@value_class
class SmsSize:
    """How a text travels as SMS."""

    encoding: str
    """``GSM-7`` or ``UCS-2``."""
    units: int
    """7-bit units (GSM-7) or UTF-16 code units (UCS-2)."""
    segments: int
    """Messages it takes (0 for an empty text)."""


def sms_size(text: str) -> SmsSize:
    """The encoding, units and segments of ``text`` (see the module docstring)."""
    if all(char in GSM7 or char in GSM7_EXTENSION for char in text):
        encoding = "GSM-7"
        units = [2 if char in GSM7_EXTENSION else 1 for char in text]
    else:
        encoding = "UCS-2"
        units = [2 if ord(char) > 0xFFFF else 1 for char in text]
    total = sum(units)
    alone, per_segment = _LIMITS[encoding]
    if total <= alone:
        return SmsSize(encoding, total, 1 if total else 0)
    segments, used = 1, 0
    for width in units:  # a two-unit character is never split between segments
        if used + width > per_segment:
            segments, used = segments + 1, 0
        used += width
    return SmsSize(encoding, total, segments)


def e164(number: str) -> str:
    """``number`` (international form, with its ``+`` and country code; spaces,
    dashes, dots and brackets allowed) in E.164; InvalidAddressError when it is not a valid
    number."""
    if not _DIALLED.fullmatch(number):
        # phonenumbers reads letters as a keypad's (1-800-FLOWERS) and "ext." as an
        # extension: neither belongs in an SMS recipient.
        raise InvalidAddressError(f"{number!r} is not '+' and digits (spaces, -, ., (, ) allowed)")
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidAddressError(
            f"{number!r} is not an international phone number: {exc}"
        ) from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidAddressError(f"{number!r} is not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


@value_class
class SmsReceipt:
    """A provider's acceptance of one text."""

    provider_id: str
    """The provider's id of the message (Twilio's ``SM...`` sid)."""
    status: str
    """The provider's first status of it (queued, accepted, ...)."""


class SmsProvider(Protocol):
    """Sends one text to one number."""

    async def send(self, to: str, text: str, message_id: str) -> SmsReceipt:
        """Hand ``text`` for ``to`` (E.164) to the provider; a classified HeraldError
        otherwise. ``message_id`` is Herald's (the route_id)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class TwilioSms:
    """Twilio's Messages API, or any service that speaks it: a form POST to
    ``{base}/2010-04-01/Accounts/{sid}/Messages.json`` with HTTP basic auth; 201 with
    the message's JSON. Answers are classified as for every HTTP channel
    (pipeline.providers.http): 429 and 5xx transient, other 4xx permanent."""

    def __init__(self, settings: Settings, poster: HttpPoster) -> None:
        sid, token, sender = settings.sms_account_sid, settings.sms_auth_token, settings.sms_from
        if not sid or token is None or not sender:
            raise ConfigurationError(
                "the twilio SMS provider needs HERALD_SMS_ACCOUNT_SID, HERALD_SMS_AUTH_TOKEN "
                "and HERALD_SMS_FROM"
            )
        base = settings.sms_base_url.rstrip("/")
        self._url = f"{base}/2010-04-01/Accounts/{quote(sid, safe='')}/Messages.json"
        credentials = base64.b64encode(f"{sid}:{token.get_secret_value()}".encode()).decode()
        self._auth = f"Basic {credentials}"
        # A messaging service sends from its own pool of numbers.
        self._sender_field = "MessagingServiceSid" if sender.startswith("MG") else "From"
        self._sender = sender
        self._poster = poster

    async def send(self, to: str, text: str, message_id: str) -> SmsReceipt:
        body = urlencode({"To": to, self._sender_field: self._sender, "Body": text}).encode()
        headers = {
            "authorization": self._auth,
            "content-type": "application/x-www-form-urlencoded",
        }
        receipt = await self._poster.post(self._url, body, headers)
        try:
            answer = json.loads(receipt.body)
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        return SmsReceipt(str(answer.get("sid", "")), str(answer.get("status", receipt.status)))

    async def close(self) -> None:
        await self._poster.close()


class StubSms:
    """Sends nothing: logs and keeps each text (local runs and demos)."""

    def __init__(self) -> None:
        #: Every (number, text) accepted, oldest first.
        self.sent: list[tuple[str, str]] = []

    async def send(self, to: str, text: str, message_id: str) -> SmsReceipt:
        self.sent.append((to, text))
        log.info("stub accepted text %s for %s", message_id, to)
        return SmsReceipt(f"stub-{message_id}", "accepted")

    async def close(self) -> None:
        return None


class Unconfigured:
    """The provider of a worker whose settings name none that works: every text fails
    permanently, with the reason."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    async def send(self, to: str, text: str, message_id: str) -> SmsReceipt:
        raise ConfigurationError(self._reason)

    async def close(self) -> None:
        return None


def sms_provider(settings: Settings) -> SmsProvider:
    """The provider the settings select."""
    if settings.sms_provider == "stub":
        return StubSms()
    from pipeline.providers.http import HttpPoster

    return TwilioSms(settings, HttpPoster(settings))
