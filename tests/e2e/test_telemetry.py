"""One trace per workflow across every service, and the metrics, seen by a real OTLP
receiver (tests/otlp.py) the services export to over HTTP, as to Jaeger."""

from __future__ import annotations

import asyncio
import collections
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from kapellmeister.processes import ServiceProcess, wait_for_services
from tests.otlp import Receiver, Span
from tests.support import body, call, free_port, saga, wait_finished

pytestmark = pytest.mark.e2e

FREE_DAY = {"user": "ann", "datetime": "2026-11-21T12:00:00"}  # free: agenda, weather, event
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture
def otlp() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


class Services:
    """The three services as processes, exporting to the receiver."""

    def __init__(self, nats_url: str, logs: Path, otlp: Receiver) -> None:
        self.nats_url, self.logs = nats_url, logs
        self.env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "KAPELLMEISTER_SWEEP_INTERVAL_S": "1",
        }
        self.processes: list[ServiceProcess] = []

    def start(self, name: str, **env: str) -> ServiceProcess:
        log = self.logs / f"{name}-{len(self.processes)}.log"
        process = ServiceProcess(name, self.nats_url, log, {**self.env, **env}).start()
        self.processes.append(process)
        return process

    async def up(self, nc: Client, *names: str) -> None:
        live = [p for p in self.processes if p.alive()]
        await wait_for_services(nc, list(names), processes=live)


@pytest.fixture
async def services(nats_url, tmp_path, otlp) -> AsyncIterator[Services]:
    started = Services(nats_url, tmp_path / "logs", otlp)
    try:
        yield started
    finally:
        for process in started.processes:
            process.stop()


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def parent(span: Span, spans: list[Span]) -> Span:
    found = by_id(spans).get(span.parent_span_id)
    assert found is not None, f"{span.service} {span.name}: parent {span.parent_span_id} missing"
    return found


async def test_plan_day_is_one_trace_across_the_three_services(nc, js, services, otlp):
    services.start("weather")
    services.start("agenda")
    services.start("conductor")
    await services.up(nc, "weather", "agenda", "conductor")
    caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "Workflow-Id": "tr-1"}
    await call(nc, "conductor.start.plan_day", FREE_DAY, caller)
    state = (await wait_finished(js, ["tr-1"], timeout=30))["tr-1"]
    assert state["status"] == "COMPLETED"
    assert state["trace_id"] == CALLER_TRACE
    assert body(await call(nc, "conductor.get.tr-1"))["trace_id"] == CALLER_TRACE

    expected = collections.Counter(
        [
            ("conductor", "workflow plan_day"),
            ("conductor", "publish tasks.agenda.activity"),
            ("agenda", "process tasks.agenda.activity"),
            ("agenda", "publish results.{workflow_id}.{task}"),
            ("conductor", "process results.{workflow_id}"),
            ("conductor", "publish tasks.weather.report"),
            ("weather", "process tasks.weather.report"),
            ("weather", "publish results.{workflow_id}.{task}"),
            ("conductor", "process results.{workflow_id}"),
            ("conductor", "publish events.activity.chosen"),
        ]
    )

    def complete() -> bool:
        found = collections.Counter((s.service, s.name) for s in otlp.trace(CALLER_TRACE))
        return found >= expected

    await otlp.until(complete)
    everything = otlp.snapshot()
    spans = [s for s in everything if s.trace_id == CALLER_TRACE]
    # Every span that names the workflow is in its trace, and only its spans are there.
    assert {s.attributes.get("workflow.id") for s in spans} == {"tr-1"}
    assert [s for s in everything if s.attributes.get("workflow.id") == "tr-1"] == spans
    assert len(by_id(spans)) == len(spans)
    # One root, the caller's child; every other span's parent is in the trace.
    [root] = [s for s in spans if s.parent_span_id == CALLER_SPAN]
    assert (root.service, root.name, root.kind) == ("conductor", "workflow plan_day", "SERVER")
    assert root.attributes["workflow.name"] == "plan_day"
    for span in spans:
        if span is not root:
            parent(span, spans)
    # Conductor publish -> agent process -> agent publish -> conductor process.
    for task, agent in (("agenda.activity", "agenda"), ("weather.report", "weather")):
        [process] = [s for s in spans if s.name == f"process tasks.{task}"]
        assert (process.service, process.kind) == (agent, "CONSUMER")
        sent = parent(process, spans)
        assert (sent.service, sent.name, sent.kind) == (
            "conductor",
            f"publish tasks.{task}",
            "PRODUCER",
        )
        assert process.attributes["messaging.system"] == "nats"
        assert process.attributes["messaging.destination.name"] == f"tasks.{task}"
        assert process.attributes["task.attempt"] == 1
        [reply] = [
            s
            for s in spans
            if s.service == agent and s.name == "publish results.{workflow_id}.{task}"
        ]
        assert parent(reply, spans) == process
        [applied] = [s for s in spans if s.kind == "CONSUMER" and parent(s, spans) == reply]
        assert (applied.service, applied.name) == ("conductor", "process results.{workflow_id}")
        assert applied.attributes["task.ref"] == task.split(".")[0]
    assert all(s.error is None for s in spans)
    # The agenda's tally actor, reacting to the workflow's event, continues the trace too.
    await otlp.until(
        lambda: any(s.name == "publish events.activity.tallied" for s in otlp.trace(CALLER_TRACE))
    )
    spans = otlp.trace(CALLER_TRACE)
    [chosen] = [s for s in spans if s.name == "publish events.activity.chosen"]
    [tally] = [s for s in spans if s.name == "process events.activity.chosen"]
    assert (tally.service, parent(tally, spans)) == ("agenda", chosen)


