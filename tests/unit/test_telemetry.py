"""Telemetry set-up from the OTEL_* variables, the hand-made root context, log lines tied
to their step, and what one saga write counts (read through the SDK's in-memory reader)."""

from __future__ import annotations

import json
import logging

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetrics,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import SpanKind

from kapellmeister import tracing
from kapellmeister.logs import JsonFormatter, TextFormatter
from kapellmeister.messages import Saga, TaskRecord
from kapellmeister.metrics import Metrics, _metric_exporters
from kapellmeister.tracing import _span_exporters, new_traceparent, trace_id_of

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


def test_no_endpoint_means_no_exporter():
    assert _span_exporters({}) == []
    assert _metric_exporters({}) == []
    assert _span_exporters({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}) == []
    assert _span_exporters({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}) == []


def test_the_otlp_protocol_and_exporters_come_from_the_standard_variables():
    assert [type(e) for e in _span_exporters(ENDPOINT)] == [HttpSpans]
    assert [type(e) for e in _metric_exporters(ENDPOINT)] == [HttpMetrics]
    grpc = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}
    found = _span_exporters({**grpc, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert [type(e) for e in found] == [GrpcSpans]
    both = _span_exporters({**ENDPOINT, "OTEL_TRACES_EXPORTER": "otlp,console"})
    assert sorted(type(e).__name__ for e in both) == ["ConsoleSpanExporter", "OTLPSpanExporter"]


def test_a_hand_made_root_continues_the_callers_trace_sampled():
    caller = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    root = new_traceparent(caller)
    version, trace_id, span_id, flags = root.split("-")
    assert (version, trace_id, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert len(span_id) == 16 and span_id != "00f067aa0ba902b7"
    fresh = new_traceparent({})
    assert len(trace_id_of(fresh)) == 32 and trace_id_of(fresh) != trace_id
    assert trace_id_of("garbage") == ""


def test_a_step_not_recorded_passes_its_trace_on_and_names_itself_to_the_logs():
    tracing.setup_tracing("unit", {})
    parent = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    about = {"workflow.id": "wf-1", "task.ref": "agenda"}
    record = logging.LogRecord("kapellmeister", logging.INFO, __file__, 1, "took %s", ("it",), None)
    with tracing.span("process x", SpanKind.CONSUMER, {**parent, "Other": "1"}, about) as sent:
        assert sent == parent
        line = json.loads(JsonFormatter("agenda").format(record))
        text = TextFormatter("agenda").format(record)
    assert line["message"] == "took it"
    assert (line["service"], line["level"]) == ("agenda", "INFO")
    assert (line["workflow_id"], line["task_ref"], line["trace_id"]) == (
        "wf-1",
        "agenda",
        "4bf92f3577b34da6a3ce929d0e0e4736",
    )
    assert text.endswith(
        "took it [workflow_id=wf-1 task_ref=agenda trace_id=4bf92f3577b34da6a3ce929d0e0e4736]"
    )
    assert "workflow_id" not in json.loads(JsonFormatter("agenda").format(record))


def _saga(status: str, tasks: tuple[TaskRecord, ...]) -> Saga:
    return Saga(
        workflow_id="wf",
        workflow="plan_day",
        version=1,
        status=status,  # type: ignore[arg-type]
        input={},
        output=None,
        tenant="",
        created_at="2026-11-23T10:00:00.000Z",
        updated_at="2026-11-23T10:00:02.000Z",
        trace_id="",
        error=None,
        tasks=tasks,
    )


def _points(
    reader: InMemoryMetricReader,
) -> dict[tuple[str, tuple[tuple[str, object], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, object], ...]], float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, tuple(sorted((point.attributes or {}).items())))
                    found[key] = float(getattr(point, "value", getattr(point, "count", 0)))
    return found


def test_a_saga_write_counts_its_start_its_end_and_the_tasks_that_ended():
    reader = InMemoryMetricReader()
    counted = Metrics(MeterProvider([reader]).get_meter("kapellmeister"))
    waiting = TaskRecord(
        ref="agenda",
        name="agenda.activity",
        type="SIMPLE",
        status="SCHEDULED",
        attempt=1,
        input=None,
        output=None,
        error=None,
        scheduled_at="2026-11-23T10:00:00.000Z",
        started_at=None,
        ended_at=None,
    )
    done = TaskRecord(
        ref="agenda",
        name="agenda.activity",
        type="SIMPLE",
        status="COMPLETED",
        attempt=2,
        input=None,
        output=None,
        error=None,
        scheduled_at="2026-11-23T10:00:00.000Z",
        started_at=None,
        ended_at="2026-11-23T10:00:01.500Z",
    )
    started = _saga("RUNNING", (waiting,))
    counted.saga_written(None, started)
    ended = _saga("COMPLETED", (done,))
    counted.saga_written(started, ended)
    counted.saga_written(ended, ended)  # a write that ends nothing new counts nothing
    points = _points(reader)
    assert points[("kapellmeister.workflows.started", (("workflow.name", "plan_day"),))] == 1
    ended_key = (("workflow.name", "plan_day"), ("workflow.status", "COMPLETED"))
    assert points[("kapellmeister.workflows.ended", ended_key)] == 1
    task = (("task.name", "agenda.activity"), ("task.status", "COMPLETED"))
    assert points[("kapellmeister.task.duration", task)] == 1  # one attempt ended, 1.5 s
    assert points[("kapellmeister.task.attempts", (("task.name", "agenda.activity"),))] == 1
