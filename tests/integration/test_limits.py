"""Limits of topologies/limits.yaml against real workers, broker and SMTP server: a
user limit holds routes over it for the next window (never drops them), and a
channel's provider rate holds across two workers together."""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from pipeline.contracts import Contracts
from pipeline.contracts.records import UserProfile
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from tests.integration.test_scale_out import start_workers, wait_for_group
from tests.smtp import ScriptedSmtp
from tests.support import TURN, WorkerProcess, read_all, wait_for


def with_limits(settings: Settings, folder: Path, limits: dict[str, object]) -> Settings:
    shutil.copytree(settings.topology_dir, folder)
    (folder / "limits.yaml").write_text(yaml.safe_dump(limits))
    return settings.model_copy(update={"topology_dir": folder})


def test_a_user_limit_holds_routes_for_the_next_window(isolated: Settings, tmp_path: Path) -> None:
    window_s = 10
    limited = with_limits(
        isolated,
        tmp_path / "topologies",
        {"users": [{"channel": "email", "category": "game", "max": 2, "per": f"{window_s}s"}]},
    )
    contracts = Contracts(limited)
    with ScriptedSmtp() as smtp:
        settings = limited.model_copy(update={"smtp_port": smtp.port})
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        worker.start()
        try:
            with HeraldProducer(settings, contracts) as herald:
                herald.put_user(UserProfile(user_id="fan", email="fan@example.org"))
                herald.put_user(UserProfile(user_id="probe", email="probe@example.org"))
                # The worker is up and routing once a probe's mail arrives.
                herald.publish_intent(
                    notification_type="game.turn.ready",
                    producer="game-master",
                    idempotency_key="probe",
                    recipient_user_ids=["probe"],
                    payload=TURN,
                )
                smtp.wait_for(1, 90, "probe@example.org")
                # Published at the start of a window, so that all five fall in it.
                time.sleep(window_s - time.time() % window_s + 0.2)
                for n in range(5):
                    herald.publish_intent(
                        notification_type="game.turn.ready",
                        producer="game-master",
                        idempotency_key=f"turn-{n}",
                        recipient_user_ids=["fan"],
                        payload=TURN,
                        wait=False,
                    )
            smtp.wait_for(5, 3 * window_s + 30, "fan@example.org")
        finally:
            worker.stop()
    # Two in the first window, two in the next, the last in the one after (a tier may
    # release a route up to 50 ms before it is due).
    wall = time.time() - time.monotonic()
    fan = [
        at
        for (rcpt, _), at in zip(smtp.received, smtp.accepted_at, strict=True)
        if rcpt == "fan@example.org"
    ]
    arrived = sorted(int((at + wall + 0.1) // window_s) for at in fan)
    assert [w - arrived[0] for w in arrived] == [0, 0, 1, 1, 2]
    events = read_all(settings, "notification.status", contracts.status)
    held = [e for e in events if e.status == "deferred" and e.channel == "email"]
    assert sorted(e.reason or "" for e in held) == ["rate_limited"] * 3
    assert len([e for e in events if e.status == "sent"]) == 6  # with the probe


def test_a_channel_rate_holds_across_two_workers(isolated: Settings, tmp_path: Path) -> None:
    per_second, mails = 8, 48
    limited = with_limits(
        isolated,
        tmp_path / "topologies",
        {"channels": {"email": {"per_second": per_second, "burst": 2}}},
    )
    contracts = Contracts(limited)
    with ScriptedSmtp() as smtp, ExitStack() as stack:
        settings = limited.model_copy(update={"smtp_port": smtp.port})
        start_workers(settings, 2, tmp_path, stack)
        wait_for_group(settings, 2)
        with HeraldProducer(settings, contracts) as herald:
            for n in range(mails):  # one user each: spread over every partition
                herald.put_user(UserProfile(user_id=f"u{n}", email=f"u{n}@example.org"))
            time.sleep(1.0)
            for n in range(mails):
                herald.publish_intent(
                    notification_type="game.turn.ready",
                    producer="game-master",
                    idempotency_key=f"turn-{n}",
                    recipient_user_ids=[f"u{n}"],
                    payload=TURN,
                    wait=False,
                )
        smtp.wait_for(mails, 120)
        times = sorted(smtp.accepted_at)
    # Unpaced, 48 mails take well under a second; at 8/s, about 6 s.
    assert times[-1] - times[0] >= (mails - 2 * 2) / per_second * 0.8
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= per_second + 2 * 2, f"{busiest} mails in one second"
    events = read_all(settings, "notification.status", contracts.status)
    paced = [e for e in events if e.status == "sent" and e.reason == "paced"]
    assert len(paced) > mails / 2  # most waited for the rate, and say so


def test_a_user_limit_holds_across_a_worker_restart(isolated: Settings, tmp_path: Path) -> None:
    """The counts are in the route stage's changelogged table: a new worker (after a
    SIGKILL) goes on counting where the first stopped."""
    hour_s = 3600
    limited = with_limits(
        isolated,
        tmp_path / "topologies",
        {"users": [{"channel": "email", "max": 2, "per": "1h"}]},
    )
    contracts = Contracts(limited)
    if hour_s - time.time() % hour_s < 90:  # all of it within one clock hour
        time.sleep(hour_s - time.time() % hour_s + 1)
    with ScriptedSmtp() as smtp:
        settings = limited.model_copy(update={"smtp_port": smtp.port})
        first = WorkerProcess(settings, tmp_path / "first.log")
        first.start()
        with HeraldProducer(settings, contracts) as herald:
            herald.put_user(UserProfile(user_id="fan", email="fan@example.org"))
            time.sleep(1.0)
            for n in range(2):
                herald.publish_intent(
                    notification_type="game.turn.ready",
                    producer="game-master",
                    idempotency_key=f"turn-{n}",
                    recipient_user_ids=["fan"],
                    payload=TURN,
                )
        smtp.wait_for(2, 60, "fan@example.org")
        # Killed only once both sends are recorded: a kill between the server's 250 and
        # the `sent` record leaves the route in doubt, and it is sent again (email.md),
        # which is not what this test is about.
        wait_for(
            settings,
            "notification.status",
            contracts.status,
            lambda events: sum(e.status == "sent" for e in events) == 2,
            what="both routes recorded sent",
        )
        first.kill()
        second = WorkerProcess(settings, tmp_path / "second.log")
        second.start()
        try:
            with HeraldProducer(settings, contracts) as herald:
                herald.publish_intent(
                    notification_type="game.turn.ready",
                    producer="game-master",
                    idempotency_key="turn-2",
                    recipient_user_ids=["fan"],
                    payload=TURN,
                )
            deadline = time.monotonic() + 60
            while True:
                events = read_all(settings, "notification.status", contracts.status)
                third = [
                    e for e in events if e.idempotency_key == "turn-2" and e.channel == "email"
                ]
                if third:
                    break
                assert time.monotonic() < deadline, "the third route was never decided"
                time.sleep(0.3)
        finally:
            second.stop()
    assert [(e.status, e.reason) for e in third] == [("deferred", "rate_limited")]
    assert len(smtp.mails_to("fan@example.org")) == 2
