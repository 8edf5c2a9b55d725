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
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["current_trace_id", "extract", "inject", "setup_tracing", "tracer"]

_propagator = TraceContextTextMapPropagator()


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> None:
    """Install the global tracer provider for this service (once, in ``__main__``)."""
    env = os.environ if environ is None else environ
    name = env.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    if env.get("OTEL_TRACES_EXPORTER", "").lower() == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    """Our tracer; installs a plain SDK provider first if nobody did, so ids are real."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        setup_tracing("kapellmeister")
    return trace.get_tracer("kapellmeister")


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
