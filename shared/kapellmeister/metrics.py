"""Metrics through OpenTelemetry, exported by OTLP and, if asked, served to Prometheus.

=====================================  =========  ====================================
instrument                             kind       attributes
=====================================  =========  ====================================
``kapellmeister.workflows.started``    counter    ``workflow.name``
``kapellmeister.workflows.ended``      counter    ``workflow.name``, ``workflow.status``
``kapellmeister.workflows.running``    gauge      ``workflow.name`` (each sweep counts)
``kapellmeister.workflows.expired``    counter    ``workflow.name``: removed, past retention
``kapellmeister.task.duration``        histogram  ``task.name``, ``task.status`` (s: the
                                                  attempt that ended the task, from its
                                                  dispatch to its result, server clock)
``kapellmeister.task.attempts``        histogram  ``task.name``: attempts a task took
``kapellmeister.conductor.conflicts``  counter    compare-and-set conflicts
``kapellmeister.redeliveries``         counter    ``messaging.destination.name`` (stream)
``kapellmeister.deadletters``          gauge      messages in DEADLETTERS (each sweep)
``kapellmeister.handler.duration``     histogram  ``task.name``, ``outcome`` (agents, s)
=====================================  =========  ====================================

Counters count what this process did: sum them over replicas. The two gauges are read
from the shared store, so every conductor reports the same value: take the max.

Configuration: ``OTEL_METRICS_EXPORTER`` (``otlp``, the default, ``console`` or
``none``), ``OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT`` and ``…_PROTOCOL`` as for traces,
``OTEL_METRIC_EXPORT_INTERVAL`` (ms); ``KAPELLMEISTER_METRICS_PORT`` (and
``KAPELLMEISTER_METRICS_HOST``) serve ``/metrics`` for Prometheus. With neither, the
instruments are the API's no-ops.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping
from typing import Final

from opentelemetry import metrics as otel
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource

from kapellmeister.messages import TERMINAL, Saga, TaskRecord
from kapellmeister.tracing import wanted_exporters

__all__ = ["Metrics", "metrics", "setup_metrics", "shutdown_metrics"]

_ENDED: Final = frozenset({"COMPLETED", "FAILED", "TIMED_OUT"})
_provider: MeterProvider | None = None


def setup_metrics(
    service_name: str,
    environ: Mapping[str, str] | None = None,
    port: int | None = None,
    host: str = "0.0.0.0",
) -> None:
    """Install the global meter provider for this service (once, in ``__main__``)."""
    env = os.environ if environ is None else environ
    readers: list[MetricReader] = [
        PeriodicExportingMetricReader(exporter) for exporter in _metric_exporters(env)
    ]
    if port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)
        readers.append(PrometheusMetricReader())
    if not readers:
        return
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    global _provider, _metrics
    _provider = MeterProvider(metric_readers=readers, resource=Resource.create(attributes))
    otel.set_meter_provider(_provider)
    _metrics = None


def shutdown_metrics(timeout_s: float = 3.0) -> None:
    """Export what is due and stop (a stopping service), for at most ``timeout_s``."""
    if _provider is not None:
        _provider.shutdown(timeout_millis=timeout_s * 1000)


def _metric_exporters(env: Mapping[str, str]) -> list[MetricExporter]:
    """The exporters the ``OTEL_*`` variables ask for (none without an endpoint)."""
    console, protocol = wanted_exporters(env, "METRICS")
    found: list[MetricExporter] = [ConsoleMetricExporter()] if console else []
    if protocol is not None:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcExporter,
            )

            found.append(GrpcExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpExporter,
            )

            found.append(HttpExporter())
    return found


class Metrics:
    """The instruments, and what the sweeper last counted for the gauges."""

    def __init__(self, meter: otel.Meter | None = None) -> None:
        # Without a provider the instruments are no-ops: skip the work of feeding them.
        self.enabled = meter is not None or _provider is not None
        meter = meter or otel.get_meter("kapellmeister")
        self.started = meter.create_counter(
            "kapellmeister.workflows.started", "{workflow}", "Workflows started"
        )
        self.ended = meter.create_counter(
            "kapellmeister.workflows.ended", "{workflow}", "Workflows that ended, by status"
        )
        self.expired = meter.create_counter(
            "kapellmeister.workflows.expired",
            "{workflow}",
            "Finished workflows removed from KV, past their retention",
        )
        self.task_duration = meter.create_histogram(
            "kapellmeister.task.duration", "s", "Task attempts, from dispatch to result"
        )
        self.task_attempts = meter.create_histogram(
            "kapellmeister.task.attempts", "{attempt}", "Attempts a task took to end"
        )
        self.conflicts = meter.create_counter(
            "kapellmeister.conductor.conflicts", "{conflict}", "Compare-and-set conflicts"
        )
        self.redeliveries = meter.create_counter(
            "kapellmeister.redeliveries", "{message}", "Messages delivered more than once"
        )
        self.handler_duration = meter.create_histogram(
            "kapellmeister.handler.duration", "s", "Agent handler runs"
        )
        self.running: dict[str, int] = {}
        self.deadletters: int | None = None
        meter.create_observable_gauge(
            "kapellmeister.workflows.running",
            [self._observe_running],
            "{workflow}",
            "Workflows not ended, as the last sweep counted them",
        )
        meter.create_observable_gauge(
            "kapellmeister.deadletters",
            [self._observe_deadletters],
            "{message}",
            "Messages in the DEADLETTERS stream",
        )

    def saga_written(self, before: Saga | None, after: Saga) -> None:
        """Count what one saga write changed: a start, an end, tasks that ended."""
        if not self.enabled:
            return
        name = {"workflow.name": after.workflow}
        if before is None:
            self.started.add(1, name)
        if after.status in TERMINAL and (before is None or before.status not in TERMINAL):
            self.ended.add(1, {**name, "workflow.status": after.status})
        earlier = {t.ref: t for t in before.tasks} if before is not None else {}
        for record in after.tasks:
            if record.status in _ENDED and not _same_end(earlier.get(record.ref), record):
                self._task_ended(record)

    def _task_ended(self, record: TaskRecord) -> None:
        attributes = {"task.name": record.name, "task.status": record.status}
        seconds = _seconds_between(record.scheduled_at, record.ended_at)
        if seconds is not None:
            self.task_duration.record(seconds, attributes)
        self.task_attempts.record(record.attempt, {"task.name": record.name})

    def _observe_running(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"workflow.name": name}) for name, n in self.running.items()]

    def _observe_deadletters(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self.deadletters is None else [Observation(self.deadletters)]


def _same_end(before: TaskRecord | None, after: TaskRecord) -> bool:
    return (
        before is not None
        and before.status == after.status
        and before.attempt == after.attempt
        and before.ended_at == after.ended_at
    )


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    begun = datetime.datetime.fromisoformat(start)
    ended = datetime.datetime.fromisoformat(end)
    return max(0.0, (ended - begun).total_seconds())


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """This process's instruments (on the provider `setup_metrics` installed, if any)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics
