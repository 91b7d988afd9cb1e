"""The HTTP intake (POST /api/v1/notifications) over real HTTP, against the real broker:
what it writes, its answers (202, replay, 409, 400 with every problem, 401, 413, 429,
503), a refusal found by request_id, and an accepted intent followed through a worker."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from pipeline.contracts import Contracts
from pipeline.contracts.records import StatusEvent
from pipeline.ops.reader import read_topic
from pipeline.producer import HeraldProducer
from pipeline.runtime.records import RawRecord
from pipeline.settings import Settings
from pipeline.stages.context import StageContext
from pipeline.stages.intake import Intake
from pipeline.topology import Topology
from pipeline.topology.partitioning import partition_for
from pipeline.web.server import NOTIFICATIONS
from tests.integration.test_login_codes import serve
from tests.smtp import free_port
from tests.support import WorkerProcess

OPERATOR = "operator-token"
GAME_MASTER = "game-master-token"
TURN: dict[str, Any] = {
    "notification_type": "game.turn.ready",
    "recipient_user_ids": ["u-1", "u-2"],
    "payload_json": {"game_id": "g-7", "game_name": "Andromeda", "turn_number": 12},
    "occurred_at_ms": 1_790_000_000_000,
    "request_id": "req-1",
}


def with_tokens(settings: Settings, **updates: Any) -> Settings:
    return settings.model_copy(
        update={
            "api_token": SecretStr(OPERATOR),
            "producer_tokens": {"game-master": SecretStr(GAME_MASTER)},
            **updates,
        }
    )


async def ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(120):
            async with http.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.25)
    pytest.fail("the API never became ready")


@pytest.fixture
async def api(isolated: Settings) -> AsyncIterator[tuple[Settings, str]]:
    settings = with_tokens(isolated)
    runner, url = await serve(settings)
    await ready(url)
    yield settings, url
    await runner.cleanup()


async def post(
    url: str,
    body: Any,
    key: str | None = "turn-12",
    token: str | None = GAME_MASTER,
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}{NOTIFICATIONS}", data=data, headers=headers) as response,
    ):
        return response.status, await response.json(), response.headers


async def get(url: str, path: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    async with aiohttp.ClientSession() as http, http.get(f"{url}{path}", headers=headers) as r:
        return r.status, await r.json()


def intents(settings: Settings) -> list[tuple[bytes | None, int, bytes | None]]:
    return [
        (key, partition, value)
        for partition, _, _, key, value in read_topic(
            settings, settings.topic("notification.intents")
        )
    ]


async def test_an_intent_is_written_once_and_intake_gives_it_the_answered_id(
    api: tuple[Settings, str],
) -> None:
    settings, url = api
    status, body, _ = await post(url, TURN)
    assert status == 202, body
    assert body["replayed"] is False
    nid = body["notification_id"]
    assert body["status_url"] == f"{NOTIFICATIONS}/{nid}"

    # The same key and content: the same id, nothing written again.
    status, again, _ = await post(url, {**TURN, "request_id": "req-2"})
    assert status == 202, again
    assert (again["notification_id"], again["replayed"]) == (nid, True)
    # The same key with other content: 409, nothing written.
    status, conflict, _ = await post(url, {**TURN, "recipient_user_ids": ["u-3"]})
    assert (status, conflict["error"]["code"]) == (409, "idempotency_conflict")

    ((key, partition, value),) = await asyncio.to_thread(intents, settings)
    assert key == b"game-master:turn-12"
    partitions = Topology.load(settings).spec("notification.intents").partitions
    assert partition == partition_for(key, partitions)
    assert value is not None
    intent = Contracts(settings).intent.decode(value)
    assert (intent.producer, intent.idempotency_key, intent.recipient_user_ids) == (
        "game-master",
        "turn-12",
        ["u-1", "u-2"],
    )
    assert json.loads(intent.payload_json)["turn_number"] == 12

    # Intake, given the record as written, accepts it under the id the API answered.
    raw = RawRecord(settings.topic("notification.intents"), partition, 0, 0, key, value)
    outputs = Intake(StageContext.load(settings)).handle(raw, {}, intent.occurred_at_ms)
    contracts = Contracts(settings)
    accepted = [
        contracts.status.decode(o.value)
        for o in outputs
        if o.topic == settings.topic("notification.status")
    ]
    assert [(e.status, e.notification_id) for e in accepted] == [("accepted", nid)]


async def test_every_problem_of_a_bad_intent_in_one_400_and_by_request_id(
    api: tuple[Settings, str],
) -> None:
    settings, url = api
    bad = {
        "notification_type": "game.turn.ready",
        "recipient_user_ids": [],
        "priority": "urgent",
        "colour": "red",
        "payload_json": {"game_id": "g-7", "turn_number": "twelve"},
        "occurred_at_ms": 1_790_000_000_000,
        "request_id": "req-bad",
    }
    status, body, _ = await post(url, bad, key="bad-1")
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert [p["reason"] for p in body["error"]["problems"]] == [
        "unknown_fields",
        "field_type",
    ]
    # The envelope is well formed: every catalog rule intake checks is reported at once.
    fixed = {k: v for k, v in bad.items() if k not in ("colour", "priority")}
    status, body, _ = await post(url, fixed, key="bad-1")
    assert status == 400
    reasons = [p["reason"] for p in body["error"]["problems"]]
    assert reasons == ["empty_recipients", "missing_payload_fields", "payload_field_type"]

    bad_requests: list[tuple[Any, str | None, str]] = [
        (b"{not json", "bad-2", GAME_MASTER),
        ([1, 2], "bad-3", GAME_MASTER),
        ({**TURN, "producer": "someone-else"}, "bad-4", GAME_MASTER),
        ({**TURN, "idempotency_key": "other"}, "bad-5", GAME_MASTER),
        (TURN, None, GAME_MASTER),
        ({**TURN, "occurred_at_ms": True}, "bad-6", GAME_MASTER),
        (TURN, "bad-7", OPERATOR),  # a trusted caller must name the producer
    ]
    for bad_request, key, token in bad_requests:
        status, body, _ = await post(url, bad_request, key=key, token=token)
        assert (status, body["error"]["code"]) == (400, "invalid_request"), bad_request

    status, body, _ = await post(url, TURN, token="wrong")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body, _ = await post(url, TURN, token=None)
    assert status == 401

    # Too large: a payload over HERALD_PAYLOAD_MAX_BYTES, or a body over the API's cap.
    big = {"game_id": "g", "game_name": "x" * settings.payload_max_bytes, "turn_number": 1}
    status, body, _ = await post(url, {**TURN, "payload_json": big}, key="big-1")
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    huge = json.dumps({**TURN, "payload_json": "x" * (3 * settings.payload_max_bytes)})
    status, body, _ = await post(url, huge.encode(), key="big-2")
    assert (status, body["error"]["code"]) == (413, "payload_too_large")

    # Nothing was written, and the refusal is found by its request_id.
    assert await asyncio.to_thread(intents, settings) == []
    for _ in range(100):
        status, found = await get(url, f"{NOTIFICATIONS}?request_id=req-bad")
        if len(found["rejections"]) == 2:
            break
        await asyncio.sleep(0.1)
    assert found["notifications"] == []
    # Two requests named req-bad (the fixed one too): two refusals, each with its reasons.
    rejections = found["rejections"]
    assert {(r["status"], r["producer"], r["idempotency_key"]) for r in rejections} == {
        ("rejected", "game-master", "bad-1")
    }
    assert sorted(r["reason"] for r in rejections) == ["empty_recipients", "unknown_fields"]
    assert any("payload_field_type" in r["detail"] for r in rejections)


async def test_a_key_intake_accepted_from_kafka_conflicts_over_http(
    api: tuple[Settings, str],
) -> None:
    """The API knows keys from the status view, not only from its own writes: another
    replica's, or a Kafka producer's, accepted intent makes a differing POST a 409."""
    settings, url = api
    accepted = StatusEvent(
        event_id="e-1",
        status="accepted",
        at_ms=int(time.time() * 1000),
        notification_id="n-from-kafka",
        notification_type="game.turn.ready",
        producer="game-master",
        idempotency_key="turn-99",
    )
    with HeraldProducer(settings) as producer:
        producer.write(
            settings.topic("notification.status"),
            b"n-from-kafka",
            Contracts(settings).status.encode(accepted),
        )
    for _ in range(100):
        if (await get(url, f"{NOTIFICATIONS}/n-from-kafka"))[0] == 200:
            break
        await asyncio.sleep(0.1)
    status, body, _ = await post(url, TURN, key="turn-99")
    assert (status, body["error"]["code"]) == (409, "idempotency_conflict")
    assert "n-from-kafka" in body["error"]["message"]
    assert await asyncio.to_thread(intents, settings) == []


async def test_a_producer_over_its_rate_gets_429_with_retry_after(
    isolated: Settings, tmp_path: Path
) -> None:
    topologies = tmp_path / "topologies"
    shutil.copytree(isolated.topology_dir, topologies)
    (topologies / "limits.yaml").write_text(
        "producers:\n  game-master: {per_second: 0.2, burst: 3}\n"
    )
    settings = with_tokens(isolated, topology_dir=topologies)
    runner, url = await serve(settings)
    try:
        await ready(url)
        answers = [(await post(url, TURN, key=f"turn-{i}"))[::2] for i in range(5)]
    finally:
        await runner.cleanup()
    assert [status for status, _ in answers] == [202, 202, 202, 429, 429]
    retry_after = int(answers[3][1]["Retry-After"])
    assert 1 <= retry_after <= 5
    assert len(await asyncio.to_thread(intents, settings)) == 3


async def test_503_when_kafka_is_unreachable(tmp_path: Path) -> None:
    settings = with_tokens(
        Settings(
            kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
            state_dir=tmp_path,
            api_kafka_timeout_s=1.0,
        )
    )
    runner, url = await serve(settings)
    try:
        status, body, _ = await post(url, TURN)
        assert (status, body["error"]["code"]) == (503, "service_unavailable")
    finally:
        await runner.cleanup()


async def test_a_posted_intent_is_accepted_by_a_worker_under_its_id(
    api: tuple[Settings, str], tmp_path: Path
) -> None:
    settings, url = api
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        status, body, _ = await post(url, TURN, key="turn-e2e")
        assert status == 202, body
        nid = body["notification_id"]
        found: dict[str, Any] = {}
        for _ in range(600):
            code, found = await get(url, f"{NOTIFICATIONS}/{nid}")
            if code == 200 and found["status"] == "accepted":
                break
            await asyncio.sleep(0.1)
    finally:
        worker.stop()
    assert (found["status"], found["producer"], found["request_id"]) == (
        "accepted",
        "game-master",
        "req-1",
    )
    status, by_request = await get(url, f"{NOTIFICATIONS}?request_id=req-1")
    assert [n["notification_id"] for n in by_request["notifications"]] == [nid]
