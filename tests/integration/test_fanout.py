"""Huge fan-outs against a real nats-server: a streamed dynamic FORK keeps its saga
bounded, runs at most `max_parallel` items at once, and ends (its JOIN) exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from kapellmeister.agent import Agent, task
from kapellmeister.conductor import Conductor
from kapellmeister.messages import PAYLOAD_MARKER, TaskResult
from kapellmeister.registry import Registry
from tests.support import assert_error, body, call, find_saga, wait_finished


class Item(msgspec.Struct):
    n: int


class Squared(msgspec.Struct):
    n: int
    square: int


class Running:
    """How many items run at once, as the agent sees it."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.calls: list[int] = []


running = Running()


async def square(item: Item) -> Squared:
    running.now += 1
    running.most = max(running.most, running.now)
    running.calls.append(item.n)
    await asyncio.sleep(0.001)
    running.now -= 1
    return Squared(n=item.n, square=item.n * item.n)


class Total(msgspec.Struct):
    items: list[Squared]


class Summed(msgspec.Struct):
    count: int
    total: int


summed: list[int] = []


async def add_up(total: Total) -> Summed:
    summed.append(len(total.items))
    return Summed(count=len(total.items), total=sum(i.square for i in total.items))


def fan_out(name: str, **fork: Any) -> dict[str, Any]:
    return {
        "name": name,
        "input": {"numbers": "list"},
        "tasks": [
            {
                "ref": "each_number",
                "type": "FORK",
                "over": "${workflow.input.numbers}",
                "each": {
                    "ref": "square",
                    "type": "SIMPLE",
                    "task": "fan.square",
                    "input": {"n": "${item}"},
                },
                **fork,
            },
            {"ref": "joined", "type": "JOIN", "join_on": ["each_number"]},
            {
                "ref": "sum",
                "type": "SIMPLE",
                "task": "fan.add_up",
                "input": {"items": "${each_number.output}"},
            },
        ],
        "output": {"count": "${sum.output.count}", "total": "${sum.output.total}"},
    }


@pytest.fixture
async def stack(nc, settings):
    conductor = Conductor(settings, Registry())
    await conductor.start(nc)
    agent = Agent("fan", [task("fan.square", square), task("fan.add_up", add_up)], settings)
    await agent.start(nc)
    running.__init__()  # type: ignore[misc]
    summed.clear()
    yield conductor
    await agent.stop()
    await conductor.stop()


async def register(nc, spec: dict[str, Any]) -> None:
    reply = await call(nc, "conductor.definitions.register", spec)
    assert "Nats-Service-Error" not in (reply.headers or {}), reply.data


async def test_a_streamed_fork_keeps_its_saga_bounded_and_joins_once(nc, js, stack):
    count = 2000
    await register(nc, fan_out("wide", max_parallel=20))
    numbers = list(range(count))
    await call(nc, "conductor.start.wide", {"numbers": numbers}, {"Workflow-Id": "wide-1"})
    kv = await js.key_value("workflows")
    largest = most_records = 0
    while (state := await find_saga(js, "wide-1")) is None or state["status"] == "RUNNING":
        entry = await kv.get("wide-1")
        largest = max(largest, len(entry.value or b""))
        if state is not None:
            most_records = max(most_records, len(state["tasks"]))
        await asyncio.sleep(0.05)
    state = (await wait_finished(js, ["wide-1"]))["wide-1"]
    assert state["status"] == "COMPLETED", state.get("error")
    assert state["output"] == {"count": count, "total": sum(n * n for n in numbers)}
    # Never more than max_parallel items ran at once, and each ran once.
    assert running.most <= 20
    assert sorted(running.calls) == numbers
    # The saga held at most the running items' records (and three more), and its size
    # is the input's (the numbers) plus a little: not one record per item.
    assert most_records <= 20 + 3
    input_size = len(msgspec.json.encode({"numbers": numbers}))
    assert largest < input_size + 20_000, (largest, input_size)
    fork = next(t for t in state["tasks"] if t["ref"] == "each_number")
    assert fork["fanout"]["finished"] == count and fork["attempt"] == 1
    assert fork["output"] == {PAYLOAD_MARKER: "wide-1/each_number/1/output/items"}
    # The JOIN and what follows ran once.
    assert summed == [count]
    joined = next(t for t in state["tasks"] if t["ref"] == "joined")
    assert joined["attempt"] == 1
    # The list is in item order, each item's output.
    inlined = body(await call(nc, "conductor.get.wide-1", {"inline": True}, timeout=30))
    items = next(t for t in inlined["tasks"] if t["ref"] == "each_number")["output"]
    assert items[:3] == [{"n": 0, "square": 0}, {"n": 1, "square": 1}, {"n": 2, "square": 4}]
    assert len(items) == count