async def test_a_conductor_restart_keeps_the_approval_in_one_trace(nc, js, services, otlp):
    conductor = services.start("conductor")
    await services.up(nc, "conductor")
    await call(nc, "conductor.start.approval", {"money": 100}, {"Workflow-Id": "tr-2"})
    trace_id: str = (await saga(js, "tr-2"))["trace_id"]
    conductor.stop()  # a new conductor takes over the waiting workflow
    services.start("conductor")
    await services.up(nc, "conductor")
    # One approver's tool traces its own request; the other sends no traceparent.
    foreign = "0af7651916cd43dd8448eb211c80319c"
    signed = {"traceparent": f"00-{foreign}-b7ad6b7169203331-01"}
    await call(nc, "conductor.signal.tr-2.approval_1", {"status": "ok", "approver": "a"}, signed)
    await call(nc, "conductor.signal.tr-2.approval_2", {"status": "ok", "approver": "b"})
    state = (await wait_finished(js, ["tr-2"], timeout=30))["tr-2"]
    assert state["status"] == "COMPLETED"

    def signalled() -> bool:
        return bool(sum(s.name == "signal workflow" for s in otlp.trace(trace_id)) == 2)

    await otlp.until(signalled)
    spans = otlp.trace(trace_id)
    [root] = [s for s in spans if s.name == "workflow approval"]
    assert root.parent_span_id == ""  # no caller trace: the workflow's own
    signals = [s for s in spans if s.name == "signal workflow"]
    # Both after the restart, both children of the root the saga kept, the traced one
    # linked to its caller's span.
    assert {s.parent_span_id for s in signals} == {root.span_id}
    assert sorted(s.links for s in signals) == [(), ((foreign, "b7ad6b7169203331"),)]
    assert not otlp.trace(foreign)  # the caller's trace got no span of the workflow
    granted = [s for s in spans if s.name == "publish events.approval.granted"]
    assert len(granted) == 1 and parent(granted[0], spans) in signals


