"""A real OTLP/HTTP receiver for the tests: what Jaeger or a collector would be given.

It serves ``POST /v1/traces`` and ``POST /v1/metrics`` on a loopback port, decodes the
protobuf export requests the services' SDK exporters send (gzip or not) with the
OpenTelemetry protocol's own generated classes, and keeps the spans and the latest value
of each metric point. Nothing of the SDK is mocked: the services export over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status


@dataclasses.dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: str  # SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    error: str | None  # the status message of a span whose status is ERROR


@dataclasses.dataclass(frozen=True)
class Point:
    service: str
    metric: str
    attributes: tuple[tuple[str, Any], ...]
    value: float  # a sum's or gauge's value; a histogram's count
    total: float = 0.0  # a histogram's sum


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _service(resource_attributes: list[KeyValue]) -> str:
    return str(_attributes(resource_attributes).get("service.name", ""))


class Receiver:
    """The receiver's state, filled by its HTTP server thread."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.points: dict[tuple[str, str, tuple[tuple[str, Any], ...]], Point] = {}
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver._traces(ExportTraceServiceRequest.FromString(body))
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver._metrics(ExportMetricsServiceRequest.FromString(body))
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _traces(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            service = _service(list(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Span(
                            service=service,
                            name=span.name,
                            kind=SpanProto.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=_attributes(span.attributes),
                            links=tuple((k.trace_id.hex(), k.span_id.hex()) for k in span.links),
                            error=span.status.message
                            if span.status.code == Status.STATUS_CODE_ERROR
                            else None,
                        )
                    )
        with self.lock:
            self.spans += found

    def _metrics(self, request: ExportMetricsServiceRequest) -> None:
        with self.lock:
            for resource_metrics in request.resource_metrics:
                service = _service(list(resource_metrics.resource.attributes))
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        for point in _points(service, metric):
                            self.points[(service, point.metric, point.attributes)] = point

    def snapshot(self) -> list[Span]:
        """Every span received so far."""
        with self.lock:
            return list(self.spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def metric(self, service: str, name: str) -> list[Point]:
        with self.lock:
            return [p for (s, n, _), p in self.points.items() if s == service and n == name]

    async def until(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        """Wait (bounded) until ``condition()`` holds: exports come every few 100 ms."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            assert loop.time() < deadline, "the services' telemetry did not arrive in time"
            await asyncio.sleep(0.1)


def _points(service: str, metric: Any) -> list[Point]:
    kind = metric.WhichOneof("data")
    found = []
    for point in getattr(metric, kind).data_points:
        attributes = tuple(sorted(_attributes(point.attributes).items()))
        if kind == "histogram":
            found.append(Point(service, metric.name, attributes, point.count, point.sum))
        else:
            value = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
            found.append(Point(service, metric.name, attributes, value))
    return found
