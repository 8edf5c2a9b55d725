"""OpenTelemetry tracing: one trace per workflow, a short span per step.

A workflow keeps one trace id for its whole life. Its root context is made when the
start request creates it (continuing the caller's ``traceparent`` if one came with it)
and kept in the saga (``traceparent``, ``tracestate``); the root span itself,
``workflow <name>``, is recorded once the start is decided, with exactly those ids, and
only by the start that created the workflow (a repeated start adds nothing to any
trace). No span stays open while a workflow waits (for an agent, a timer, an approval
for days); each step is a short span of its own in the one trace:

* every message carries W3C ``traceparent``/``tracestate`` headers; a consumer's span
  (``process <subject>``) is a child of the producer span that sent the message
  (``publish <subject>``), so conductor → agent → conductor chains parent to child;
* a request about a running workflow (signal, terminate, pause, …) is a child of the
  workflow's root context from the saga, with a link to the caller's context, so an
  operator's ``nats req`` on day three lands in the workflow's trace; so does a sweep;
* timers carry the headers of the step that set them, and so continue it when they fire;
  a child workflow's root is a child of the parent's step that started it.

Span names and attributes follow the OpenTelemetry messaging conventions
(``messaging.system=nats``, ``messaging.destination.name``,
``messaging.operation.type``, ``messaging.message.id``) plus ``workflow.id``,
``workflow.name``, ``task.ref`` and ``task.attempt``.

Configuration is only the standard ``OTEL_*`` variables: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_EXPORTER`` (``otlp``, the default,
``console``, ``none``, or a list), ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` and
``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` (``http/protobuf``, the default, or ``grpc``),
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``. With no endpoint nothing is exported and no span
is built at all (a fifth of a conductor's CPU otherwise), yet ids stay real: the root
context is made by hand, sampled, so the saga still holds a trace id and a downstream
service that does export still records its spans in that trace.
"""

from __future__ import annotations

import contextvars
import os
import random
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "TRACE_HEADERS",
    "Attributes",
    "about",
    "carried",
    "current",
    "exporting",
    "extract",
    "flush",
    "inject",
    "new_traceparent",
    "producer",
    "record_error",
    "record_root",
    "root_traceparent",
    "set_attributes",
    "set_error",
    "setup_tracing",
    "span",
    "trace_id_of",
    "tracer",
    "wanted_exporters",
]

TRACE_HEADERS = ("traceparent", "tracestate")
Attributes = Mapping[str, str | int]
Lazy = Callable[[], Attributes]

_propagator = TraceContextTextMapPropagator()
_recording = False
_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_processors: list[SpanProcessor] = []
_NONE: Attributes = MappingProxyType({})

# What the step running in this task is about (workflow.id, task.ref, trace_id): read
# by the log formatter, so every log line of a step carries them.
current: contextvars.ContextVar[Attributes] = contextvars.ContextVar(
    "kapellmeister_step", default=_NONE
)
# The ids the next span must take (the root span, recorded after its ids were chosen).
_preset: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "kapellmeister_preset_ids", default=None
)


class _Ids(RandomIdGenerator):
    """Random ids, unless `_preset` names the ones to take."""

    def generate_span_id(self) -> int:
        preset = _preset.get()
        return preset[1] if preset else super().generate_span_id()

    def generate_trace_id(self) -> int:
        preset = _preset.get()
        return preset[0] if preset else super().generate_trace_id()


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> None:
    """Install the global tracer provider for this service (once, in ``__main__``)."""
    env = os.environ if environ is None else environ
    exporters = _span_exporters(env)
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(
        resource=Resource.create(attributes),
        # The SDK reads OTEL_TRACES_SAMPLER when given None; with nowhere to send spans,
        # record none.
        sampler=None if exporters else ALWAYS_OFF,
        id_generator=_Ids(),
    )
    _processors.clear()
    for exporter in exporters:
        processor = BatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
        _processors.append(processor)
    trace.set_tracer_provider(provider)
    global _tracer, _recording, _provider
    _tracer, _recording, _provider = None, bool(exporters), provider


