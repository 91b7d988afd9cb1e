"""The limits of topologies/limits.yaml: user limits and channel rates as data, and
the shared rate a worker's lanes spend, most urgent first."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.errors import ConfigurationError
from pipeline.throttle import SharedRate
from pipeline.topology.limits import Limits, UserLimit


def test_user_limits_and_channel_rates_load() -> None:
    limits = Limits.from_dict(
        {
            "users": [
                {"channel": "email", "category": "game", "max": 20, "per": "1h"},
                {"channel": "email", "max": 50, "per": "1d"},
            ],
            "channels": {"sms": {"per_second": 10, "burst": 5}},
        }
    )
    game, every = limits.users
    assert game == UserLimit("email", "game", 20, 3600 * 1000)
    assert limits.for_user("email", "game") == [game, every]
    assert limits.for_user("email", "lobby") == [every]
    assert limits.for_user("push", "game") == []
    assert limits.channels["sms"].per_second == 10
    limits.check(["email", "sms"])
    with pytest.raises(ConfigurationError, match="fax"):
        Limits.from_dict({"users": [{"channel": "fax", "max": 1, "per": "1h"}]}).check(["email"])


@pytest.mark.parametrize(
    "entry",
    [
        {"channel": "email", "max": 0, "per": "1h"},
        {"channel": "email", "max": 5, "per": "soon"},
        {"channel": "email", "max": 5},
        {"channel": "email", "max": 5, "per": "1h", "burst": 2},
    ],
)
def test_a_bad_user_limit_is_refused(entry: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Limits.from_dict({"users": [entry]})


def test_a_shared_rate_gives_each_worker_its_share() -> None:
    now = [0.0]
    half = SharedRate(10.0, 4, share=lambda: 0.5, clock=lambda: now[0])
    now[0] = 10.0  # long idle: the bucket holds this worker's half of the burst
    assert [half._poll(2) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.2)]
    now[0] = 10.21  # 5 per second here: one token every 0.2 s
    assert half._poll(2) == 0.0
    none = SharedRate(10.0, 4, share=lambda: 0.0, clock=lambda: now[0])
    assert none._poll(0) == 0.1  # owns no partition: nothing to send, ask again later


def test_a_more_urgent_lane_takes_the_next_token_first() -> None:
    async def scenario() -> list[str]:
        rate = SharedRate(50.0, 1, share=lambda: 1.0)
        taken: list[str] = []
        await rate.take(3)  # spend the burst

        async def lane(name: str, rank: int, delay: float) -> None:
            await asyncio.sleep(delay)
            await rate.take(rank)
            taken.append(name)

        await asyncio.gather(lane("low", 3, 0.0), lane("high", 1, 0.005))
        return taken

    assert asyncio.run(scenario()) == ["high", "low"]
