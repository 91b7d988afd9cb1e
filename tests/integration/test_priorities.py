"""Priorities decide lanes: a backlog of low mail, from intents through the whole
pipeline, never delays a high one (issue 16, item 2)."""

from __future__ import annotations

from pathlib import Path

from pipeline.contracts import Contracts
from pipeline.contracts.records import UserProfile
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from tests.smtp import ScriptedSmtp
from tests.support import TURN, WorkerProcess

BACKLOG = 300


def test_a_high_mail_overtakes_a_backlog_of_low_ones(isolated: Settings, tmp_path: Path) -> None:
    contracts = Contracts(isolated)
    # 4 connections per lane, 0.1 s a mail: the low backlog takes ~8 s to drain.
    with ScriptedSmtp(delay_s=0.1) as smtp:
        settings = isolated.model_copy(update={"smtp_port": smtp.port})
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        worker.start()
        try:
            with HeraldProducer(settings, contracts) as herald:
                herald.put_user(UserProfile(user_id="crowd", email="crowd@example.org"))
                herald.put_user(UserProfile(user_id="vip", email="vip@example.org"))
            smtp.wait_for(0, 1)
            with HeraldProducer(settings, contracts) as herald:
                for n in range(BACKLOG):
                    herald.publish_intent(
                        notification_type="game.turn.ready",
                        producer="newsletter",
                        idempotency_key=f"low-{n}",
                        recipient_user_ids=["crowd"],
                        payload=TURN,
                        priority="low",
                        wait=False,
                    )
            smtp.wait_for(10, 90.0)  # the backlog is draining
            with HeraldProducer(settings, contracts) as herald:
                herald.publish_intent(
                    notification_type="game.turn.ready",
                    producer="game-master",
                    idempotency_key="urgent",
                    recipient_user_ids=["vip"],
                    payload=TURN,
                    priority="high",
                )
            received = smtp.wait_for(1, 60.0, "vip@example.org")
        finally:
            worker.stop()
    order = [rcpt for rcpt, _ in received]
    position = order.index("vip@example.org")
    # Behind the low lane it would be number 301; in its own lane it is sent at once.
    assert position < BACKLOG // 4, f"the high mail waited behind {position} low ones"
    assert order.count("crowd@example.org") < BACKLOG  # the backlog was not yet drained
