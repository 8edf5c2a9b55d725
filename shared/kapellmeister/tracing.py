"""OpenTelemetry setup and W3C ``traceparent`` in and out of NATS headers.

A workflow keeps one trace id for its whole life: the conductor opens the root context
when the workflow starts (continuing the caller's ``traceparent`` if one came with the
request), stores it in the saga state, and every later step, on any replica, after any
restart, is a child of it. Messages carry ``traceparent``/``tracestate`` headers that
the agent runtime continues.

Exporting follows the standard ``OTEL_*`` variables: ``OTEL_TRACES_EXPORTER=console``
prints spans; with no exporter configured tracing is on (ids are real) but nothing is
sent anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "TRACE_HEADERS",
    "current_trace_id",
    "extract",
    "inject",
    "record_error",
    "setup_tracing",
    "step",
    "tracer",
]

TRACE_HEADERS = ("traceparent", "tracestate")
_propagator = TraceContextTextMapPropagator()
_recording = False


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> None:
    """Install the global tracer provider for this service (once, in ``__main__``)."""
    env = os.environ if environ is None else environ
    name = env.get("OTEL_SERVICE_NAME", service_name)
    exporting = env.get("OTEL_TRACES_EXPORTER", "").lower() == "console"
    # With nowhere to send spans, record none: ids and traceparent headers stay real (the
    # saga keeps its trace id), but no span is built. That is a fifth of a conductor's CPU.
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}),
        sampler=None if exporting else ALWAYS_OFF,
    )
    if exporting:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    global _tracer, _recording
    _tracer, _recording = None, exporting


_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    """Our tracer; installs a plain SDK provider first if nobody did, so ids are real."""
    global _tracer
    if _tracer is None:
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            setup_tracing("kapellmeister")
        _tracer = trace.get_tracer("kapellmeister")
    return _tracer


def inject(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add ``traceparent`` (and ``tracestate``) for ``context`` (default: current)."""
    _propagator.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The remote span context carried by a message's headers (empty if none)."""
    return _propagator.extract(dict(headers or {}))


def current_trace_id() -> str:
    """The 32-hex-digit trace id of the current span ('' if there is none)."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


@contextmanager
def step(
    name: str,
    incoming: Mapping[str, str] | None,
    kind: SpanKind,
    attributes: Mapping[str, str | int],
) -> Iterator[dict[str, str]]:
    """Handle one incoming message as a span continuing its trace.

    Yields the trace headers for every message the step sends. With no exporter, no span
    is built: the incoming ``traceparent`` is passed on as it is, which keeps the trace id
    and costs nothing.
    """
    if not _recording:
        headers = incoming or {}
        yield {k: headers[k] for k in TRACE_HEADERS if k in headers}
        return
    with tracer().start_as_current_span(
        name, context=extract(incoming), kind=kind, attributes=dict(attributes)
    ):
        yield inject({})


def record_error(exc: BaseException) -> None:
    """Mark the current span failed with ``exc`` (nothing when not recording)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
