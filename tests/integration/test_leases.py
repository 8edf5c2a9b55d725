"""Heartbeat leases (`response_timeout_s`) on a real nats-server.

A slow agent that keeps renewing is left alone; a task still queued is not timed out; an
agent that took a task and went silent has its attempt cancelled and retried, and the
cancelled attempt, if redelivered, is dropped without running.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from kapellmeister.agent import Agent, task
from kapellmeister.conductor import Conductor
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.lease import LEASES, Lease, Look, cancel_if_silent, lease_key, look
from kapellmeister.messages import TaskRequest
from kapellmeister.registry import Registry
from kapellmeister.topology import TASKS, ensure_buckets, ensure_consumer, ensure_streams
from tests.support import body, call, saga, wait_finished


class Job(msgspec.Struct):
    seconds: float


class Done(msgspec.Struct):
    slept: float


RUNS: list[float] = []


async def slow(req: Job) -> Done:
    """Sleeps as long as asked (while the runtime renews its lease)."""
    RUNS.append(req.seconds)
    await asyncio.sleep(req.seconds)
    return Done(slept=req.seconds)


HEARTBEAT = """
name: heartbeat
input: {seconds: float}
tasks:
  - ref: work
    type: SIMPLE
    task: test.slow
    input: {seconds: "${workflow.input.seconds}"}
    response_timeout_s: 0.9
    retry: {count: 1, logic: FIXED, delay_s: 0}
output: {slept: "${work.output.slept}"}
"""


@pytest.fixture
async def leases(js):
    await ensure_streams(js)
    return (await ensure_buckets(js))[LEASES]


@pytest.fixture
async def conductor(nc, settings):
    conductor = Conductor(settings, Registry([compile_definition(parse_definition(HEARTBEAT))]))
    await conductor.start(nc)
    yield conductor
    await conductor.stop()


async def start_agent(nc, settings) -> Agent:
    agent = Agent("test", [task("test.slow", slow)], settings)
    await agent.start(nc)
    return agent


async def test_a_lease_is_claimed_renewed_checked_and_cancelled(leases):
    lease = Lease(leases, "w1.work.1", "agent/a")
    assert await lease.claim()
    claimed = lease.revision
    assert await look(leases, "w1.work.1", 0) == (Look.ALIVE, claimed)
    assert await look(leases, "w1.work.1", claimed) == (Look.SILENT, claimed)
    assert await lease.renew()
    assert await look(leases, "w1.work.1", claimed) == (Look.ALIVE, lease.revision)
    # A conductor that read the lease before the renewal cannot cancel it.
    assert not await cancel_if_silent(leases, "w1.work.1", claimed)
    assert await cancel_if_silent(leases, "w1.work.1", lease.revision)
    assert not await lease.renew()  # the holder learns it was cancelled
    await lease.release()  # and cannot erase the cancellation
    assert (await look(leases, "w1.work.1", 0))[0] is Look.CANCELLED
    assert not await Lease(leases, "w1.work.1", "agent/b").claim()  # a redelivery is dropped


async def test_a_redelivered_attempt_is_taken_over_from_a_silent_holder(leases):
    first = Lease(leases, "w2.work.1", "agent/a")
    assert await first.claim()
    second = Lease(leases, "w2.work.1", "agent/b")
    assert await second.claim()
    assert second.revision > first.revision
    assert not await first.renew()  # the old holder lost it
    await second.release()
    assert await look(leases, "w2.work.1", 0) == (Look.WAITING, 0)


async def test_a_slow_agent_that_renews_is_not_timed_out(nc, js, settings, conductor):
    agent = await start_agent(nc, settings)
    try:
        await call(nc, "conductor.start.heartbeat", {"seconds": 3.0}, {"Workflow-Id": "hb-1"})
        state = (await wait_finished(js, ["hb-1"], timeout=20))["hb-1"]
    finally:
        await agent.stop()
    work = state["tasks"][0]
    # 3 s of work under a 0.9 s response timeout: only renewals kept it alive.
    assert (state["status"], work["attempt"], work.get("history", [])) == ("COMPLETED", 1, [])
    assert state["output"] == {"slept": 3.0}
    assert (await look(await js.key_value(LEASES), lease_key("hb-1", "work", 1), 0))[0] is (
        Look.WAITING
    )


async def test_a_queued_task_is_not_timed_out_before_an_agent_takes_it(nc, js, settings, conductor):
    await call(nc, "conductor.start.heartbeat", {"seconds": 0.1}, {"Workflow-Id": "hb-2"})
    await asyncio.sleep(3.0)  # three response timeouts with no agent at all
    assert body(await call(nc, "conductor.get.hb-2"))["tasks"][0]["attempt"] == 1
    agent = await start_agent(nc, settings)
    try:
        state = (await wait_finished(js, ["hb-2"], timeout=20))["hb-2"]
    finally:
        await agent.stop()
    assert (state["status"], state["tasks"][0]["attempt"]) == ("COMPLETED", 1)


async def test_a_silent_agent_loses_its_attempt_to_a_retry(nc, js, settings, conductor, leases):
    # A hung agent, by the protocol: it takes the task, claims the lease, then says nothing.
    await call(nc, "conductor.start.heartbeat", {"seconds": 0.1}, {"Workflow-Id": "hb-3"})
    durable = await ensure_consumer(
        js, TASKS, "tasks.test.slow", ack_wait_s=settings.ack_wait_s, max_deliver=5
    )
    pull = await js.pull_subscribe_bind(durable, TASKS)
    [held] = await pull.fetch(1, timeout=5)
    request = msgspec.json.decode(held.data, type=TaskRequest)
    assert (request.attempt, request.response_timeout_s) == (1, 0.9)
    assert await Lease(leases, lease_key("hb-3", "work", 1), "hung/agent").claim()
    RUNS.clear()
    agent = await start_agent(nc, settings)
    try:
        state = (await wait_finished(js, ["hb-3"], timeout=20))["hb-3"]
        # The held message comes back after the ack wait: the agent drops it unrun.
        await held.nak()
        await asyncio.sleep(1.0)
    finally:
        await agent.stop()
        await pull.unsubscribe()
    work = state["tasks"][0]
    assert (state["status"], work["attempt"]) == ("COMPLETED", 2)
    [first] = work["history"]
    assert (first["attempt"], first["status"], first["error"]["type"]) == (
        1,
        "FAILED",
        "response_timeout",
    )
    assert RUNS == [0.1]  # attempt 2 ran; attempt 1 never did
    assert (await look(leases, lease_key("hb-3", "work", 1), 0))[0] is Look.CANCELLED
    assert (await saga(js, "hb-3"))["status"] == "COMPLETED"
