"""The webhook channel in a real worker, against a real local HTTP server that accepts,
fails, throttles, stalls and says 410: every route ends sent (signed, once per
webhook-id), suppressed, skipped or dead-lettered with its history."""

from __future__ import annotations

import base64
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from pipeline.contracts import Contracts
from pipeline.contracts.records import DeadLetter, StatusEvent, UserProfile
from pipeline.producer import HeraldProducer
from pipeline.providers.webhook import parse_secret, verify
from pipeline.settings import Settings
from tests.endpoints import ScriptedEndpoints, endpoint_server
from tests.support import WorkerProcess, fast_retries, read_all, wait_for

pytestmark = pytest.mark.integration

SHIPPED = "shop.order.shipped"
ALERT = "ops.alert"


@pytest.fixture
def endpoints() -> Iterator[ScriptedEndpoints]:
    yield from endpoint_server(
        {
            "/flaky": ["500", "ok"],
            "/later": ["429:3", "ok"],
            "/gone": ["410"],
            "/bad": ["400"],
            "/slow": ["slow:4", "ok"],
        }
    )


@pytest.fixture
def secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def hooks(
    isolated: Settings, endpoints: ScriptedEndpoints, secret: str, tmp_path: Path
) -> Settings:
    """Isolated settings with two webhook types (one to each user's endpoint, one to a
    named endpoint), webhook retries of 1 s then 2 s for 3 attempts, a 2 s timeout."""
    settings = fast_retries(
        isolated,
        tmp_path / "topologies",
        "webhook",
        webhook_secret=secret,
        webhook_endpoints={"ops": endpoints.url("/ops")},
        webhook_require_https=False,
        http_timeout_s=2.0,
    )
    catalog = settings.topology_dir / "catalog.yaml"
    doc = yaml.safe_load(catalog.read_text())
    doc["types"][SHIPPED] = {
        "category": "shop",
        "channels": {"user": ["webhook"]},
        "required": {"order_id": "string"},
    }
    doc["types"][ALERT] = {
        "category": "ops",
        "channels": {"user": ["webhook"]},
        "required": {"text": "string"},
        "webhook_endpoint": "ops",
    }
    catalog.write_text(yaml.safe_dump(doc))
    return settings


