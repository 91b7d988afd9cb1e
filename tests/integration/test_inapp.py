"""The in-app channel end to end: a worker puts each notification in its user's inbox
once, and the API lists it, pages it, marks entries read and unread, marks all read
and counts the unread ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.contracts import Contracts
from pipeline.contracts.inbox import decode_entry
from pipeline.ops.reader import read_topic
from pipeline.settings import Settings
from tests.channels import publish
from tests.integration.test_operator_api import serve
from tests.support import WorkerProcess, fast_retries, wait_for, with_types

pytestmark = pytest.mark.integration

NEWS = "shop.news"


async def call(url: str, method: str, path: str, **params: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{url}{path}", params=params) as response,
    ):
        return response.status, await response.json()


async def test_the_inbox_holds_each_notification_once_and_tracks_what_was_read(
    isolated: Settings, tmp_path: Path
) -> None:
    fast = fast_retries(isolated, tmp_path / "topologies", "inapp")
    settings = with_types(
        fast,
        tmp_path,
        {
            NEWS: {
                "category": "shop",
                "channels": {"user": ["inapp"]},
                "required": {"order_id": "string"},
            }
        },
        {NEWS: {"inapp_title": "News {{ order_id }}", "inapp_body": "Body of {{ order_id }}"}},
    )
    contracts = Contracts(settings)
    users: dict[str, dict[str, str]] = {"reader": {}}
    # Five notifications for one user, in five intents.
    for index in range(5):
        publish(
            settings,
            users,
            kind=NEWS,
            payloads={"reader": {"order_id": f"n{index}"}},
            key=f"news-{index}",
        )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        wait_for(
            settings,
            "notification.status",
            contracts.status,
            lambda got: sum(e.channel == "inapp" and e.status == "sent" for e in got) >= 5,
            timeout_s=90,
        )
    finally:
        worker.stop()
    records = list(read_topic(settings, settings.topic("notification.inapp.inbox")))
    keys = {key for *_, key, value in records if value is not None}
    assert len(keys) == 5  # one key per notification, however often written

    runner, url = await serve(settings)
    try:
        path = "/api/v1/users/reader/inbox"
        status, page = await call(url, "GET", path, limit=2)
        assert status == 200
        assert page["unread_count"] == 5
        status, rest = await call(url, "GET", path, limit=10, cursor=page["next_cursor"])
        assert rest["next_cursor"] is None
        listed = page["entries"] + rest["entries"]
        # Newest first (as they arrived in the inbox), each once across the pages.
        assert sorted(e["title"] for e in listed) == [f"News n{i}" for i in range(5)]
        arrived = [e["created_at_ms"] for e in listed]
        assert arrived == sorted(arrived, reverse=True)
        first = page["entries"][0]
        number = first["title"].removeprefix("News ")
        assert (first["body"], first["read"], first["notification_type"]) == (
            f"Body of {number}",
            False,
            NEWS,
        )

        status, read = await call(url, "POST", f"{path}/{first['notification_id']}/read")
        assert (status, read["read"]) == (200, True)
        status, count = await call(url, "GET", f"{path}/unread-count")
        assert count["unread_count"] == 4
        status, unread = await call(url, "GET", path, unread="true")
        assert len(unread["entries"]) == 4
        assert first["notification_id"] not in {e["notification_id"] for e in unread["entries"]}

        status, again = await call(url, "POST", f"{path}/{first['notification_id']}/unread")
        assert again["read"] is False
        status, all_read = await call(url, "POST", f"{path}/read-all")
        assert (status, all_read["marked_read"]) == (200, 5)
        status, count = await call(url, "GET", f"{path}/unread-count")
        assert count["unread_count"] == 0
        status, missing = await call(url, "POST", f"{path}/no-such-notification/read")
        assert (status, missing["error"]["code"]) == (404, "not_found")
        status, bad = await call(url, "GET", path, cursor="not-ours")
        assert (status, bad["error"]["code"]) == (400, "invalid_request")
    finally:
        await runner.cleanup()
    # The marks are on the topic, so another API process (or this one, restarted)
    # reads them back.
    latest: dict[bytes, bytes | None] = {}
    for *_, key, value in read_topic(settings, settings.topic("notification.inapp.inbox")):
        assert key is not None
        latest[key] = value
    entries = [decode_entry(v) for v in latest.values() if v is not None]
    assert len(entries) == 5
    assert all(e.read_at_ms is not None for e in entries)
