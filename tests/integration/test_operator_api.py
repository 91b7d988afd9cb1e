"""The operator API over real HTTP, against a real worker and broker: it finds
notifications by id and by request_id, shows a delivery's attempt history, filters and
paginates without gaps or repeats, guards itself with the operator token, and
rebuilds its view from the status topic after losing it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from pipeline.contracts import Contracts
from pipeline.contracts.records import PushDevice, UserProfile
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.web.server import create_app
from tests.smtp import free_port
from tests.support import WorkerProcess, wait_for

pytestmark = pytest.mark.integration

TOKEN = "operator-secret"
USERS = [f"p{i}" for i in range(12)]


async def serve(settings: Settings) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(240):
            async with http.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return runner, url
            await asyncio.sleep(0.25)
    await runner.cleanup()
    pytest.fail("the API never became ready")


async def get(url: str, path: str, token: str | None = TOKEN, **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}{path}", params=params, headers=headers) as response,
    ):
        return response.status, await response.json()


async def resend(url: str, route_id: str, key: str, **params: str) -> tuple[int, Any]:
    """POST a delivery's resend as an operator, with ``key`` as its Idempotency-Key."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/api/v1/deliveries/{route_id}/resend",
            params=params,
            headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key},
        ) as response,
    ):
        return response.status, await response.json()


@pytest.fixture
def populated(isolated: Settings, tmp_path: Path) -> Settings:
    """A worker has handled intents for 12 users (push and email each), one intent with
    a request_id, and stopped."""
    settings = isolated.model_copy(
        update={"email_provider": "stub", "operator_token": SecretStr(TOKEN)}
    )
    contracts = Contracts(settings)
    with HeraldProducer(settings, contracts) as herald:
        for user in USERS:
            herald.put_user(
                UserProfile(
                    user_id=user, email=f"{user}@example.org", push_devices=[PushDevice(token=user)]
                )
            )
        for index, user in enumerate(USERS):
            herald.publish_intent(
                notification_type="game.turn.ready",
                producer="game-master",
                idempotency_key=f"turn-{user}",
                recipient_user_ids=[user],
                payload={"game_id": "g", "game_name": "Andromeda", "turn_number": index},
                request_id="req-42" if user == "p3" else None,
                tenant_id="acme" if index % 2 else None,
            )
        # refused at intake (a required payload field missing), same request
        herald.publish_intent(
            notification_type="game.turn.ready",
            producer="game-master",
            idempotency_key="turn-refused",
            recipient_user_ids=["p3"],
            payload={"game_id": "g"},
            request_id="req-42",
        )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        wait_for(
            settings,
            "notification.status",
            contracts.status,
            lambda evs: (
                len({e.route_id for e in evs if e.status in ("sent", "published")})
                >= 2 * len(USERS)
            ),
            timeout_s=90,
            what="every delivery done",
        )
    finally:
        worker.stop()
    return settings


@pytest.fixture
async def api(populated: Settings) -> AsyncIterator[str]:
    runner, url = await serve(populated)
    yield url
    await runner.cleanup()


async def test_lookups_filters_and_pages(populated: Settings, api: str) -> None:
    status, found = await get(api, "/api/v1/notifications", request_id="req-42")
    assert status == 200
    (notification,) = found["notifications"]
    (refused,) = found["rejections"]
    assert (refused["status"], refused["idempotency_key"], refused["reason"]) == (
        "rejected",
        "turn-refused",
        "missing_payload_fields",
    )
    assert notification["status"] == "accepted"
    assert notification["idempotency_key"] == "turn-p3"
    assert {(d["channel"], d["status"], d["attempts"]) for d in notification["deliveries"]} == {
        ("email", "sent", 1),
        ("push", "published", 1),
    }
    status, same = await get(api, f"/api/v1/notifications/{notification['notification_id']}")
    assert status == 200
    assert same["deliveries"] == notification["deliveries"]

    mail = next(d for d in notification["deliveries"] if d["channel"] == "email")
    status, delivery = await get(api, f"/api/v1/deliveries/{mail['route_id']}")
    assert status == 200
    assert [(e["status"], e["attempt"]) for e in delivery["history"]] == [
        ("routed", 0),
        ("rendered", 1),
        ("sent", 1),
    ]

    # Every delivery, 5 at a time: each exactly once.
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 5}
    while True:
        status, page = await get(api, "/api/v1/deliveries", **params)
        assert status == 200
        seen.extend(d["route_id"] for d in page["deliveries"])
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 2 * len(USERS)

    status, pushes = await get(api, "/api/v1/deliveries", channel="push", status="published")
    assert len(pushes["deliveries"]) == len(USERS)
    status, mine = await get(api, "/api/v1/deliveries", recipient="p7", type="game.turn.ready")
    assert {d["channel"] for d in mine["deliveries"]} == {"email", "push"}
    status, none = await get(api, "/api/v1/deliveries", since="2999-01-01T00:00:00")
    assert none["deliveries"] == []
    # The tenant travels from the intent to every delivery, and filters them.
    status, acme = await get(api, "/api/v1/deliveries", tenant_id="acme", limit=100)
    assert {d["user_id"] for d in acme["deliveries"]} == set(USERS[1::2])
    assert len(acme["deliveries"]) == len(USERS)  # email and push each
    assert {d["tenant_id"] for d in acme["deliveries"]} == {"acme"}
    assert notification["tenant_id"] == "acme"  # p3
    assert mail["template_version"] is not None  # what the mail rendered

    assert (await get(api, "/api/v1/deliveries/no-such-route"))[0] == 404
    assert (await get(api, "/api/v1/deliveries", cursor="garbage"))[0] == 400
    assert (await get(api, "/api/v1/deliveries", limit=0))[0] == 400
    assert (await get(api, "/api/v1/notifications"))[0] == 400
    assert (await get(api, "/api/v1/deliveries", token=None))[0] == 401
    assert (await get(api, "/api/v1/deliveries", token="wrong"))[0] == 401
    status, document = await get(api, "/api/v1/openapi.json", token=None)
    assert status == 200
    assert "/api/v1/deliveries" in document["paths"]

    # Lookups are local reads: print what they take here (the target is < 100 ms).
    started = time.perf_counter()
    for _ in range(20):
        await get(api, f"/api/v1/deliveries/{mail['route_id']}")
    print(f"delivery lookup over HTTP: {(time.perf_counter() - started) / 20 * 1000:.1f} ms")


async def test_the_view_rebuilds_from_the_topic_after_a_loss(populated: Settings) -> None:
    runner, url = await serve(populated)
    try:
        _, before = await get(url, "/api/v1/deliveries", limit=500)
    finally:
        await runner.cleanup()
    populated.status_db_path.unlink()
    runner, url = await serve(populated)
    try:
        _, after = await get(url, "/api/v1/deliveries", limit=500)
    finally:
        await runner.cleanup()
    assert len(before["deliveries"]) == 2 * len(USERS)
    assert after == before


async def test_a_finished_delivery_is_resent_as_a_linked_clone(
    populated: Settings, tmp_path: Path
) -> None:
    contracts = Contracts(populated)
    runner, url = await serve(populated)
    worker = WorkerProcess(populated, tmp_path / "worker-2.log")
    worker.start()
    try:
        _, found = await get(url, "/api/v1/deliveries", recipient="p5", channel="email")
        (original,) = found["deliveries"]
        _, before = await get(url, f"/api/v1/deliveries/{original['route_id']}")
        status, clone = await resend(url, original["route_id"], "ops-ticket-17")
        assert status == 202
        assert clone["resend_of"] == original["route_id"]
        assert clone["route_id"] != original["route_id"]
        assert (await resend(url, original["route_id"], "ops-ticket-17"))[1]["route_id"] == (
            clone["route_id"]
        )

        events = await asyncio.to_thread(
            wait_for,
            populated,
            "notification.status",
            contracts.status,
            lambda evs: any(e.route_id == clone["route_id"] and e.status == "sent" for e in evs),
            what="the clone sent",
        )
        sent = [e for e in events if e.route_id == clone["route_id"] and e.status == "sent"]
        assert len(sent) == 1  # the same key resent once
        for _ in range(40):
            status, copy = await get(url, f"/api/v1/deliveries/{clone['route_id']}")
            if status == 200 and copy["status"] == "sent":
                break
            await asyncio.sleep(0.25)
        assert copy["resend_of"] == original["route_id"]
        assert [e["status"] for e in copy["history"]] == ["routed", "rendered", "sent"]
        _, after = await get(url, f"/api/v1/deliveries/{original['route_id']}")
        assert after == before  # the original's history is untouched
        assert (await resend(url, original["route_id"], "other"))[0] == 202  # a new key
    finally:
        worker.stop()
        await runner.cleanup()
