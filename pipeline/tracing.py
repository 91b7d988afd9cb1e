"""OpenTelemetry traces, off by default (docs/operations.md: Traces).

With ``OTEL_TRACES_EXPORTER=otlp`` (or ``console``) a worker and the API export spans;
the OTLP exporter reads the standard variables itself (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_HEADERS``, ...). Context travels in W3C ``traceparent`` (and
``tracestate``) record headers: a producer that sends one has Herald's spans in its
trace; intake starts a trace for an intent without one. Every stage's span for a record
stamps its context on what the record led to, so one trace runs from the producer's
span through intake, routing, each delivery attempt (and each wait in a delay tier) to
the provider's answer. Off, a stage pays one attribute check per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline.runtime.records import Out, RawRecord
from pipeline.settings import Settings

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_PROPAGATOR = TraceContextTextMapPropagator()
#: The tracer of the provider Herald installed (None: tracing is off).
_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None


class _HeaderGetter(Getter[Sequence[tuple[str, bytes]]]):
    """Reads W3C trace context from Kafka record headers."""

    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k == key and v is not None]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeaderGetter()


def configure(settings: Settings, service: str) -> trace.Tracer | None:
    """Install the exporter ``OTEL_TRACES_EXPORTER`` names (``none``: nothing, the
    default); the tracer, or None when tracing is off. A provider installed before
    (:func:`install`, tests) is kept."""
    if _tracer is not None or settings.otel_traces_exporter == "none":
        return _tracer
    exporter: SpanExporter
    if settings.otel_traces_exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    tracer = install(exporter, settings.otel_service_name or service, batch=True)
    if _provider is not None:  # for whatever else in the process traces
        trace.set_tracer_provider(_provider)
    return tracer


def install(exporter: SpanExporter, service: str, *, batch: bool = False) -> trace.Tracer:
    """Export Herald's spans to ``exporter`` (each at its end unless ``batch``)."""
    global _tracer, _provider
    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("herald")
    return _tracer


def uninstall() -> None:
    """Tracing off again (tests); what was exported is flushed."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def context_of_http(headers: Mapping[str, str]) -> otel_context.Context:
    """The trace context an HTTP request's headers carry."""
    return _PROPAGATOR.extract(headers)


def tracer() -> trace.Tracer | None:
    """Herald's tracer, or None when tracing is off."""
    return _tracer


def context_of(headers: Sequence[tuple[str, bytes]]) -> otel_context.Context:
    """The trace context a record's headers carry (an empty one without)."""
    return _PROPAGATOR.extract(headers, getter=_GETTER)


def headers_of(span: trace.Span) -> tuple[tuple[str, bytes], ...]:
    """``span``'s context as record headers."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return tuple((k, v.encode("latin-1")) for k, v in carrier.items())


def stamp(outputs: Sequence[Out], span: trace.Span) -> list[Out]:
    """``outputs`` carrying ``span``'s context (replacing any they had)."""
    context = headers_of(span)
    return [
        dataclasses.replace(
            out,
            headers=(
                *((k, v) for k, v in out.headers if k not in (TRACEPARENT, TRACESTATE)),
                *context,
            ),
        )
        for out in outputs
    ]


def current_headers() -> list[tuple[str, bytes]]:
    """The current span's context (the caller's, whatever SDK it runs) as record
    headers; none without a span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]


def stamp_current(outputs: Sequence[Out]) -> Sequence[Out]:
    """``outputs`` stamped with the current span's context (unchanged without one)."""
    if _tracer is None:
        return outputs
    span = trace.get_current_span()
    return stamp(outputs, span) if span.get_span_context().is_valid else outputs


class StageTracing:
    """The span of one stage for each record it handles (pipeline.runtime.batches):
    a child of the record's context; what the record led to carries the span's."""

    def __init__(self, tracer: trace.Tracer, stage: str) -> None:
        self._tracer = tracer
        self._stage = stage

    def start(self, raw: RawRecord) -> trace.Span:
        return self._tracer.start_span(
            self._stage,
            context=context_of(raw.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": raw.topic,
                "messaging.destination.partition.id": str(raw.partition),
                "messaging.kafka.offset": raw.offset,
            },
        )

    def run(self, span: trace.Span, handle: Callable[[], Any]) -> Any:
        """``handle()`` (the stage's handle of one record) with ``span`` current, so that
        what it starts (a delivery's task, a provider's span) is its child: its outputs,
        or the future of them (a task, started here, so it copies the context)."""
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            outputs = handle()
            if inspect.isawaitable(outputs):
                return asyncio.ensure_future(outputs)
            return outputs
        except Exception as exc:
            settle(span, exc)
            raise
        finally:
            otel_context.detach(token)


def end(span: trace.Span, outputs: Sequence[Out]) -> list[Out]:
    """End ``span`` after ``outputs``: them, stamped with its context."""
    span.set_attribute("herald.outputs", len(outputs))
    stamped = stamp(outputs, span)
    span.end()
    return stamped


def settle(span: trace.Span, outcome: BaseException | asyncio.Future[Any]) -> None:
    """End ``span`` of a handle that failed or was cancelled (a future that succeeded:
    nothing, :func:`end` ends it)."""
    error: BaseException
    if not isinstance(outcome, asyncio.Future):
        error = outcome
    elif outcome.cancelled():
        error = asyncio.CancelledError()
    elif (raised := outcome.exception()) is not None:
        error = raised
    else:
        return
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


@contextlib.contextmanager
def client_span(name: str, attributes: Mapping[str, str | int]) -> Iterator[trace.Span]:
    """A span for a call to a provider (an SMTP transaction), a child of the current
    one; a non-recording span when tracing is off."""
    if _tracer is None:
        yield trace.INVALID_SPAN
        return
    with _tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes) as span:
        yield span
