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
from tests.support import call

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
        keys = [k for k in await kv.keys() if k.startswith("greeting-")]
        assert keys == ["greeting-signup-42"]
        history = await kv.history("greeting-signup-42")
        assert len(history) == 1  # created once; the redelivery wrote nothing
        assert (await js.stream_info("EVENTS")).state.messages == 1
    finally:
        for process in processes:
            process.stop()
