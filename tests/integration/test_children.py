"""Ending a parent workflow terminates the children it still waits for, down the tree."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kapellmeister.conductor import Conductor
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.messages import Started
from kapellmeister.registry import Registry
from kapellmeister.runtime import utc_now
from tests.support import body, call, find_saga, saga, stream_messages, wait_finished

DEFINITIONS = [
    # The child: waits for a signal that never comes.
    "name: waiter\ntasks:\n  - {ref: hold, type: WAIT}\n",
    "name: parent\ntasks:\n  - {ref: kid, type: SUB_WORKFLOW, workflow: waiter}\n",
    # Three levels: top -> middle -> waiter.
    "name: middle\ntasks:\n  - {ref: kid, type: SUB_WORKFLOW, workflow: waiter}\n",
    "name: top\ntasks:\n  - {ref: mid, type: SUB_WORKFLOW, workflow: middle}\n",
    # Ends on its own: its workflow timeout fires on the server's clock.
    "name: hasty\ntimeout_s: 1\ntasks:\n  - {ref: kid, type: SUB_WORKFLOW, workflow: waiter}\n",
]


@pytest.fixture
async def family(nc, settings):
    definitions = [compile_definition(parse_definition(text)) for text in DEFINITIONS]
    conductor = Conductor(settings, Registry(definitions))
    await conductor.start(nc)
    yield conductor
    await conductor.stop()


async def start(nc, name: str, workflow_id: str) -> None:
    reply = body(await call(nc, f"conductor.start.{name}", {}, {"Workflow-Id": workflow_id}))
    assert reply["status"] == "RUNNING"


async def waiting(js, workflow_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The child's saga once its WAIT task waits (it is started by the parent's step)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        state = await find_saga(js, workflow_id)
        if state is not None and state["tasks"] and state["tasks"][-1]["ref"] == "hold":
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"{workflow_id} never waited")


async def results_applied(js, workflow_id: str, timeout: float = 10.0) -> None:
    """Every result published for the workflow has been applied and acked (work queue)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await stream_messages(js, "RESULTS", f"results.{workflow_id}"):
        assert loop.time() < deadline, f"results for {workflow_id} not applied"
        await asyncio.sleep(0.05)


def published(reply: dict[str, Any]) -> dict[str, Any]:
    """The saga a terminate replied with, as stored once its commands were published."""
    return {k: v for k, v in reply.items() if k != "unpublished"}  # cleared: not written


async def test_terminating_a_parent_terminates_its_waiting_child(nc, js, family):
    await start(nc, "parent", "fam-1")
    assert (await waiting(js, "fam-1-kid-1"))["status"] == "RUNNING"

    parent = body(await call(nc, "conductor.terminate.fam-1", {"reason": "budget cut"}))

    assert parent["status"] == "TERMINATED"
    [kid] = parent["tasks"]
    assert (kid["status"], kid["child"]) == ("CANCELED", "fam-1-kid-1")
    assert kid["child_terminated"] == {
        "by": "terminate",
        "reason": "terminated with its parent workflow fam-1 (TERMINATED: budget cut)",
        "compensate": False,
    }
    child = (await wait_finished(js, ["fam-1-kid-1"], timeout=10))["fam-1-kid-1"]
    assert child["status"] == "TERMINATED"
    assert child["error"]["type"] == "terminated"
    assert child["error"]["message"] == kid["child_terminated"]["reason"]
    assert [(t["ref"], t["status"]) for t in child["tasks"]] == [("hold", "CANCELED")]
    # The child's end comes back to the parent as its task's result: it changes nothing.
    await results_applied(js, "fam-1")
    assert await saga(js, "fam-1") == published(parent)


async def test_terminating_with_compensation_passes_it_down(nc, js, family):
    await start(nc, "parent", "fam-2")
    await waiting(js, "fam-2-kid-1")
    await call(nc, "conductor.terminate.fam-2", {"reason": "off", "compensate": True})
    child = (await wait_finished(js, ["fam-2-kid-1"], timeout=10))["fam-2-kid-1"]
    assert child["status"] == "TERMINATED"
    parent = await saga(js, "fam-2")
    assert parent["tasks"][0]["child_terminated"]["compensate"] is True


async def test_termination_cascades_down_three_levels(nc, js, family):
    await start(nc, "top", "tree-1")
    await waiting(js, "tree-1-mid-1-kid-1")

    top = body(await call(nc, "conductor.terminate.tree-1", {"reason": "shutting down"}))

    assert top["status"] == "TERMINATED"
    ended = await wait_finished(js, ["tree-1-mid-1", "tree-1-mid-1-kid-1"], timeout=10)
    middle, leaf = ended["tree-1-mid-1"], ended["tree-1-mid-1-kid-1"]
    assert (middle["status"], leaf["status"]) == ("TERMINATED", "TERMINATED")
    assert middle["error"]["message"] == (
        "terminated with its parent workflow tree-1 (TERMINATED: shutting down)"
    )
    why = middle["error"]["message"]
    assert leaf["error"]["message"] == (
        f"terminated with its parent workflow tree-1-mid-1 (TERMINATED: {why})"
    )
    for workflow_id in ("tree-1", "tree-1-mid-1"):
        await results_applied(js, workflow_id)
    assert await saga(js, "tree-1") == published(top)
    assert (await saga(js, "tree-1-mid-1"))["updated_at"] == middle["updated_at"]


async def test_a_parent_that_times_out_terminates_its_child(nc, js, family):
    """The parent's end comes from a timer on the RESULTS stream, not from a request."""
    await start(nc, "hasty", "fam-3")
    await waiting(js, "fam-3-kid-1")
    ended = await wait_finished(js, ["fam-3", "fam-3-kid-1"], timeout=15)
    assert ended["fam-3"]["status"] == "TIMED_OUT"
    child = ended["fam-3-kid-1"]
    assert child["status"] == "TERMINATED"
    assert child["error"]["message"].startswith(
        "terminated with its parent workflow fam-3 (TIMED_OUT: workflow ran past its timeout_s"
    )


async def test_a_child_started_after_its_parent_ended_is_terminated_at_once(nc, js, family):
    """Another replica starts the child just after the parent's end looked for it."""
    started = await family.apply(
        Started(workflow_id="fam-4", workflow="parent", version=1, input={}, at=utc_now())
    )
    assert started.state is not None  # stored, its child start not yet published
    body(await call(nc, "conductor.terminate.fam-4", {"reason": "budget cut"}))
    assert await find_saga(js, "fam-4-kid-1") is None  # nothing to terminate yet

    await family.publish(started.state, started.commands)  # the late child start

    child = (await wait_finished(js, ["fam-4-kid-1"], timeout=10))["fam-4-kid-1"]
    assert child["status"] == "TERMINATED"
    assert "parent workflow fam-4" in child["error"]["message"]