async def test_a_late_copy_of_an_ended_items_result_changes_nothing(nc, js, stack):
    await register(nc, fan_out("twice", max_parallel=2))
    await call(nc, "conductor.start.twice", {"numbers": [1, 2, 3]}, {"Workflow-Id": "tw-1"})
    state = (await wait_finished(js, ["tw-1"]))["tw-1"]
    assert state["status"] == "COMPLETED"
    kv = await js.key_value("workflows")
    before = await kv.get("tw-1")
    # The first item's result again, as a redelivery past the dedupe window would bring it.
    again = TaskResult(
        workflow_id="tw-1", ref="square[0]", attempt=1, status="COMPLETED", output={"n": 9}
    )
    await js.publish("results.tw-1.fan.square", msgspec.json.encode(again))
    await asyncio.sleep(1.0)
    assert (await kv.get("tw-1")).revision == before.revision
    assert summed == [3]


async def test_an_empty_streamed_fork_ends_at_once(nc, js, stack):
    await register(nc, fan_out("none", max_parallel=5))
    await call(nc, "conductor.start.none", {"numbers": []}, {"Workflow-Id": "none-1"})
    state = (await wait_finished(js, ["none-1"]))["none-1"]
    assert state["status"] == "COMPLETED"
    assert state["output"] == {"count": 0, "total": 0}


async def test_a_failed_item_fails_the_workflow_and_stops_the_rest(nc, js, stack):
    await register(nc, fan_out("broken", max_parallel=1))
    numbers: list[Any] = ["zero", 1, 2, 3]
    await call(nc, "conductor.start.broken", {"numbers": numbers}, {"Workflow-Id": "br-1"})
    state = (await wait_finished(js, ["br-1"]))["br-1"]
    assert state["status"] == "FAILED"
    assert "square[0]" in state["error"]["message"]
    assert running.calls == []  # one at a time: the rest never started
    assert summed == []


async def test_max_parallel_belongs_to_a_dynamic_fork(nc, stack):
    spec = {
        "name": "static_parallel",
        "tasks": [
            {
                "ref": "both",
                "type": "FORK",
                "max_parallel": 2,
                "branches": [[{"ref": "a", "type": "WAIT"}], [{"ref": "b", "type": "WAIT"}]],
            }
        ],
    }
    error = assert_error(await call(nc, "conductor.definitions.register", spec), 400)
    assert "max_parallel belongs to a dynamic FORK" in error["message"]


async def test_a_rerun_of_a_streamed_fork_runs_its_items_again(nc, js, stack):
    await register(nc, fan_out("again", max_parallel=2))
    await call(nc, "conductor.start.again", {"numbers": [1, 2, 3]}, {"Workflow-Id": "ag-1"})
    assert (await wait_finished(js, ["ag-1"]))["ag-1"]["status"] == "COMPLETED"
    reply = await call(nc, "conductor.rerun.ag-1", {"task": "each_number"})
    assert body(reply)["status"] == "RUNNING"
    for _ in range(100):
        state = await find_saga(js, "ag-1")
        if state is not None and state["status"] == "COMPLETED":
            break
        await asyncio.sleep(0.1)
    assert state is not None and state["status"] == "COMPLETED", state
    assert state["output"] == {"count": 3, "total": 14}
    assert sorted(running.calls) == [1, 1, 2, 2, 3, 3]  # every item ran again
    assert summed == [3, 3]
    fork = next(t for t in state["tasks"] if t["ref"] == "each_number")
    assert fork["attempt"] == 2 and fork["fanout"]["floor"] == 1
    assert fork["output"] == {PAYLOAD_MARKER: "ag-1/each_number/2/output/items"}


async def test_a_gathered_list_is_read_only_by_its_own_workflow(nc, js, stack):
    await register(nc, fan_out("owned", max_parallel=2))
    await call(nc, "conductor.start.owned", {"numbers": [4, 5]}, {"Workflow-Id": "own-1"})
    assert (await wait_finished(js, ["own-1"]))["own-1"]["status"] == "COMPLETED"
    # Another workflow handed the list's reference (it has no digest) cannot read it.
    spec = fan_out("reader")
    spec["input"] = {"numbers": "any"}
    await register(nc, spec)
    stolen = {PAYLOAD_MARKER: "own-1/each_number/1/output/items"}
    await call(nc, "conductor.start.reader", {"numbers": [stolen]}, {"Workflow-Id": "rd-1"})
    state = (await wait_finished(js, ["rd-1"]))["rd-1"]
    assert state["status"] == "FAILED"
    assert "has no sha256" in state["error"]["message"]
