"""The worker's tuning of Python's cyclic garbage collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pipeline.runtime.memory import tune_gc
from pipeline.settings import Settings


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored")
def test_the_young_generation_grows_and_start_up_objects_are_frozen() -> None:
    _, older, oldest = gc.get_threshold()
    tune_gc(Settings().gc_young_threshold)
    assert gc.get_threshold() == (20_000, older, oldest)
    assert gc.get_freeze_count() > 1000  # modules, classes and functions imported so far


@pytest.mark.usefixtures("restored")
def test_zero_keeps_pythons_defaults() -> None:
    before = gc.get_threshold()
    tune_gc(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
