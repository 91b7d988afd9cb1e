"""The login-code REST intake over real HTTP, against the real broker: sent, suppressed,
409, 400, 401 and 503 answers, and its mail overtaking a backlog of bulk mail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from pipeline.contracts import Contracts
from pipeline.ops.reader import read_topic
from pipeline.settings import Settings
from pipeline.web.server import INTAKE, LOGIN_CODES, create_app
from tests.smtp import ScriptedSmtp, free_port
from tests.support import WorkerProcess, publish_routes, route

TOKEN = "test-token"


async def serve(settings: Settings) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def api(isolated: Settings) -> AsyncIterator[tuple[web.AppRunner, str]]:
    """The API, serving ``isolated`` with a token, once it reports ready."""
    runner, url = await serve(isolated.model_copy(update={"api_token": SecretStr(TOKEN)}))
    async with aiohttp.ClientSession() as http:
        for _ in range(120):
            async with http.get(f"{url}/readyz") as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.25)
        else:
            pytest.fail("the API never became ready")
    yield runner, url
    await runner.cleanup()


async def post(
    url: str, body: Any, key: str | None = "k-1", token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}{LOGIN_CODES}", data=data, headers=headers) as response,
    ):
        return response.status, await response.json()


CODE = {"email": "player@example.org", "code": "493021", "locale": "de-AT"}


async def test_login_code_answers(isolated: Settings, api: tuple[web.AppRunner, str]) -> None:
    runner, url = api
    assert await post(url, CODE) == (200, {"outcome": "sent"})
    assert await post(url, CODE) == (200, {"outcome": "sent"})  # same key, same body
    status, body = await post(url, {**CODE, "code": "111111"})
    assert (status, body["error"]["code"]) == (409, "idempotency_conflict")

    bad_requests: list[tuple[Any, str | None]] = [
        (b"{not json", "k-2"),
        ({**CODE, "extra": "x"}, "k-3"),
        ({"email": "player@example.org", "code": "1"}, "k-4"),
        ({**CODE, "email": "a@example.org\r\nBcc: evil@example.org"}, "k-5"),
        ({**CODE, "code": "12 34"}, "k-6"),
        (CODE, None),
    ]
    for bad, key in bad_requests:
        status, body = await post(url, bad, key=key)
        assert (status, body["error"]["code"]) == (400, "invalid_request"), bad
    status, body = await post(url, CODE, key="k-7", token="wrong")
    assert (status, body["error"]["code"]) == (401, "unauthorized")

    # Suppressed: the intake answers so, and writes no route.
    intake = runner.app[INTAKE]
    await KafkaWrite(isolated).suppress("blocked@example.org")
    for _ in range(100):
        if intake.suppressions.reason("blocked@example.org"):
            break
        await asyncio.sleep(0.1)
    blocked = {**CODE, "email": "Blocked@Example.org"}
    assert await post(url, blocked, key="k-8") == (200, {"outcome": "suppressed"})
    assert await post(url, blocked, key="k-8") == (200, {"outcome": "suppressed"})

    contracts = Contracts(isolated)
    routes = [
        contracts.channel_request.decode(value)
        for *_, value in read_topic(isolated, isolated.topic("notification.email.priority"))
    ]
    assert len(routes) == 1
    (login,) = routes
    assert (login.address, login.template_id, login.locale, login.priority) == (
        "player@example.org",
        "auth.login_code",
        "de",
        "critical",
    )
    assert json.loads(login.variables_json) == {"code": "493021"}
    statuses = [
        contracts.status.decode(value).status
        for *_, value in read_topic(isolated, isolated.topic("notification.status"))
    ]
    assert sorted(statuses) == ["accepted", "accepted", "routed", "suppressed"]


class KafkaWrite:
    """Writes a suppression the way `herald suppress add` does."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def suppress(self, address: str) -> None:
        from pipeline.views import SuppressionList
        from pipeline.web.writer import RequestWriter

        writer = RequestWriter(self.settings)
        try:
            await writer.deliver([SuppressionList(self.settings).entry(address, "test", "test")])
        finally:
            await writer.close()


async def test_login_code_is_refused_with_503_when_kafka_is_unreachable(tmp_path: Path) -> None:
    settings = Settings(
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
        state_dir=tmp_path,
        api_kafka_timeout_s=1.0,
    )
    runner, url = await serve(settings)
    try:
        status, body = await post(url, CODE, token=None)
        assert (status, body["error"]["code"]) == (503, "service_unavailable")
        async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["checks"]["broker"] is False
    finally:
        await runner.cleanup()


async def test_login_code_mail_overtakes_a_bulk_backlog(
    isolated: Settings, api: tuple[web.AppRunner, str], tmp_path: Path
) -> None:
    contracts = Contracts(isolated)
    with ScriptedSmtp(delay_s=0.05) as smtp:
        worker = WorkerProcess(
            isolated.model_copy(update={"smtp_port": smtp.port}), tmp_path / "worker.log"
        )
        worker.start()
        try:
            backlog = [route(f"bulk-{i}", f"bulk{i}@example.org") for i in range(150)]
            await asyncio.to_thread(publish_routes, isolated, contracts, backlog)
            await asyncio.to_thread(smtp.wait_for, 5, 90.0)  # the backlog is draining
            _, url = api
            assert await post(url, CODE, key="urgent") == (200, {"outcome": "sent"})
            received = await asyncio.to_thread(smtp.wait_for, 1, 30.0, "player@example.org")
            order = [rcpt for rcpt, _ in received]
        finally:
            worker.stop()
    assert "player@example.org" in order, "the login code never arrived"
    position = order.index("player@example.org")
    assert position < 75, f"the login code waited behind {position} bulk mails"
    (mail,) = smtp.mails_to("player@example.org")
    assert mail["Subject"] == "Dein Anmeldecode"
    assert "493021" in str(mail.get_body(("plain",)).get_content())  # type: ignore[union-attr]