async def test_metrics_count_a_known_run(nc, js, services, otlp):
    port = free_port()
    services.start("weather")
    services.start("agenda")
    services.start(
        "conductor", KAPELLMEISTER_METRICS_PORT=str(port), KAPELLMEISTER_METRICS_HOST="127.0.0.1"
    )
    await services.up(nc, "weather", "agenda", "conductor")
    ids = [f"m-{n}" for n in range(3)]
    for workflow_id in ids:
        await call(nc, "conductor.start.plan_day", FREE_DAY, {"Workflow-Id": workflow_id})
    await call(nc, "conductor.start.approval", {"money": 5}, {"Workflow-Id": "m-wait"})
    await wait_finished(js, ids, timeout=30)

    def value(service: str, metric: str, **attributes: str) -> float | None:
        """The sum of the matching points; None if no point was reported at all."""
        points = [
            p.value
            for p in otlp.metric(service, metric)
            if attributes.items() <= dict(p.attributes).items()
        ]
        return float(sum(points)) if points else None

    def counted() -> bool:
        running = "kapellmeister.workflows.running"
        handled = "kapellmeister.handler.duration"
        return (
            value("conductor", "kapellmeister.workflows.ended", **{"workflow.status": "COMPLETED"})
            == 3
            and value("conductor", running, **{"workflow.name": "approval"}) == 1
            and value("conductor", running, **{"workflow.name": "plan_day"}) == 0
            and value("agenda", handled) == 3
            and value("weather", handled) == 3
            and bool(otlp.metric("conductor", "kapellmeister.deadletters"))
        )

    await otlp.until(counted)
    plan_day = {"workflow.name": "plan_day"}
    assert value("conductor", "kapellmeister.workflows.started", **plan_day) == 3
    assert value("conductor", "kapellmeister.workflows.started") == 4
    for task in ("agenda.activity", "weather.report"):
        # three runs of each task, one attempt each
        assert value("conductor", "kapellmeister.task.duration", **{"task.name": task}) == 3
        assert value("conductor", "kapellmeister.task.attempts", **{"task.name": task}) == 3
        agent = task.split(".")[0]
        handled = {"task.name": task, "outcome": "completed"}
        assert value(agent, "kapellmeister.handler.duration", **handled) == 3
    assert value("conductor", "kapellmeister.deadletters") == 0
    # The same counters, scraped as Prometheus would.
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    )
    started = re.search(
        r'^kapellmeister_workflows_started_total\{[^}]*workflow_name="plan_day"[^}]*\} (\S+)$',
        text.decode(),
        re.MULTILINE,
    )
    assert started is not None and float(started[1]) == 3


async def test_a_repeated_start_adds_nothing_to_another_trace(nc, js, services, otlp):
    services.start("conductor")
    await services.up(nc, "conductor")
    first, second = "1" * 32, "2" * 32
    for trace_id in (first, second):  # a client retrying its start, under a new trace
        headers = {"traceparent": f"00-{trace_id}-{'3' * 16}-01", "Workflow-Id": "tr-4"}
        await call(nc, "conductor.start.approval", {"money": 1}, headers)
    assert (await saga(js, "tr-4"))["trace_id"] == first
    await otlp.until(lambda: any(s.name == "workflow approval" for s in otlp.trace(first)))
    await asyncio.sleep(0.5)  # what the second start might have exported is in by now
    mine = [s for s in otlp.snapshot() if s.attributes.get("workflow.id") == "tr-4"]
    assert {s.trace_id for s in mine} == {first}
    assert [s.name for s in mine].count("workflow approval") == 1


async def test_a_rejection_marks_the_step_that_failed_the_workflow(nc, js, services, otlp):
    services.start("conductor")
    await services.up(nc, "conductor")
    await call(nc, "conductor.start.approval", {"money": 1}, {"Workflow-Id": "tr-3"})
    await call(nc, "conductor.signal.tr-3.approval_1", {"status": "ng", "approver": "x"})
    state = (await wait_finished(js, ["tr-3"], timeout=30))["tr-3"]
    assert state["status"] == "FAILED"

    def signalled() -> list[Span]:
        return [s for s in otlp.trace(state["trace_id"]) if s.name == "signal workflow"]

    await otlp.until(lambda: bool(signalled()))
    [signal] = signalled()
    assert signal.error == state["error"]["message"] == "approval_1 said ng"
    root = [s for s in otlp.trace(state["trace_id"]) if s.name == "workflow approval"]
    assert [s.error for s in root] == [None]
