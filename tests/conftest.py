"""Shared fixtures for every test layer."""

from __future__ import annotations

import pytest

from pipeline.settings import Settings


@pytest.fixture
def settings() -> Settings:
    """Settings with defaults (no environment needed for unit tests)."""
    return Settings()
