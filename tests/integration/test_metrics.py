"""Metrics as a dashboard reads them: a real worker's counters match what it did, and
the API's consumer lag (kafka_exporter names) rises while the worker is stopped and
falls back to zero once it resumes."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.contracts import Contracts
from pipeline.contracts.records import PushDevice, UserProfile
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from tests.integration.test_operator_api import serve
from tests.smtp import free_port
from tests.support import WorkerProcess, wait_for

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of a Prometheus text exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def publish(settings: Settings, count: int, tag: str) -> None:
    with HeraldProducer(settings) as herald:
        for index in range(count):
            herald.publish_intent(
                notification_type="game.turn.ready",
                producer="game-master",
                idempotency_key=f"{tag}-{index}",
                recipient_user_ids=["m1"],
                payload={"game_id": "g", "game_name": "Andromeda", "turn_number": index},
                wait=False,
            )


def test_counters_and_consumer_lag(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated.model_copy(update={"email_provider": "stub", "metrics_port": free_port()})
    contracts = Contracts(settings)
    with HeraldProducer(settings) as herald:
        herald.put_user(
            UserProfile(user_id="m1", email="m1@example.org", push_devices=[PushDevice(token="t")])
        )
    publish(settings, 5, "first")
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        wait_for(
            settings,
            "notification.status",
            contracts.status,
            lambda evs: len([e for e in evs if e.status in ("sent", "published")]) >= 10,
            what="5 mails and 5 pushes",
        )
        time.sleep(1)  # the last acks are counted right after they return
        url = f"http://127.0.0.1:{settings.metrics_port}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            found = samples(response.read().decode())
        with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
            ready = json.loads(response.read())
        assert ready == {
            "ready": True,
            "checks": {"kafka": True, "tables_recovered": True, "smtp": True},
        }
    finally:
        worker.stop()

    assert value(found, "herald_intents_total", outcome="accepted") == 5
    assert value(found, "herald_routes_total", channel="email", status="routed") == 5
    assert value(found, "herald_routes_total", channel="push", status="routed") == 5
    assert value(found, "herald_deliveries_total", channel="email", status="sent") == 5
    assert value(found, "herald_deliveries_total", channel="push", status="published") == 5
    assert value(found, "herald_delivery_attempts_total", channel="push", outcome="delivered") == 5
    assert value(found, "herald_end_to_end_latency_seconds_count", channel="email") == 5
    assert value(found, "herald_provider_call_seconds_count", channel="email", outcome="ok") == 5
    assert value(found, "herald_gateway_publish_seconds_count", outcome="ok") == 5
    assert value(found, "herald_dead_letters_total", channel="email", reason="x") == 0

    # The worker is stopped: intents published now wait, and the lag shows them.
    intents = settings.topic("notification.intents")
    publish(settings, 20, "while-stopped")

    async def lag_sum(url: str) -> float:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
            found = samples(await response.text())
        return value(
            found, "kafka_consumergroup_lag_sum", consumergroup=settings.app_id, topic=intents
        )

    async def watch() -> tuple[float, float]:
        runner, url = await serve(settings)
        try:
            waiting = await lag_sum(url)
            worker.start()
            deadline = time.monotonic() + 60
            after = waiting
            while after > 0 and time.monotonic() < deadline:
                await asyncio.sleep(1)
                after = await lag_sum(url)
            return waiting, after
        finally:
            worker.stop()
            await runner.cleanup()

    waiting, after = asyncio.run(watch())
    assert waiting == 20
    assert after == 0
