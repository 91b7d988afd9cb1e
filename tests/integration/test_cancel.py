"""Cancelling a notification over HTTP, against a real worker, broker and SMTP server:
a route waiting out quiet hours ends `cancelled` and is never mailed, while the same
user's other notification, waiting beside it, is sent."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr

from pipeline.contracts import Contracts
from pipeline.contracts.records import QuietHours, StatusEvent, UserProfile
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.web.server import NOTIFICATIONS
from tests.integration.test_http_intake import ready
from tests.integration.test_login_codes import serve
from tests.smtp import ScriptedSmtp
from tests.support import WorkerProcess, read_all

OPERATOR = "operator-token"
TOKENS = {"game-master": SecretStr("gm-token"), "lobby": SecretStr("lobby-token")}
TURN = {"game_id": "g-1", "game_name": "Andromeda", "turn_number": 4}


async def cancel(url: str, notification_id: str, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}{NOTIFICATIONS}/{notification_id}/cancel", headers=headers) as r,
    ):
        return r.status, await r.json()


def final(events: list[StatusEvent], notification_id: str) -> set[tuple[str | None, str]]:
    return {
        (e.channel, e.status)
        for e in events
        if e.notification_id == notification_id
        and e.status in ("sent", "cancelled", "skipped", "dead_lettered")
    }


async def test_a_cancelled_notification_waiting_out_quiet_hours_is_never_sent(
    isolated: Settings, tmp_path: Path
) -> None:
    # The worker believes it is 06:59:25 UTC (its start takes ~10 s of that); the user
    # is quiet until 07:00 UTC.
    real = datetime.now(UTC)
    pretend = real.replace(hour=6, minute=59, second=25, microsecond=0)
    offset_ms = int((pretend - real) / timedelta(milliseconds=1))
    contracts = Contracts(isolated)
    with ScriptedSmtp() as smtp:
        settings = isolated.model_copy(
            update={
                "clock_offset_ms": offset_ms,
                "smtp_port": smtp.port,
                "api_token": SecretStr(OPERATOR),
                "producer_tokens": TOKENS,
            }
        )
        runner, url = await serve(settings)
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        worker.start()
        try:
            await ready(url)
            with HeraldProducer(settings, contracts) as herald:
                herald.put_user(
                    UserProfile(
                        user_id="night",
                        email="night@example.org",
                        timezone="UTC",
                        quiet_hours=QuietHours(start="22:00", end="07:00"),
                    )
                )
                await asyncio.sleep(1.0)
                doomed = herald.publish_intent(
                    notification_type="game.turn.ready",
                    producer="game-master",
                    idempotency_key="doomed",
                    recipient_user_ids=["night"],
                    payload=TURN,
                )
                herald.publish_intent(
                    notification_type="game.turn.ready",
                    producer="game-master",
                    idempotency_key="kept",
                    recipient_user_ids=["night"],
                    payload=TURN,
                )
            assert doomed is not None
            # Both wait out the quiet hours; the API's view learns of them.
            deferred: dict[str, str] = {}
            for _ in range(300):
                events = await asyncio.to_thread(
                    read_all, settings, "notification.status", contracts.status
                )
                deferred = {
                    e.idempotency_key or "": e.notification_id or ""
                    for e in events
                    if e.status == "accepted"
                }
                waiting = {e.notification_id for e in events if e.status == "deferred"}
                if len(deferred) == 2 and set(deferred.values()) <= waiting:
                    break
                await asyncio.sleep(0.2)
            assert set(deferred) == {"doomed", "kept"}, f"not both deferred: {deferred}"
            nid, kept = deferred["doomed"], deferred["kept"]

            # Who may cancel: an operator, or the notification's own producer.
            assert (await cancel(url, nid, None))[0] == 401
            status, body = await cancel(url, nid, "lobby-token")
            assert (status, body["error"]["code"]) == (403, "forbidden")
            assert (await cancel(url, "no-such-notification", OPERATOR))[0] == 404
            for _ in range(100):  # until the API's view has the deferred route
                status, body = await cancel(url, nid, "gm-token")
                if status == 202 and body["pending_routes"]:
                    break
                await asyncio.sleep(0.1)
            assert (status, body["status"]) == (202, "cancel_requested")
            assert len(body["pending_routes"]) == 1  # the email route (push: no device)
            cancelled_at = time.monotonic()

            # The window ends ~35 s after the worker's start: the kept one is mailed,
            # the cancelled one ends `cancelled` when it comes back from its wait.
            await asyncio.to_thread(smtp.wait_for, 1, 90.0, "night@example.org")
            for _ in range(300):
                events = await asyncio.to_thread(
                    read_all, settings, "notification.status", contracts.status
                )
                if ("email", "cancelled") in final(events, nid):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)  # time for a wrong second mail to arrive
        finally:
            worker.stop()
            await runner.cleanup()
        mails = smtp.mails_to("night@example.org")
    assert final(events, nid) == {("email", "cancelled"), ("push", "skipped")}
    assert final(events, kept) == {("email", "sent"), ("push", "skipped")}
    assert len(mails) == 1
    assert kept in mails[0]["X-Herald-Notification-Id"]
    assert time.monotonic() - cancelled_at > 1  # it was settled after the cancel
    requested = [e for e in events if e.status == "cancel_requested"]
    assert [(e.notification_id, e.detail) for e in requested] == [(nid, "by producer game-master")]
