"""The HTTP channels' POST against a real local aiohttp server: every answer an
endpoint may give, classified."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from pipeline.errors import (
    EndpointGoneError,
    HttpConnectionError,
    HttpDeferredError,
    HttpRejectedError,
    HttpTimeoutError,
)
from pipeline.providers.http import MAX_RETRY_AFTER_S, HttpPoster, HttpReceipt, retry_after_s
from pipeline.settings import Settings
from tests.unit.helpers import served

received: list[tuple[bytes, dict[str, str]]] = []


async def answer(request: web.Request) -> web.StreamResponse:
    received.append((await request.read(), dict(request.headers)))
    kind = request.match_info["kind"]
    if kind == "ok":
        return web.Response(status=202, text="queued")
    if kind == "slow":
        await asyncio.sleep(1)
        return web.Response(status=200)
    if kind == "redirect":
        raise web.HTTPFound("/ok")
    status = int(kind)
    headers = {"Retry-After": request.query["after"]} if "after" in request.query else {}
    return web.Response(status=status, text=f"status {status}", headers=headers)


@pytest.fixture
async def endpoint() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/{kind}", answer)
    received.clear()
    async with served(app) as url:
        yield url


@pytest.fixture
async def poster() -> AsyncIterator[HttpPoster]:
    http = HttpPoster(Settings(http_timeout_s=10))
    yield http
    await http.close()


async def test_a_2xx_is_delivered_with_body_and_headers_as_sent(
    endpoint: str, poster: HttpPoster
) -> None:
    receipt = await poster.post(f"{endpoint}/ok", b'{"a": 1}', {"webhook-id": "r-1"})
    assert receipt == HttpReceipt(202, "queued")
    [(body, headers)] = received
    assert body == b'{"a": 1}'
    assert headers["webhook-id"] == "r-1"


@pytest.mark.parametrize(
    ("path", "error", "retry_after"),
    [
        ("410", EndpointGoneError, None),
        ("429?after=7", HttpDeferredError, 7.0),
        ("503?after=99999999", HttpDeferredError, MAX_RETRY_AFTER_S),
        ("500", HttpDeferredError, None),
        ("408", HttpDeferredError, None),
        ("400", HttpRejectedError, None),
        ("404", HttpRejectedError, None),
        ("redirect", HttpRejectedError, None),
    ],
)
async def test_every_other_answer_is_classified(
    endpoint: str, poster: HttpPoster, path: str, error: type[Exception], retry_after: Any
) -> None:
    with pytest.raises(error) as info:
        await poster.post(f"{endpoint}/{path}", b"{}", {})
    assert getattr(info.value, "retry_after_s", None) == retry_after
    assert len(received) == 1  # a redirect is not followed


async def test_silence_and_absence_are_transient_and_count_as_the_endpoint_away(
    endpoint: str, poster: HttpPoster
) -> None:
    impatient = HttpPoster(Settings(http_timeout_s=0.2))
    with pytest.raises(HttpTimeoutError) as slow:
        await impatient.post(f"{endpoint}/slow", b"{}", {})
    await impatient.close()
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(HttpConnectionError) as refused:
        await poster.post(f"http://127.0.0.1:{port}/ok", b"{}", {})
    for error in (slow.value, refused.value):
        assert error.transient
        assert error.server_unavailable


def test_retry_after_as_seconds_or_an_http_date() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s("Tue, 01 Dec 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_s("Tue, 01 Dec 2026 11:00:00 GMT", now) == 0.0
    assert retry_after_s("soon", now) is None
    assert retry_after_s(None, now) is None