def wanted_exporters(env: Mapping[str, str], signal: str) -> tuple[bool, str | None]:
    """What the ``OTEL_*`` variables ask for ``signal`` (``TRACES``, ``METRICS``):
    whether to print to the console, and the OTLP protocol (None: no OTLP, as without
    an endpoint)."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False, None
    names = {n.strip().lower() for n in env.get(f"OTEL_{signal}_EXPORTER", "otlp").split(",")}
    endpoint = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    protocol = None
    if "otlp" in names and endpoint:
        protocol = env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
    return "console" in names, protocol


def _span_exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters the ``OTEL_*`` variables ask for (none without an endpoint)."""
    console, protocol = wanted_exporters(env, "TRACES")
    found: list[SpanExporter] = [ConsoleSpanExporter()] if console else []
    if protocol is not None:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            found.append(GrpcExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            found.append(HttpExporter())
    return found


def flush(timeout_s: float = 3.0) -> None:
    """Export the spans still buffered (a stopping service), for at most ``timeout_s``."""
    for processor in _processors:
        processor.force_flush(int(timeout_s * 1000))


def exporting() -> bool:
    """Whether spans are being recorded and exported."""
    return _recording


def tracer() -> trace.Tracer:
    """Our tracer; installs a plain SDK provider first if nobody did, so ids are real."""
    global _tracer
    if _tracer is None:
        if _provider is None:
            setup_tracing("kapellmeister", {})
        assert _provider is not None
        _tracer = _provider.get_tracer("kapellmeister")
    return _tracer


def inject(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add ``traceparent`` (and ``tracestate``) for ``context`` (default: current)."""
    _propagator.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The remote span context carried by a message's headers (empty if none)."""
    return _propagator.extract(dict(headers or {}))


def carried(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Just the trace headers of ``headers``."""
    if not headers:
        return {}
    return {k: headers[k] for k in TRACE_HEADERS if k in headers}


def trace_id_of(traceparent: str) -> str:
    """The 32-hex-digit trace id in a ``traceparent`` ('' if it is not one)."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def new_traceparent(parent: Mapping[str, str] | None = None, sampled: bool = True) -> str:
    """A fresh span id under ``parent``'s trace (or a new trace)."""
    trace_id = trace_id_of((parent or {}).get("traceparent", ""))
    if not trace_id or trace_id == "0" * 32:
        trace_id = f"{random.getrandbits(128) or 1:032x}"
    return f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-{'01' if sampled else '00'}"


def root_traceparent(name: str, caller: Mapping[str, str] | None) -> str:
    """A workflow's root context, chosen before its start is decided: a new span id under
    the caller's trace (or a new trace), sampled as the configured sampler decides."""
    traceparent = new_traceparent(caller)
    if _recording and _provider is not None:
        decision = _provider.sampler.should_sample(
            extract(caller), int(trace_id_of(traceparent), 16), name, SpanKind.SERVER
        )
        if decision.decision is not Decision.RECORD_AND_SAMPLE:
            traceparent = traceparent[:-2] + "00"
    return traceparent


def record_root(
    name: str,
    traceparent: str,
    caller: Mapping[str, str] | None,
    attributes: Attributes,
    started_ns: int,
) -> None:
    """Record the root span with the ids of ``traceparent``, from ``started_ns`` to now,
    as the child of the caller's context (nothing when not recording or not sampled)."""
    if not _recording or not traceparent.endswith("-01"):
        return
    _, trace_id, span_id, _ = traceparent.split("-")
    token = _preset.set((int(trace_id, 16), int(span_id, 16)))
    try:
        root = tracer().start_span(
            name,
            context=extract(caller),
            kind=SpanKind.SERVER,
            attributes=dict(attributes),
            start_time=started_ns,
        )
    finally:
        _preset.reset(token)
    root.end()


def _links(headers: Mapping[str, str] | None) -> list[Link]:
    if not headers:
        return []
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []


class span:
    """One step as a span: ``with span(name, kind, parent, about, attributes) as sent``.

    The span is a child of the context in ``parent``'s headers, with a link to the one in
    ``link``'s (a caller outside the workflow's trace). ``about`` (``workflow.id``,
    ``task.ref``) names the step to the logs (`current`) for its duration and goes on the
    span; ``attributes`` are only computed when a span is recorded. ``sent``: the trace
    headers for what the step sends. Not recording, no span is built and ``parent``'s
    trace headers pass on unchanged, which keeps the trace id and costs next to nothing.
    """

    __slots__ = ("_manager", "_token", "about", "attributes", "kind", "link", "name", "parent")

    def __init__(
        self,
        name: str,
        kind: SpanKind,
        parent: Mapping[str, str] | None,
        about: Attributes = _NONE,
        attributes: Lazy | None = None,
        link: Mapping[str, str] | None = None,
    ) -> None:
        self.name, self.kind, self.parent, self.about = name, kind, parent, about
        self.attributes, self.link = attributes, link
        self._manager: Any = None
        self._token: contextvars.Token[Attributes] | None = None

    def __enter__(self) -> dict[str, str]:
        headers = carried(self.parent)
        trace_id = trace_id_of(headers.get("traceparent", ""))
        self._token = current.set({**self.about, "trace_id": trace_id})
        if not _recording:
            return headers
        attributes = {**self.about, **(self.attributes() if self.attributes else {})}
        self._manager = tracer().start_as_current_span(
            self.name,
            context=extract(headers),
            kind=self.kind,
            attributes=attributes,
            links=_links(self.link),
        )
        self._manager.__enter__()
        return inject({})

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._manager is not None:
                self._manager.__exit__(kind, error, traceback)
        finally:
            if self._token is not None:
                current.reset(self._token)


class about:
    """Name a step to the logs without a span of its own (a start, before its root)."""

    __slots__ = ("_token", "attributes")

    def __init__(self, attributes: Attributes, traceparent: str) -> None:
        self.attributes = {**attributes, "trace_id": trace_id_of(traceparent)}
        self._token: contextvars.Token[Attributes] | None = None

    def __enter__(self) -> None:
        self._token = current.set(self.attributes)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            current.reset(self._token)


class producer:
    """The span of sending one message, ``publish <destination>``: a child of ``parent``.

    Yields the trace headers the message carries (``parent``'s when not recording).
    ``attributes`` are only computed when a span is recorded.
    """

    __slots__ = ("_manager", "attributes", "destination", "parent", "subject")

    def __init__(
        self, destination: str, subject: str, parent: Mapping[str, str], attributes: Lazy
    ) -> None:
        self.destination, self.subject, self.parent = destination, subject, parent
        self.attributes = attributes
        self._manager: Any = None

    def __enter__(self) -> Mapping[str, str]:
        if not _recording:
            return self.parent
        self._manager = tracer().start_as_current_span(
            f"publish {self.destination}",
            context=extract(self.parent),
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": self.subject,
                "messaging.destination.template": self.destination,
                **self.attributes(),
            },
        )
        self._manager.__enter__()
        return inject({})

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._manager is not None:
            self._manager.__exit__(kind, error, traceback)


def set_attributes(attributes: Attributes) -> None:
    """Add attributes to the current span (nothing when not recording)."""
    current_span = trace.get_current_span()
    if current_span.is_recording():
        current_span.set_attributes(dict(attributes))


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
