"""User profiles are checked at the door: the producer API and `herald users put`
refuse a bad one with its reason, and the directory keeps a bad profile from another
producer out of the table, on the malformed topic (issue 14, item 2)."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from pipeline.contracts import Contracts
from pipeline.contracts.records import PushDevice, QuietHours, UserProfile
from pipeline.errors import ValidationError
from pipeline.producer import HeraldProducer
from pipeline.runtime.tables import WriteBehind
from pipeline.settings import Settings
from pipeline.stages.users import UserDirectory, check_profile
from tests.smtp import free_port
from tests.support import HERALD
from tests.unit.helpers import profile_record, stage_context

NOW = 1_800_000_000_000

BAD: list[tuple[dict[str, Any], str]] = [
    ({"email": "x" * 500_000 + "@example.org"}, "invalid_email"),
    ({"email": "Ann <ann@example.org>"}, "invalid_email"),
    ({"email": "ann@example.org\r\nBcc: eve@example.org"}, "invalid_email"),
    ({"email": "no-at-sign"}, "invalid_email"),
    ({"quiet_hours": QuietHours(start="25:00", end="99")}, "invalid_quiet_hours"),
    ({"quiet_hours": QuietHours(start="7:00", end="22:00")}, "invalid_quiet_hours"),
    ({"timezone": "Mars/Olympus_Mons"}, "unknown_timezone"),
    ({"push_devices": [PushDevice(token="")]}, "invalid_push_devices"),
    ({"push_devices": [PushDevice(token=f"t{n}") for n in range(51)]}, "invalid_push_devices"),
    ({"opt_outs": ["x" * 201]}, "profile_too_large"),
    ({"user_id": ""}, "invalid_user_id"),
]


def user(**fields: Any) -> UserProfile:
    values: dict[str, Any] = {"user_id": "u1", "email": "ann@example.org"}
    values.update(fields)
    return UserProfile(**values)


@pytest.mark.parametrize(("fields", "reason"), BAD)
def test_a_bad_profile_is_refused_with_its_reason(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError) as refused:
        check_profile(user(**fields))
    assert refused.value.reason == reason
    assert len(refused.value.detail) < 400  # the detail never carries a huge value


def test_good_profiles_pass() -> None:
    check_profile(user())
    check_profile(
        user(
            email=None,
            timezone="Europe/Berlin",
            quiet_hours=QuietHours(start="22:00", end="07:30"),
            push_devices=[PushDevice(token="tok", platform="ios")],
            opt_outs=["game", "email:lobby"],
        )
    )


def test_the_producer_api_refuses_before_anything_is_sent(settings: Settings) -> None:
    # No broker at this address: the refusal comes before any write.
    unreachable = settings.model_copy(
        update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"}
    )
    with HeraldProducer(unreachable) as herald, pytest.raises(ValidationError) as refused:
        herald.put_user(user(quiet_hours=QuietHours(start="25:00", end="99")))
    assert refused.value.reason == "invalid_quiet_hours"


def test_herald_users_put_exits_1_with_the_reason() -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    result = subprocess.run(
        [HERALD, "users", "put", "--user-id", "u1", "--email", "not a mailbox"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert "not a plain mailbox" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_directory_keeps_a_bad_profile_out_and_says_why(settings: Settings) -> None:
    contracts = Contracts(settings)
    directory = UserDirectory(stage_context(settings))
    table: dict[bytes, Any] = {}
    view = WriteBehind(table)
    good = contracts.user.encode(user())
    assert directory.handle(profile_record(settings, good), view, NOW) == []
    view.commit()
    bad = contracts.user.encode(user(email="x" * 500_000 + "@example.org"))
    [refused] = directory.handle(profile_record(settings, bad), view, NOW)
    view.commit()
    assert table == {b"u1": good}  # the previous profile stays
    record = contracts.malformed.decode(refused.value)
    assert (refused.topic, record.reason) == ("notification.malformed", "invalid_email")
    assert record.raw_value == bad  # kept with its bytes, for the operator
