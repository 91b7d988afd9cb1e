"""OpenTelemetry (pipeline.tracing): a stage's span continues the trace its record
carries and stamps its own on what the record led to; a delivery's provider span is
its child; the API's span continues the caller's and reaches what the request writes;
off, nothing changes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator, Sequence

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pipeline import tracing
from pipeline.runtime.batches import Handle, OnError
from pipeline.runtime.producer import Acks
from pipeline.runtime.records import Out, RawRecord
from pipeline.runtime.tables import WriteBehind
from pipeline.settings import Settings
from pipeline.web import server
from tests.unit.helpers import FakeBroker
from tests.unit.test_batching import FakeInbox, Message, batch_run, failing_error


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.install(exporter, "test")
    try:
        yield exporter
    finally:
        tracing.uninstall()


def producer_span() -> tuple[ReadableSpan, list[tuple[str, bytes]]]:
    """A producer's span, as another service's SDK makes it, and the headers its
    publish gives the intent (HeraldProducer.publish: tracing.current_headers)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("game-master").start_as_current_span("publish turn"):
        headers = tracing.current_headers()
    (span,) = exporter.get_finished_spans()
    return span, headers


def traceparent(headers: tuple[tuple[str, bytes], ...]) -> str:
    """Its trace and span ids (the flags vary with the SDK's version)."""
    (value,) = [v.decode() for k, v in headers if k == "traceparent"]
    return "-".join(value.split("-")[1:3])


def ids(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"{context.trace_id:032x}-{context.span_id:016x}"


async def run_stage(
    handle: Handle, messages: list[Message], on_error: OnError = failing_error
) -> list[Out]:
    """Run a traced stage over ``messages``: what it wrote."""
    inbox, broker = FakeInbox(), FakeBroker()
    written: list[Out] = []
    record = broker.write

    async def write(records: Sequence[Out]) -> Acks:
        written.extend(records)
        return await record(records)

    broker.write = write  # type: ignore[method-assign]
    run = batch_run(handle, on_error, broker)
    tracer = tracing.tracer()
    assert tracer is not None
    run._tracing = tracing.StageTracing(tracer, "herald.stage")
    for message in messages:
        inbox.queue.put_nowait(message)
    inbox.queue.put_nowait(None)
    await run.run(inbox)
    return written


async def test_a_stage_span_continues_the_records_trace_and_stamps_its_outputs(
    spans: InMemorySpanExporter,
) -> None:
    parent, headers = producer_span()

    def route(raw: RawRecord, view: WriteBehind) -> list[Out]:
        return [Out("lane", raw.key, b"route", headers=(("traceparent", b"stale"),))]

    outputs = await run_stage(
        route,
        [
            Message("recipients", 3, 17, headers=tuple(headers)),
            Message("recipients", 3, 18),  # no context: a trace of its own
        ],
    )
    first, second = spans.get_finished_spans()
    assert (first.name, first.kind) == ("herald.stage", SpanKind.CONSUMER)
    assert first.parent is not None
    assert first.parent.span_id == parent.context.span_id
    assert first.context.trace_id == parent.context.trace_id
    assert first.attributes is not None
    assert first.attributes["messaging.kafka.offset"] == 17
    assert second.parent is None
    assert second.context.trace_id != parent.context.trace_id
    # What the record led to carries the stage's span (the stale context replaced).
    assert [traceparent(o.headers) for o in outputs] == [ids(first), ids(second)]


async def test_a_delivery_span_lasts_until_the_provider_answered_and_holds_its_span(
    spans: InMemorySpanExporter,
) -> None:
    _, headers = producer_span()

    async def deliver() -> list[Out]:
        with tracing.client_span("smtp send", {"server.port": 25}) as span:
            await asyncio.sleep(0.01)
            span.set_attribute("smtp.reply", "250 queued")
        return [Out("status", None, b"sent")]

    def email(raw: RawRecord, view: WriteBehind) -> Awaitable[list[Out]]:
        return deliver()

    await run_stage(email, [Message("email", 0, 5, headers=tuple(headers))])
    smtp, stage = spans.get_finished_spans()
    assert (smtp.name, smtp.kind) == ("smtp send", SpanKind.CLIENT)
    assert smtp.parent is not None
    assert smtp.parent.span_id == stage.context.span_id
    assert smtp.attributes is not None
    assert smtp.attributes["smtp.reply"] == "250 queued"
    assert stage.end_time is not None
    assert smtp.end_time is not None
    assert stage.end_time >= smtp.end_time


async def test_a_failed_handle_ends_its_span_as_an_error(spans: InMemorySpanExporter) -> None:
    def broken(raw: RawRecord, view: WriteBehind) -> list[Out]:
        raise RuntimeError("bug")

    async def failing() -> list[Out]:
        raise RuntimeError("provider bug")

    def broken_later(raw: RawRecord, view: WriteBehind) -> Awaitable[list[Out]]:
        return failing()

    def on_error(raw: RawRecord, exc: Exception, now: int) -> Out:
        return Out("malformed", None, str(exc).encode())

    for handle, why in ((broken, b"bug"), (broken_later, b"provider bug")):
        written = await run_stage(handle, [Message("email", 0, 1)], on_error)
        assert [o.value for o in written] == [why]
    first, second = spans.get_finished_spans()
    assert first.status.status_code == second.status.status_code == StatusCode.ERROR
    assert second.status.description is not None
    assert "provider bug" in second.status.description


async def test_off_nothing_is_traced_or_stamped() -> None:
    assert tracing.tracer() is None
    assert tracing.stamp_current([Out("t", None, b"v")]) == [Out("t", None, b"v")]
    assert tracing.configure(Settings(), "herald-worker") is None  # OTEL_TRACES_EXPORTER=none
    with tracing.client_span("smtp send", {}) as span:
        assert not span.is_recording()


async def test_the_apis_span_continues_the_callers_trace_into_what_it_writes(
    spans: InMemorySpanExporter,
) -> None:
    parent, headers = producer_span()
    written: list[Out] = []

    async def handler(request: web.Request) -> web.Response:
        written.extend(tracing.stamp_current([Out("notification.intents", b"k", b"v")]))
        return web.json_response({}, status=202)

    app = web.Application(middlewares=[server._traced])
    app.router.add_post("/api/v1/notifications/{notification_id}/cancel", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            "/api/v1/notifications/n-1/cancel",
            headers={k: v.decode() for k, v in headers},
        )
        assert response.status == 202
    (span,) = spans.get_finished_spans()
    assert span.name == "POST /api/v1/notifications/{notification_id}/cancel"
    assert span.kind == SpanKind.SERVER
    assert span.parent is not None
    assert span.parent.span_id == parent.context.span_id
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 202
    assert traceparent(written[0].headers) == ids(span)
