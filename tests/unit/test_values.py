"""Value classes: frozen for the type checker, plain dataclasses at run time."""

from __future__ import annotations

import dataclasses

from mypy import api

from pipeline.runtime.records import Out


def test_a_value_class_compares_and_hashes_by_its_fields() -> None:
    out = Out("t", b"k", b"v")
    assert out == Out("t", b"k", b"v")
    assert len({out, Out("t", b"k", b"v"), Out("t", b"k", b"w")}) == 2
    assert dataclasses.replace(out, value=b"w") == Out("t", b"k", b"w")
    assert not hasattr(out, "__dict__")  # slots


def test_the_type_checker_refuses_an_assignment_to_a_field() -> None:
    snippet = (
        "from pipeline.runtime.records import Out\n"
        "out = Out('t', b'k', b'v')\n"
        "out.topic = 'other'\n"
    )
    report, _, status = api.run(
        ["--config-file", "", "--strict", "--no-incremental", "-c", snippet]
    )
    assert status == 1
    assert 'Property "topic" defined in "Out" is read-only' in report
