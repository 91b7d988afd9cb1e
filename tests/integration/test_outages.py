"""Outage drills against the real broker: the SMTP server down for longer than the
retry tiers (the circuit breaker holds the routes without spending their budget),
and the broker restarted under load (workers reconnect; nothing lost, nothing twice)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.contracts import Contracts
from pipeline.settings import REPO_ROOT, Settings
from tests.smtp import DownSmtp, ScriptedSmtp, free_port
from tests.support import (
    WorkerProcess,
    fast_retries,
    publish,
    publish_routes,
    read_all,
    route,
    wait_for,
    wait_for_deliveries,
)

pytestmark = pytest.mark.integration

OUTAGE_S = 15.0


def test_smtp_outage_waits_behind_the_circuit_breaker_and_delivers_once(
    isolated: Settings, tmp_path: Path
) -> None:
    """The server is down for 15 s; the email budget (3 attempts, 1 s then 2 s apart)
    would be spent in about 3 s. The circuit opens after 3 failed connections, the
    routes wait in the tiers without spending attempts, a probe now and then checks
    the server, and once it is back every route is delivered exactly once."""
    port = free_port()
    settings = fast_retries(
        isolated,
        tmp_path / "topologies",
        "email",
        smtp_port=port,
        smtp_timeout_s=2.0,
        smtp_breaker_threshold=3,
        smtp_breaker_cooldown_s=2.0,
        smtp_breaker_max_cooldown_s=4.0,
        smtp_connections=1,  # one route at a time: exactly 3 failures open the circuit
    )
    contracts = Contracts(settings)
    routes = [route(f"u{i}", f"user{i}@example.org") for i in range(20)]
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    with DownSmtp(port) as down:
        worker.start()
        try:
            publish_routes(settings, contracts, routes)
            started = time.monotonic()
            wait_for(
                settings,
                "notification.status",
                contracts.status,
                lambda evs: sum(e.reason == "circuit_open" for e in evs) >= 20,
                what="routes held by the open circuit",
            )
            time.sleep(max(OUTAGE_S - (time.monotonic() - started), 0))
            during = read_all(settings, "notification.status", contracts.status)
            assert read_all(settings, "notification.email.dlq", contracts.dead_letter) == []
            # Without the breaker: 20 routes x 3 attempts. With it: the 3 failures that
            # open it, then one probe per cooldown (2 s, then 4 s).
            assert down.connections <= 3 + int(OUTAGE_S / 2) + 1, down.connections
        except BaseException:
            worker.stop()
            raise
    failed = [e for e in during if e.status == "failed"]
    assert len(failed) == 3, [(e.route_id, e.reason) for e in failed]
    assert all(e.reason == "smtp_connection" and e.attempt == 1 for e in failed)
    assert not any(e.status == "dead_lettered" for e in during)

    with ScriptedSmtp(port=port) as smtp:
        try:
            smtp.wait_for(20, timeout_s=60)
            events = wait_for(
                settings,
                "notification.status",
                contracts.status,
                lambda evs: len({e.route_id for e in evs if e.status == "sent"}) == 20,
                what="20 sent routes",
            )
            time.sleep(2)  # anything sent twice would arrive in this time
        finally:
            worker.stop()
        ids = smtp.message_ids()
    assert sorted(ids) == sorted(f"<{r.route_id}@herald.invalid>" for r in routes)
    assert read_all(settings, "notification.email.dlq", contracts.dead_letter) == []
    sent = {e.route_id: e.attempt for e in events if e.status == "sent"}
    # The three routes that opened the circuit spent one attempt; the others none.
    assert sorted(sent.values()) == [1] * 17 + [2] * 3
    assert "smtp circuit open" in worker.log()


def test_broker_restart_under_load_loses_and_repeats_nothing(
    isolated: Settings, tmp_path: Path
) -> None:
    """Intents stream in while the broker stops (cleanly) and comes back 5 s later.
    The worker reconnects by itself, without exiting (the harness restarts nothing);
    every intent is mailed once and pushed once."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("restarts the local broker (scripts/kafka-local); an external one is not ours")
    with ScriptedSmtp() as smtp:
        settings = isolated.model_copy(update={"smtp_port": smtp.port})
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        worker.start()
        ids: list[str] = []
        producer = threading.Thread(target=lambda: ids.extend(publish(settings, 200, 20.0)))
        try:
            producer.start()
            smtp.wait_for(40, timeout_s=120)
            broker("stop")
            time.sleep(5)
            broker("start")
            producer.join(300)
            mails, pushes = wait_for_deliveries(settings, smtp, ids)
        finally:
            producer.join(1)
            worker.stop()
    # No stage crashed on the outage (a run asking the broker for a committed offset
    # got NOT_COORDINATOR and its agent was restarted, dropping its batch: issue 14).
    assert "Crashed reason" not in worker.log()
    assert len(ids) == 200
    assert mails == Counter(ids), {k: v for k, v in mails.items() if v != 1}
    assert pushes == Counter(ids), {k: v for k, v in pushes.items() if v != 1}
    # A broker restart is a transient fault: no route may be dead-lettered by it, nor
    # spend an attempt (issue 14): a push whose gateway write times out while the
    # broker is away waits in the delay tiers (deferred) and is looked up first.
    contracts = Contracts(settings)
    for channel in ("email", "push"):
        dead = read_all(settings, f"notification.{channel}.dlq", contracts.dead_letter)
        assert dead == [], [(d.reason, d.last_error) for d in dead]
    events = read_all(settings, "notification.status", contracts.status)
    assert [e for e in events if e.status == "dead_lettered"] == []
    failed = [e for e in events if e.status == "failed"]
    assert failed == [], [(e.channel, e.reason, e.detail) for e in failed]


def broker(command: str) -> None:
    subprocess.run(
        [str(REPO_ROOT / "scripts" / "kafka-local"), command],
        check=True,
        capture_output=True,
        timeout=180,
    )
