"""Operators and dead letters, through the `herald` command against a real worker and a
real SMTP server: mail dead-lettered while the server refuses it is replayed once the
server recovers, at the given rate, delivered exactly once, and never replayed twice."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.contracts import Contracts
from pipeline.contracts.records import StatusEvent
from pipeline.ops.reader import read_messages
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from tests.smtp import ScriptedSmtp, smtp_server
from tests.support import (
    HERALD,
    WorkerProcess,
    fast_retries,
    publish_routes,
    read_all,
    route,
    settings_env,
    wait_for,
)

pytestmark = pytest.mark.integration

ADDRESSES = [f"down{i}@example.org" for i in range(6)]


@pytest.fixture
def smtp() -> Iterator[ScriptedSmtp]:
    # Every address is deferred (421) until the test "fixes" the server.
    yield from smtp_server({address: ["defer"] for address in ADDRESSES})


@pytest.fixture
def settings(isolated: Settings, tmp_path: Path, smtp: ScriptedSmtp) -> Settings:
    return fast_retries(
        isolated, tmp_path / "topologies", "email", smtp_timeout_s=2.0, smtp_port=smtp.port
    )


def herald(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HERALD, *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )


def test_dead_letters_replay_once_at_the_given_rate(
    settings: Settings, smtp: ScriptedSmtp, tmp_path: Path
) -> None:
    contracts = Contracts(settings)
    routes = [route(f"u{i}", address) for i, address in enumerate(ADDRESSES)]
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        publish_routes(settings, contracts, routes)
        wait_for(
            settings,
            "notification.email.dlq",
            contracts.dead_letter,
            lambda found: len(found) >= len(routes),
            timeout_s=90,
            what="every route dead-lettered",
        )
        assert not smtp.received
        # A record another tool wrote to the DLQ: named, and the letters around it listed.
        with HeraldProducer(settings, contracts) as producer:
            producer._produce(settings.topic("notification.email.dlq"), b"x", b"foreign", True)

        # The operator looks before touching anything.
        listed = herald(settings, "dlq", "list", "--channel", "email")
        assert len(listed.stdout.splitlines()) == len(routes)
        assert "skipped a record that is not a readable dead letter" in listed.stderr
        assert f"{settings.topic('notification.email.dlq')}[" in listed.stderr
        assert "budget_exhausted: smtp_deferred 421 after 3 attempt(s)" in listed.stdout
        assert "[replayed]" not in listed.stdout
        shown = json.loads(herald(settings, "dlq", "show", routes[0].route_id).stdout)
        assert [a["code"] for a in shown["attempts"]] == [421, 421, 421]
        assert shown["request"]["address"] == ADDRESSES[0]
        dry = herald(settings, "dlq", "replay", "--reason", "smtp_deferred", "--dry-run")
        assert f"dry run: {len(routes)} would be replayed, 0 already were" in dry.stdout
        time.sleep(2)
        assert not smtp.received  # a dry run writes nothing

        # The server recovers; the operator replays at 3 routes per second.
        for address in ADDRESSES:
            smtp.script[address] = ["accept"]
        started = time.time()
        replay = herald(settings, "dlq", "replay", "--channel", "email", "--rate", "3/s")
        assert f"replayed {len(routes)} dead letter(s)" in replay.stdout
        assert "0 skipped" in replay.stdout
        smtp.wait_for(len(routes), timeout_s=60)

        # A second run of the same command replays nothing.
        again = herald(settings, "dlq", "replay", "--channel", "email", "--rate", "3/s")
        assert "replayed 0 dead letter(s)" in again.stdout
        assert f"{len(routes)} skipped (replayed before)" in again.stdout
        time.sleep(5)  # long enough for a wrongly replayed copy to be delivered
    finally:
        worker.stop()

    # The worker's log says the same, as JSON lines with the route's ids, no address.
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    dead = [line for line in lines if "dead-lettered" in line["message"]]
    assert {line["route_id"] for line in dead} == {r.route_id for r in routes}
    assert {(line["attempt"], line["channel"]) for line in dead} == {(3, "email")}
    assert not [a for a in ADDRESSES if a in worker.log()]

    for address in ADDRESSES:
        assert len(smtp.mails_to(address)) == 1, address
    assert len(smtp.received) == len(routes)

    events: list[StatusEvent] = read_all(settings, "notification.status", contracts.status)
    for request in routes:
        mine = [(e.status, e.attempt) for e in events if e.route_id == request.route_id]
        assert mine[-3:] == [("replayed", 0), ("rendered", 1), ("sent", 1)], mine
    assert "[replayed]" in herald(settings, "dlq", "list").stdout

    # The rate held: replayed routes reached the lane no faster than 3 per second
    # (counted loosely: at most 4 in any one-second window).
    lane = settings.topic("notification.email.requested")
    stamps = sorted(
        m.timestamp()[1] / 1000
        for m in read_messages(settings, lane)
        if m.timestamp()[1] / 1000 >= started
    )
    assert len(stamps) == len(routes)
    for index, first in enumerate(stamps):
        assert len([t for t in stamps[index:] if t < first + 1.0]) <= 4, stamps
    assert stamps[-1] - stamps[0] >= (len(routes) - 1) / 3 - 0.5
