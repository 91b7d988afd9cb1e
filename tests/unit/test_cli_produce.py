"""`herald produce` checks an intent as intake will before it sends it: one intake would
refuse exits 1 with the reason, and nothing reaches Kafka (issue 14, item 4)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.smtp import free_port
from tests.support import HERALD


def produce(*args: str) -> subprocess.CompletedProcess[str]:
    # No broker at this address: a refused intent must never get as far as Kafka.
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    return subprocess.run(
        [HERALD, "produce", "--type", "game.turn.ready", "--producer", "cli-test", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--to", "u1", "--payload", "[1,2]"], "the payload must be a JSON object, not list"),
        (["--to", "u1", "--payload", '{"game_id":"g1"}'], "requires game_name"),
        (["--payload", '{"game_id":"g1","game_name":"A","turn_number":1}'], "recipient"),
    ],
)
def test_an_intent_intake_would_refuse_is_not_sent(args: list[str], said: str) -> None:
    result = produce(*args)
    assert result.returncode == 1, result
    assert said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
