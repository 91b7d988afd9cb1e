"""One OpenTelemetry trace from a producer's span to the SMTP server's acceptance,
through a real worker, broker and SMTP server: the producer publishes an intent inside
its span (HeraldProducer puts its W3C traceparent on the record); the worker, with the
SDK's in-memory exporter, continues it through intake, routing and the email delivery
to the SMTP transaction."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline import tracing
from pipeline.contracts.records import UserProfile
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.web.server import NOTIFICATIONS
from tests.integration.test_http_intake import GAME_MASTER, TURN, ready, with_tokens
from tests.integration.test_login_codes import serve
from tests.smtp import ScriptedSmtp
from tests.support import WorkerProcess

#: A `herald worker` exporting its spans to the SDK's in-memory exporter, written as
#: JSON to the file named by its first argument every half second.
TRACED_WORKER = """
import json, os, sys, threading, time
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pipeline import tracing
from pipeline.settings import Settings
from pipeline.worker import Worker

exporter = InMemorySpanExporter()
tracing.install(exporter, "herald-worker")

def dump() -> None:
    while True:
        time.sleep(0.5)
        spans = [
            {
                "name": s.name,
                "trace_id": f"{s.context.trace_id:032x}",
                "span_id": f"{s.context.span_id:016x}",
                "parent": f"{s.parent.span_id:016x}" if s.parent else None,
                "kind": s.kind.name,
                "status": s.status.status_code.name,
                "attributes": dict(s.attributes or {}),
            }
            for s in exporter.get_finished_spans()
        ]
        with open(sys.argv[1] + ".tmp", "w") as out:
            json.dump(spans, out)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])

threading.Thread(target=dump, daemon=True).start()
Worker(Settings()).run()
"""


def traced_worker(settings: Settings, folder: Path) -> tuple[WorkerProcess, Path]:
    """A worker with the in-memory exporter, and the file its spans are written to."""
    spans = folder / "spans.json"
    command = [sys.executable, "-c", TRACED_WORKER, str(spans)]
    return WorkerProcess(settings, folder / "worker.log", command), spans


def caller_span() -> tuple[InMemorySpanExporter, Any]:
    """Another service's SDK (a provider of its own) and its tracer."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider.get_tracer("game-master")


def wait_for_span(path: Path, trace_id: str, name: str, timeout_s: float) -> list[dict[str, Any]]:
    """The trace's spans once one named ``name`` is among them."""
    deadline = time.monotonic() + timeout_s
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            spans = [s for s in json.loads(path.read_text()) if s["trace_id"] == trace_id]
            if any(s["name"] == name for s in spans):
                return spans
        time.sleep(0.5)
    raise AssertionError(f"no {name} span in trace {trace_id} within {timeout_s}s: {spans}")


def test_one_trace_runs_from_the_producers_span_to_the_smtp_acceptance(
    isolated: Settings, tmp_path: Path
) -> None:
    exporter, caller = caller_span()
    with ScriptedSmtp() as smtp:
        settings = isolated.model_copy(update={"smtp_port": smtp.port})
        worker, spans_file = traced_worker(settings, tmp_path)
        worker.start()
        try:
            with HeraldProducer(settings) as herald:
                herald.put_user(UserProfile(user_id="t1", email="t1@example.org"))
                with caller.start_as_current_span("end turn"):
                    herald.publish_intent(
                        notification_type="game.turn.ready",
                        producer="game-master",
                        idempotency_key="trace-1",
                        recipient_user_ids=["t1"],
                        payload={"game_id": "g-7", "game_name": "Andromeda", "turn_number": 7},
                    )
            smtp.wait_for(1, timeout_s=120)
            (root,) = exporter.get_finished_spans()
            assert root.context is not None
            trace_id = f"{root.context.trace_id:032x}"
            spans = wait_for_span(spans_file, trace_id, "herald.email.bulk", timeout_s=60)
        finally:
            worker.stop()
    by_id = {s["span_id"]: s for s in spans}
    (smtp_span,) = [s for s in spans if s["name"] == "smtp send"]
    assert smtp_span["kind"] == "CLIENT"
    assert str(smtp_span["attributes"]["smtp.reply"]).startswith("2")  # accepted
    # From the SMTP transaction up to the producer's span, parent by parent.
    path, span = [], smtp_span
    while span["parent"] in by_id:
        path.append(span["name"])
        span = by_id[span["parent"]]
    path.append(span["name"])
    assert span["parent"] == f"{root.context.span_id:016x}"  # the producer's own span
    assert path[:3] == ["smtp send", "herald.email.bulk", "herald.route"]
    # (A recipient whose user came later waits and is routed again: more route spans.)
    assert set(path[2:-1]) == {"herald.route"}
    assert path[-1] == "herald.intake"
    assert all(s["status"] != "ERROR" for s in spans)


async def test_a_posted_intent_goes_on_in_the_callers_trace(
    isolated: Settings, tmp_path: Path
) -> None:
    """The caller's traceparent reaches the API's server span, and from there the
    worker's: POST -> intake -> route -> delivery -> SMTP, one trace."""
    api_spans = InMemorySpanExporter()
    tracing.install(api_spans, "herald-api")  # the API runs in this process
    exporter, caller = caller_span()
    try:
        with ScriptedSmtp() as smtp:
            settings = with_tokens(isolated.model_copy(update={"smtp_port": smtp.port}))
            worker, spans_file = traced_worker(settings, tmp_path)
            worker.start()
            runner, url = await serve(settings)
            try:
                await ready(url)
                with HeraldProducer(settings) as herald:
                    herald.put_user(UserProfile(user_id="t2", email="t2@example.org"))
                body = {
                    **TURN,
                    "recipient_user_ids": ["t2"],
                    "occurred_at_ms": int(time.time() * 1000),
                }
                with caller.start_as_current_span("end turn"):
                    headers = {k: v.decode() for k, v in tracing.current_headers()}
                headers |= {
                    "Authorization": f"Bearer {GAME_MASTER}",
                    "Idempotency-Key": "traced-post",
                    "Content-Type": "application/json",
                }
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(f"{url}{NOTIFICATIONS}", json=body, headers=headers) as response,
                ):
                    assert response.status == 202, await response.text()
                await asyncio.to_thread(smtp.wait_for, 1, 120)
                (root,) = exporter.get_finished_spans()
                trace_id = f"{root.context.trace_id:032x}"
                spans = await asyncio.to_thread(
                    wait_for_span, spans_file, trace_id, "herald.email.bulk", 60
                )
            finally:
                await runner.cleanup()
                worker.stop()
    finally:
        tracing.uninstall()
    (server,) = [s for s in api_spans.get_finished_spans() if s.name == f"POST {NOTIFICATIONS}"]
    assert server.parent is not None
    assert server.parent.span_id == root.context.span_id
    (intake,) = [s for s in spans if s["name"] == "herald.intake"]
    assert intake["parent"] == f"{server.context.span_id:016x}"
    assert {"herald.route", "herald.email.bulk", "smtp send"} <= {s["name"] for s in spans}