@pytest.fixture
def hook_worker(hooks: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(hooks, tmp_path / "worker.log")
    process.start()
    yield process
    process.stop()


def publish(settings: Settings, users: Mapping[str, str | None], kind: str = SHIPPED) -> None:
    """One user per entry (their webhook URL, or None), then one intent each."""
    with HeraldProducer(settings) as herald:
        for user, url in users.items():
            contacts = {"webhook": url} if url else {}
            herald.put_user(UserProfile(user_id=user, contacts=contacts))
        for user in users:
            payload = {"order_id": f"o-{user}"} if kind == SHIPPED else {"text": f"t-{user}"}
            herald.publish_intent(
                notification_type=kind,
                producer="shop",
                idempotency_key=f"{kind}-{user}",
                recipient_user_ids=[user],
                payload=payload,
            )


def last_status(events: list[StatusEvent], user: str) -> StatusEvent:
    (*_, last) = [e for e in events if e.user_id == user and e.channel == "webhook"]
    return last


def settled(users: list[str]) -> Callable[[list[StatusEvent]], bool]:
    final = {"sent", "dead_lettered", "suppressed", "skipped"}

    def done(events: list[StatusEvent]) -> bool:
        ended = {e.user_id for e in events if e.channel == "webhook" and e.status in final}
        return ended >= set(users)

    return done


def test_every_webhook_route_ends_sent_suppressed_skipped_or_dead_lettered(
    hooks: Settings, endpoints: ScriptedEndpoints, secret: str, hook_worker: WorkerProcess
) -> None:
    contracts = Contracts(hooks)
    paths = ["/ok", "/flaky", "/later", "/gone", "/bad", "/slow"]
    users: dict[str, str | None] = {f"u{p[1:]}": endpoints.url(p) for p in paths}
    users["u-none"] = None
    publish(hooks, users)
    events = wait_for(
        hooks, "notification.status", contracts.status, settled(list(users)), timeout_s=90
    )
    final = {user: last_status(events, user) for user in users}
    assert {u: (e.status, e.reason) for u, e in final.items()} == {
        "uok": ("sent", None),
        "uflaky": ("sent", None),
        "ulater": ("sent", None),
        "ugone": ("dead_lettered", "permanent_failure"),
        "ubad": ("dead_lettered", "permanent_failure"),
        "uslow": ("sent", None),
        "u-none": ("skipped", "no_webhook_endpoint"),
    }
    # Each accepted delivery is signed, carries its route_id, and the payload as sent.
    keys = [parse_secret(secret)]
    for path, user in [(p, f"u{p[1:]}") for p in paths]:
        for got in endpoints.accepted(path):
            assert verify(keys, got.headers, got.body, int(time.time()))
            assert got.headers["webhook-id"] == final[user].route_id
            body = json.loads(got.body)
            assert body["type"] == SHIPPED
            assert body["data"]["user_id"] == user
            assert body["data"]["payload"] == {"order_id": f"o-{user}"}
    assert {p: len(endpoints.accepted(p)) for p in paths} == {
        "/ok": 1,
        "/flaky": 1,
        "/later": 1,
        "/gone": 0,
        "/bad": 0,
        "/slow": 1,
    }
    # The retry after a 429 waited for its Retry-After (3 s), not the 1 s tier.
    later = [r for r in endpoints.received if r.path == "/later"]
    assert later[1].at - later[0].at >= 3.0
    # A timeout is transient: the slow endpoint's first attempt failed, the second sent.
    slow = [(e.status, e.reason) for e in events if e.user_id == "uslow"]
    assert ("failed", "http_timeout") in slow
    letters = {
        letter.user_id: letter
        for letter in read_all(hooks, "notification.webhook.dlq", contracts.dead_letter)
    }
    assert isinstance(letters["ugone"], DeadLetter)
    assert letters["ugone"].last_reason == "endpoint_gone"
    assert (letters["ubad"].last_reason, letters["ubad"].last_code) == ("http_rejected", 400)

    # The 410 disabled the endpoint: the next route to it is never sent.
    publish(hooks, {"ugone2": endpoints.url("/gone")})
    events = wait_for(hooks, "notification.status", contracts.status, settled(["ugone2"]))
    gone2 = last_status(events, "ugone2")
    assert (gone2.status, gone2.reason) == ("suppressed", "endpoint_disabled")
    assert endpoints.attempts["/gone"] == 1


def test_a_type_with_a_named_endpoint_sends_there(
    hooks: Settings, endpoints: ScriptedEndpoints, hook_worker: WorkerProcess
) -> None:
    contracts = Contracts(hooks)
    publish(hooks, {"a1": None, "a2": endpoints.url("/elsewhere")}, kind=ALERT)
    events = wait_for(hooks, "notification.status", contracts.status, settled(["a1", "a2"]))
    assert {last_status(events, u).status for u in ("a1", "a2")} == {"sent"}
    texts = sorted(json.loads(r.body)["data"]["payload"]["text"] for r in endpoints.accepted())
    assert texts == ["t-a1", "t-a2"]
    assert {r.path for r in endpoints.accepted()} == {"/ops"}


def test_a_worker_killed_again_and_again_delivers_each_webhook_once(
    hooks: Settings, tmp_path: Path
) -> None:
    """One worker, SIGKILLed ten times while 600 webhook routes are being sent (each
    POST takes 250 ms, 8 at once), each time 0.2-1.5 s after its first delivery, and
    restarted at once. Every route is delivered; the receiver sees each webhook-id
    once, except routes the worker reported ``in_doubt`` (the endpoint had them when
    the sender died, before their outcome was recorded), which it may see again and
    drops by webhook-id."""
    script = {f"/h{i}": ["slow:0.25"] for i in range(30)}
    count, kills = 600, 10
    rng = random.Random(uuid.uuid4().int)
    contracts = Contracts(hooks)
    with ScriptedEndpoints(script) as endpoints:
        users = {f"k{i}": endpoints.url(f"/h{i % 30}") for i in range(count)}
        publish(hooks, users)
        progress = []
        for life in range(kills):
            worker = WorkerProcess(hooks, tmp_path / f"worker{life}.log")
            before = len(endpoints.received)
            worker.start()
            deadline = time.monotonic() + 60
            while len(endpoints.received) == before and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.2, 1.5))
            worker.kill()
            progress.append(len(endpoints.received) - before)
        worker = WorkerProcess(hooks, tmp_path / "worker-last.log")
        worker.start()
        try:
            events = wait_for(
                hooks,
                "notification.status",
                contracts.status,
                settled(list(users)),
                timeout_s=180,
                what="every route settled",
            )
        finally:
            worker.stop()
        delivered = Counter(r.headers["webhook-id"] for r in endpoints.accepted())
    # Every kill struck while routes were being sent, none after the last.
    assert min(progress) > 0, progress
    assert sum(progress) < count, progress
    routes = {e.route_id for e in events if e.channel == "webhook" and e.status == "sent"}
    assert len(routes) == count
    assert set(delivered) == routes  # none missing, none foreign
    in_doubt = {e.route_id for e in events if e.status == "in_doubt" and e.channel == "webhook"}
    repeated = {route_id for route_id, n in delivered.items() if n > 1}
    assert repeated <= in_doubt, (repeated - in_doubt, in_doubt)
