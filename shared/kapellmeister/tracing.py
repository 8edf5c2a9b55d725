"""OpenTelemetry tracing: one trace per workflow, a short span per step.

A workflow keeps one trace id for its whole life. Its root span (``workflow <name>``)
begins at the start request, continuing the caller's ``traceparent`` if one came with
it, and ends as soon as the start is decided: its context is kept in the saga state. No
span stays open while a workflow waits (for an agent, a timer, an approval for days);
each step is a short span of its own, linked into the one trace:

* every message carries W3C ``traceparent``/``tracestate`` headers; a consumer's span
  (``process <subject>``) is a child of the producer span that sent the message
  (``publish <subject>``), so conductor → agent → conductor chains parent to child;
* a request about a running workflow (signal, terminate, pause, …) is a child of the
  workflow's root context from the saga, with a link to the caller's context, so an
  operator's ``nats req`` on day three lands in the workflow's trace; so does a sweep;
* timers carry the headers of the step that set them, and so continue it when they fire.

Span names and attributes follow the OpenTelemetry messaging conventions
(``messaging.system=nats``, ``messaging.destination.name``,
``messaging.operation.type``, ``messaging.message.id``) plus ``workflow.id``,
``workflow.name``, ``task.ref`` and ``task.attempt``.

Configuration is only the standard ``OTEL_*`` variables: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_EXPORTER`` (``otlp``, the default, or
``console`` / ``none``), ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` and
``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` (``http/protobuf``, the default, or ``grpc``),
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``. With no endpoint, nothing is exported and no
span is built at all (a fifth of a conductor's CPU otherwise), yet ids stay real: the
root context is made by hand, sampled, so the saga still holds a trace id and a
downstream service that does export still records its spans in that trace.
"""

from __future__ import annotations

import contextvars
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "TRACE_HEADERS",
    "Attributes",
    "current",
    "exporting",
    "extract",
    "flush",
    "inject",
    "new_traceparent",
    "producer",
    "record_error",
    "set_error",
    "setup_tracing",
    "span",
    "trace_id_of",
    "tracer",
]

TRACE_HEADERS = ("traceparent", "tracestate")
Attributes = Mapping[str, str | int]

_propagator = TraceContextTextMapPropagator()
_recording = False
_tracer: trace.Tracer | None = None
_processors: list[SpanProcessor] = []

# What the step running in this task is about (workflow id, task ref, trace id): read by
# the log formatter, so every log line of a step carries them.
current: contextvars.ContextVar[Attributes] = contextvars.ContextVar(
    "kapellmeister_step", default=MappingProxyType({})
)


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> None:
    """Install the global tracer provider for this service (once, in ``__main__``)."""
    env = os.environ if environ is None else environ
    exporter = _span_exporter(env)
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(
        resource=Resource.create(attributes),
        # The SDK reads OTEL_TRACES_SAMPLER when given None; with nowhere to send spans,
        # record none.
        sampler=None if exporter is not None else ALWAYS_OFF,
    )
    if exporter is not None:
        processor = BatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
        _processors.append(processor)
    trace.set_tracer_provider(provider)
    global _tracer, _recording
    _tracer, _recording = None, exporter is not None


def _span_exporter(env: Mapping[str, str]) -> SpanExporter | None:
    """The exporter the ``OTEL_*`` variables ask for; None for none (or no endpoint)."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    names = {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    if "console" in names:
        return ConsoleSpanExporter()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if "otlp" not in names or not endpoint:
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered (a stopping service)."""
    for processor in _processors:
        processor.force_flush(int(timeout_s * 1000))


def exporting() -> bool:
    """Whether spans are being recorded and exported."""
    return _recording


def tracer() -> trace.Tracer:
    """Our tracer; installs a plain SDK provider first if nobody did, so ids are real."""
    global _tracer
    if _tracer is None:
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            setup_tracing("kapellmeister", {})
        _tracer = trace.get_tracer("kapellmeister")
    return _tracer


def inject(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add ``traceparent`` (and ``tracestate``) for ``context`` (default: current)."""
    _propagator.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The remote span context carried by a message's headers (empty if none)."""
    return _propagator.extract(dict(headers or {}))


def trace_id_of(traceparent: str) -> str:
    """The 32-hex-digit trace id in a ``traceparent`` ('' if it is not one)."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def new_traceparent(parent: Mapping[str, str] | None = None) -> str:
    """A fresh span id under ``parent``'s trace (or a new trace), sampled: the root
    context made by hand when no span is recorded."""
    trace_id = trace_id_of((parent or {}).get("traceparent", ""))
    if not trace_id or trace_id == "0" * 32:
        trace_id = f"{random.getrandbits(128) or 1:032x}"
    return f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-01"


def _links(headers: Mapping[str, str] | None) -> list[Link]:
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []


@contextmanager
def span(
    name: str,
    kind: SpanKind,
    attributes: Attributes,
    parent: Mapping[str, str] | None,
    link: Mapping[str, str] | None = None,
) -> Iterator[dict[str, str]]:
    """One step as a span, a child of the context in ``parent``'s headers, with a link
    to the one in ``link``'s (a caller outside the workflow's trace).

    Yields the trace headers for what the step sends. Not recording, no span is built:
    ``parent``'s headers pass on unchanged, which keeps the trace id and costs nothing.
    Sets `current` (for the logs) for the step's duration.
    """
    carried = {k: v for k, v in (parent or {}).items() if k in TRACE_HEADERS}
    about = {**attributes, "trace_id": trace_id_of(carried.get("traceparent", ""))}
    token = current.set(about)
    try:
        if not _recording:
            yield carried
            return
        with tracer().start_as_current_span(
            name,
            context=extract(carried),
            kind=kind,
            attributes=dict(attributes),
            links=_links(link),
        ):
            yield inject({})
    finally:
        current.reset(token)


@contextmanager
def producer(
    destination: str, attributes: Attributes, parent: Mapping[str, str]
) -> Iterator[dict[str, str]]:
    """The span of sending one message (``publish <destination>``), a child of
    ``parent``; yields the headers the message carries (``parent``'s when not recording)."""
    if not _recording:
        yield {k: v for k, v in parent.items() if k in TRACE_HEADERS}
        return
    with tracer().start_as_current_span(
        f"publish {destination}",
        context=extract(parent),
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            **attributes,
        },
    ):
        yield inject({})


def record_error(exc: BaseException) -> None:
    """Mark the current span failed with ``exc`` (nothing when not recording)."""
    current_span = trace.get_current_span()
    if current_span.is_recording():
        current_span.record_exception(exc)
        current_span.set_status(Status(StatusCode.ERROR, str(exc)))


def set_error(message: str) -> None:
    """Mark the current span failed with ``message`` (a task or workflow that failed)."""
    current_span = trace.get_current_span()
    if current_span.is_recording():
        current_span.set_status(Status(StatusCode.ERROR, message))
