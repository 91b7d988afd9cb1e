"""SMS recipients in E.164 and texts counted in segments (GSM 03.38 and UCS-2)."""

from __future__ import annotations

import pytest

from pipeline.errors import InvalidAddressError
from pipeline.providers.sms import GSM7, GSM7_EXTENSION, SmsSize, e164, sms_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", SmsSize("GSM-7", 0, 0)),
        ("a" * 160, SmsSize("GSM-7", 160, 1)),
        ("a" * 161, SmsSize("GSM-7", 161, 2)),
        ("a" * 306, SmsSize("GSM-7", 306, 2)),
        ("a" * 307, SmsSize("GSM-7", 307, 3)),
        ("Zug 7 ist bereit. Dein Zug! @£$¥èé", SmsSize("GSM-7", 34, 1)),
        # Two units each: 80 fit one message; the 77th of 81 would straddle a segment.
        ("€" * 80, SmsSize("GSM-7", 160, 1)),
        ("€" * 81, SmsSize("GSM-7", 162, 2)),
        ("a" * 152 + "€" + "a" * 10, SmsSize("GSM-7", 164, 2)),
        ("a" * 152 + "€" * 77, SmsSize("GSM-7", 306, 3)),
        # One character outside the alphabet sends the whole text as UCS-2.
        ("ê" * 70, SmsSize("UCS-2", 70, 1)),
        ("ê" * 71, SmsSize("UCS-2", 71, 2)),
        ("a" * 134, SmsSize("GSM-7", 134, 1)),
        ("ê" + "a" * 133, SmsSize("UCS-2", 134, 2)),
        ("ê" + "a" * 134, SmsSize("UCS-2", 135, 3)),
        # An emoji is two UTF-16 units, never split: 33 fill 66 of a segment's 67.
        ("😀" * 35, SmsSize("UCS-2", 70, 1)),
        ("😀" * 36, SmsSize("UCS-2", 72, 2)),
        ("😀" * 67, SmsSize("UCS-2", 134, 3)),
    ],
)
def test_a_text_is_counted_as_the_network_counts_it(text: str, expected: SmsSize) -> None:
    assert sms_size(text) == expected


def test_the_alphabet_is_gsm_03_38s() -> None:
    assert len(GSM7) == 127  # 128 codes, the escape left out
    assert len(GSM7_EXTENSION) == 10
    assert not GSM7 & GSM7_EXTENSION
    assert {"\n", "\r", " ", "@", "Δ", "ß", "à"} <= GSM7
    assert not {"`", "ê", "ç", "\t"} & (GSM7 | GSM7_EXTENSION)


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("+14155552671", "+14155552671"),
        ("+1 (415) 555-2671", "+14155552671"),
        ("+49 30 901820", "+4930901820"),
        ("+44 20 7946 0958", "+442079460958"),
    ],
)
def test_numbers_are_kept_in_e164(number: str, expected: str) -> None:
    assert e164(number) == expected


@pytest.mark.parametrize(
    "number",
    [
        "4155552671",
        "+1 415 555",
        "+999 1234567",
        "call me",
        "",
        "+49 30 901820 ext. 9",
        "+1-800-FLOWERS",
    ],
)
def test_anything_else_is_an_invalid_address(number: str) -> None:
    with pytest.raises(InvalidAddressError) as info:
        e164(number)
    assert info.value.reason == "invalid_address"
    assert not info.value.transient
