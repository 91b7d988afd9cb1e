"""What an SMS may carry (issue 15): the recipient's number in E.164, and how many
segments a text takes.

A text that fits the GSM 03.38 default alphabet travels in 7-bit units: 160 in a lone
message, 153 per segment of a longer one (the rest of each carries the concatenation
header), and a character of the alphabet's extension table (``€ [ ] { } | ~ ^ \\``
and form feed) takes two units that are never split between segments. Any other
character sends the whole text as UCS-2: 70 UTF-16 units alone, 67 per segment, and a
character outside the Basic Multilingual Plane (an emoji) takes two units, never
split. Providers bill per segment; the channel caps a text by its segments.
"""

from __future__ import annotations

import re

import phonenumbers

from pipeline.errors import InvalidAddressError
from pipeline.values import value_class

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
