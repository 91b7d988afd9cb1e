"""Settings: one variable per field, validated at start-up, all documented."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.settings import REPO_ROOT, Settings


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [
        Settings.env_var(n)
        for n in Settings.model_fields
        if f"| `{Settings.env_var(n)}` |" not in readme
    ]
    assert missing == []


def test_each_setting_reads_its_documented_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092, k2:9092")
    monkeypatch.setenv("HERALD_MAX_RECIPIENTS", "7")
    monkeypatch.setenv("HERALD_TOPIC_PREFIX", "blue.")
    settings = Settings()
    assert settings.kafka_bootstrap_servers == "k1:9092,k2:9092"
    assert settings.max_recipients == 7
    assert settings.topic("notification.intents") == "blue.notification.intents"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HERALD_MAX_RECIPIENTS", "0"),
        ("HERALD_TOPOLOGY_PROFILE", "staging"),
        ("KAFKA_BOOTSTRAP_SERVERS", " , "),
        ("HERALD_SESSION_TIMEOUT_S", "1"),
    ],
)
def test_bad_values_are_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        Settings()


def test_settings_survive_the_trip_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = Settings(topic_prefix="x.", max_recipients=3, clock_offset_ms=-5)
    for name, value in original.as_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == original
