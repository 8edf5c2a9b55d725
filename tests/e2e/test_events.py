"""End to end: an event published as the ``nats`` CLI would starts its workflow exactly
once, even when published twice with the same id, or redelivered after the conductor
died before acking it. The services run as processes."""

from __future__ import annotations

import asyncio
import signal
import sys

import msgspec
import pytest

from kapellmeister.processes import ServiceProcess, wait_for_services
from tests.support import call, stored_keys, stream_messages

pytestmark = pytest.mark.e2e

GREETING = {
    "name": "greeting",
    "input": {"user": "str"},
    "triggers": [{"subject": "events.user.*.joined", "input": {"user": "${event.user}"}}],
    "tasks": [{"ref": "hold", "type": "WAIT"}],
}
ENV = {"KAPELLMEISTER_ACK_WAIT_S": "2", "KAPELLMEISTER_LOG_LEVEL": "WARNING"}


async def test_an_event_starts_one_workflow_across_a_crash_before_its_ack(
    nats_url, nc, js, tmp_path
):
    # This conductor SIGKILLs itself right before its first ack: the event's, after it
    # started the workflow. JetStream redelivers the event to the next conductor.
    crashing = ServiceProcess(
        "conductor",
        nats_url,
        tmp_path / "conductor-0.log",
        {**ENV, "FAULTS_CRASH_AT": "after-publish:1"},
        argv=[sys.executable, "-m", "tests.faults.crashing_conductor"],
    )
    crashing.start()
    processes = [crashing]
    try:
        await wait_for_services(nc, ["conductor"], processes=processes)
        reply = await call(nc, "conductor.definitions.register", GREETING)
        assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
        event = msgspec.json.encode({"user": "ann"})
        headers = {"Nats-Msg-Id": "signup-42"}
        await js.publish("events.user.eu.joined", event, headers=headers)
        for _ in range(200):
            if not crashing.alive():
                break
            await asyncio.sleep(0.05)
        assert crashing.process is not None
        assert crashing.process.poll() == -signal.SIGKILL, crashing.log_tail()
        await js.publish("events.user.eu.joined", event, headers=headers)  # a second publish
        successor = ServiceProcess("conductor", nats_url, tmp_path / "conductor-1.log", ENV).start()
        processes.append(successor)
        await wait_for_services(nc, ["conductor"], processes=[successor])
        for _ in range(200):  # the redelivered event is taken and acked
            info = await js.consumer_info("EVENTS", "conductor-triggers")
            delivered = info.delivered.consumer_seq if info.delivered else 0
            if info.num_ack_pending == 0 and info.num_pending == 0 and delivered >= 2:
                break
            await asyncio.sleep(0.05)
        # One event stored, delivered twice: the successor saw it again.
        assert info.delivered is not None
        assert (info.delivered.stream_seq, info.delivered.consumer_seq) == (1, 2)
        kv = await js.key_value("workflows")
        keys = await stored_keys(js, "workflows", "greeting=")
        assert keys == ["greeting=signup-42"]
        history = await kv.history("greeting=signup-42")
        assert len(history) == 1  # created once; the redelivery wrote nothing
        assert (await js.stream_info("EVENTS")).state.messages == 1
    finally:
        for process in processes:
            process.stop()


async def test_the_agendas_actors_tally_activities_and_notify_approvals(nats_url, nc, js, tmp_path):
    processes = [
        ServiceProcess(name, nats_url, tmp_path / f"{name}.log", ENV).start()
        for name in ("weather", "agenda", "conductor")
    ]
    try:
        await wait_for_services(
            nc, ["weather", "agenda", "agenda-actors", "conductor"], processes=processes
        )
        for n, when in enumerate(("2026-11-21T12:00:00", "2026-11-22T12:00:00")):
            body = {"user": "ann", "datetime": when}
            await call(nc, "conductor.start.plan_day", body, {"Workflow-Id": f"ev-{n}"})
        await call(nc, "conductor.start.approval", {"money": 100}, {"Workflow-Id": "ev-pay"})
        for ref in ("approval_1", "approval_2"):
            await call(nc, f"conductor.signal.ev-pay.{ref}", {"status": "ok", "approver": "a"})
        tallied: list[dict[str, object]] = []
        for _ in range(200):
            tallied = [
                msgspec.json.decode(m.data or b"")
                for m in await stream_messages(js, "EVENTS", "events.activity.tallied")
            ]
            sent = await stream_messages(js, "EVENTS", "events.notification.sent")
            if len(tallied) == 2 and sent:
                break
            await asyncio.sleep(0.05)
        assert sorted(t["count"] for t in tallied) == [1, 2]  # type: ignore[type-var]
        assert {t["user"] for t in tallied} == {"ann"}
        [notice] = sent
        assert msgspec.json.decode(notice.data or b"") == {
            "to": "finance",
            "text": "pay 100 (approved in ev-pay)",
            "workflow_id": "ev-pay",
        }
    finally:
        for process in processes:
            process.stop()
