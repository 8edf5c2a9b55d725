"""Conductor-level retries on a real nats-server: durable backoff, history, operator retry."""

from __future__ import annotations

import asyncio
import contextlib
import datetime

import msgspec
import nats.errors
import pytest

from kapellmeister.agent import Agent, task
from kapellmeister.conductor import Conductor
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.errors import TaskError
from kapellmeister.registry import Registry
from kapellmeister.topology import ensure_consumer
from tests.support import body, call, dead_letters, wait_finished


class Job(msgspec.Struct):
    n: int


class Done(msgspec.Struct):
    n: int


FAILURES: dict[str, int] = {}


async def flaky(req: Job) -> Done:
    """Fails (retryably) as many times as FAILURES["left"] says, then succeeds."""
    if FAILURES.get("left", 0) > 0:
        FAILURES["left"] -= 1
        raise RuntimeError("flaky")
    if req.n < 0:
        raise TaskError("negative", code="negative", retryable=False)
    return Done(n=req.n * 2)


RETRYING = """
name: retrying
input: {n: int}
tasks:
  - ref: work
    type: SIMPLE
    task: test.flaky
    input: {n: "${workflow.input.n}"}
    retry: {count: 2, logic: EXPONENTIAL, delay_s: 0.5}
output: {doubled: "${work.output.n}"}
"""


@pytest.fixture
async def flaky_agent(nc, settings):
    # One delivery per attempt: every failure goes straight to the conductor's policy.
    agent = Agent(
        "test", [task("test.flaky", flaky)], msgspec.structs.replace(settings, max_deliver=1)
    )
    await agent.start(nc)
    yield agent
    await agent.stop()


