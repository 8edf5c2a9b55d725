"""End to end: a chain of three actors, run as a process, SIGKILLed in the middle (after
the second actor published, before it acked): each downstream event is stored once."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from kapellmeister.processes import ServiceProcess, wait_for_services
from tests.support import stream_messages

pytestmark = pytest.mark.e2e

ENV = {"KAPELLMEISTER_ACK_WAIT_S": "2", "KAPELLMEISTER_LOG_LEVEL": "WARNING"}
ARGV = [sys.executable, "-m", "tests.actor_chain"]


async def test_a_crash_in_the_middle_of_a_chain_publishes_each_event_once(
    nats_url, nc, js, tmp_path
):
    # The middle actor publishes what it returned, then the process dies before its ack.
    env = {**ENV, "CHAIN_CRASH_ON": "events.chain.doubled"}
    crashing = ServiceProcess("chain", nats_url, tmp_path / "chain-0.log", env, argv=ARGV)
    processes = [crashing.start()]
    try:
        await wait_for_services(nc, ["chain"], processes=processes)
        await js.publish("events.chain.started", b'{"n": 20}', headers={"Nats-Msg-Id": "x-1"})
        for _ in range(200):
            if not crashing.alive():
                break
            await asyncio.sleep(0.05)
        assert crashing.process is not None
        assert crashing.process.poll() == -signal.SIGKILL, crashing.log_tail()
        restarted = ServiceProcess("chain", nats_url, tmp_path / "chain-1.log", ENV, argv=ARGV)
        processes.append(restarted.start())
        await wait_for_services(nc, ["chain"], processes=[restarted])
        for _ in range(200):  # the middle event comes back after the 2 s ack wait
            if await stream_messages(js, "EVENTS", "events.chain.finished"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # and anything doubled would be in by now
        counts = {
            subject: len(await stream_messages(js, "EVENTS", f"events.chain.{subject}"))
            for subject in ("started", "doubled", "incremented", "finished")
        }
        assert counts == {"started": 1, "doubled": 1, "incremented": 1, "finished": 1}
        info = await js.consumer_info("EVENTS", "Doubled-Increment")
        assert info.delivered is not None and info.delivered.consumer_seq == 2  # redelivered
    finally:
        for process in processes:
            process.stop()