def _seconds(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def conductor_for(settings) -> Conductor:
    return Conductor(settings, Registry([compile_definition(parse_definition(RETRYING))]))


@pytest.fixture
async def conductor(nc, settings, flaky_agent):
    conductor = conductor_for(settings)
    await conductor.start(nc)
    yield conductor
    await conductor.stop()


async def test_a_flaky_task_succeeds_on_its_third_attempt_with_its_history(nc, js, conductor):
    FAILURES["left"] = 2
    started = body(await call(nc, "conductor.start.retrying", {"n": 21}, {"Workflow-Id": "r-1"}))
    assert started["status"] == "RUNNING"
    state = (await wait_finished(js, ["r-1"], timeout=20))["r-1"]
    assert (state["status"], state["output"]) == ("COMPLETED", {"doubled": 42})
    work = state["tasks"][0]
    assert work["attempt"] == 3
    assert [(h["attempt"], h["status"], h["error"]["message"]) for h in work["history"]] == [
        (1, "FAILED", "internal error: RuntimeError"),
        (2, "FAILED", "internal error: RuntimeError"),
    ]
    # Exponential backoff from 0.5 s: 0.5 s, then 1 s, so the third attempt started at
    # least 1.5 s after the first one failed.
    waited = _seconds(work["started_at"]) - _seconds(work["history"][0]["ended_at"])
    assert waited >= 1.5


async def test_a_pending_retry_survives_a_conductor_restart(nc, js, settings, flaky_agent):
    FAILURES["left"] = 1
    first = conductor_for(settings)
    await first.start(nc)
    await call(nc, "conductor.start.retrying", {"n": 5}, {"Workflow-Id": "r-2"})
    for _ in range(100):  # wait until the failure is decided and the backoff timer set
        state = body(await call(nc, "conductor.get.r-2"))
        if state["tasks"][0]["attempt"] == 2:
            break
        await asyncio.sleep(0.02)
    await first.stop()
    second = conductor_for(settings)
    await second.start(nc)
    try:
        state = (await wait_finished(js, ["r-2"], timeout=20))["r-2"]
    finally:
        await second.stop()
    assert (state["status"], state["output"], state["tasks"][0]["attempt"]) == (
        "COMPLETED",
        {"doubled": 10},
        2,
    )


async def test_a_terminal_error_fails_at_once_with_the_agents_error(nc, js, conductor):
    FAILURES["left"] = 0
    await call(nc, "conductor.start.retrying", {"n": -1}, {"Workflow-Id": "r-3"})
    state = (await wait_finished(js, ["r-3"]))["r-3"]
    work = state["tasks"][0]
    assert (state["status"], work["attempt"], work.get("history", [])) == ("FAILED", 1, [])
    assert (work["error"]["type"], work["error"]["retryable"]) == ("negative", False)


async def test_operator_retry_brings_a_failed_workflow_back(nc, js, conductor):
    FAILURES["left"] = 3  # more than the policy's two retries
    await call(nc, "conductor.start.retrying", {"n": 4}, {"Workflow-Id": "r-4"})
    failed = (await wait_finished(js, ["r-4"], timeout=20))["r-4"]
    assert failed["status"] == "FAILED"
    retried = body(await call(nc, "conductor.retry.r-4"))
    assert retried["status"] == "RUNNING"
    state = (await wait_finished(js, ["r-4"], timeout=20))["r-4"]
    assert (state["status"], state["output"], state["tasks"][0]["attempt"]) == (
        "COMPLETED",
        {"doubled": 8},
        4,
    )
    assert [h["attempt"] for h in state["tasks"][0]["history"]] == [1, 2, 3]
    again = await call(nc, "conductor.retry.r-4")
    assert (again.headers or {}).get("Nats-Service-Error-Code") == "409"


class Nap(msgspec.Struct):
    s: float


async def nap(req: Nap) -> Nap:
    await asyncio.sleep(req.s)
    return req


TIMING = """
name: timing
input: {s: float}
timeout_s: 30
tasks:
  - ref: slow
    type: SIMPLE
    task: test.nap
    input: {s: "${workflow.input.s}"}
    timeout_s: 1
    timeout_policy: TIME_OUT_WF
"""

PATIENT = """
name: patient
timeout_s: 1
tasks:
  - {ref: forever, type: WAIT}
"""


@pytest.fixture
async def timing(nc, settings):
    agent = Agent("test", [task("test.nap", nap)], settings)
    await agent.start(nc)
    conductor = Conductor(
        settings, Registry([compile_definition(parse_definition(t)) for t in (TIMING, PATIENT)])
    )
    await conductor.start(nc)
    yield conductor
    await conductor.stop()
    await agent.stop()


async def test_a_task_past_its_timeout_times_the_workflow_out_and_its_late_result_is_stale(
    nc, js, timing
):
    await call(nc, "conductor.start.timing", {"s": 2.5}, {"Workflow-Id": "t-1"})
    state = (await wait_finished(js, ["t-1"], timeout=10))["t-1"]
    assert state["status"] == "TIMED_OUT"
    assert state["tasks"][0]["status"] == "TIMED_OUT"
    await asyncio.sleep(2.0)  # the agent's result arrives late...
    after = body(await call(nc, "conductor.get.t-1"))
    assert (after["status"], after["tasks"][0]["status"], after["tasks"][0]["output"]) == (
        "TIMED_OUT",
        "TIMED_OUT",
        None,
    )  # ...and changes nothing


async def test_a_workflow_past_its_timeout_is_timed_out(nc, js, timing):
    await call(nc, "conductor.start.patient", {}, {"Workflow-Id": "t-2"})
    state = (await wait_finished(js, ["t-2"], timeout=10))["t-2"]
    assert state["status"] == "TIMED_OUT"
    assert state["tasks"][0]["status"] == "CANCELED"
    assert "timeout_s" in state["error"]["message"]


DEAD = """
name: dead
tasks:
  - {ref: doomed, type: SIMPLE, task: test.dead}
"""


async def test_a_task_whose_agent_keeps_dying_fails_its_workflow_and_is_dead_lettered(
    nc, js, settings
):
    conductor = Conductor(settings, Registry([compile_definition(parse_definition(DEAD))]))
    await conductor.start(nc)
    try:
        # A "dead agent": it takes the task twice and never answers, as a process that
        # crashes on the message would.
        durable = await ensure_consumer(
            js, "TASKS", "tasks.test.dead", ack_wait_s=0.5, max_deliver=2
        )
        sub = await js.pull_subscribe_bind(durable=durable, stream="TASKS")
        await call(nc, "conductor.start.dead", {}, {"Workflow-Id": "d-1"})
        for _ in range(2):
            [taken] = await sub.fetch(1, timeout=5)
            assert taken.metadata.num_delivered in (1, 2)
        # The next agent asking for work is when JetStream finds the deliveries spent.
        with contextlib.suppress(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=2)
        await sub.unsubscribe()
        state = (await wait_finished(js, ["d-1"], timeout=15))["d-1"]
        [letter] = await dead_letters(js, "deadletter.conductor")
    finally:
        await conductor.stop()
    assert state["status"] == "FAILED"
    assert state["tasks"][0]["error"]["type"] == "poison"
    assert letter["subject"] == "tasks.test.dead"
    assert "2 deliveries" in letter["reason"]
    assert (await js.stream_info("TASKS")).state.messages == 0


async def test_an_agent_that_gives_up_dead_letters_the_task_and_fails_it(nc, js, conductor):
    FAILURES["left"] = 100  # more than the policy's retries, each a single delivery
    await call(nc, "conductor.start.retrying", {"n": 1}, {"Workflow-Id": "r-9"})
    state = (await wait_finished(js, ["r-9"], timeout=20))["r-9"]
    letters = await dead_letters(js, "deadletter.test")
    FAILURES["left"] = 0
    assert state["status"] == "FAILED"
    assert len(letters) == 3  # one per attempt: attempt 1 and its two retries
    assert all(letter["reason"].startswith("gave up after 1 deliveries") for letter in letters)
