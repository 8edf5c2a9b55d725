"""Definitions registered at run time: checked, versioned in KV, served by every replica."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tests.support import assert_error, body, call, saga, wait_finished


def greeting(version: int, word: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "greet",
        "version": version,
        "input": {"who": "str"},
        "tasks": [
            {"ref": "wait", "type": "WAIT"},
            {
                "ref": "say",
                "type": "SET_VARIABLE",
                "input": {"said": f"{word} ${{workflow.input.who}}"},
            },
        ],
        "output": {"said": "${workflow.variables.said}"},
        **extra,
    }


async def register(nc, definition: Any):
    return await call(nc, "conductor.definitions.register", definition)


async def stored(js) -> int:
    return int((await js.stream_info("KV_definitions")).state.messages)


async def test_register_get_list_and_start_the_latest_or_a_named_version(nc, js, stack):
    assert body(await register(nc, greeting(1, "hello"))) == {"name": "greet", "version": 1}
    assert body(await register(nc, greeting(2, "hi"))) == {"name": "greet", "version": 2}
    got = body(await call(nc, "conductor.definitions.get.greet"))
    assert (got["name"], got["version"]) == ("greet", 2)
    first = body(
        await call(nc, "conductor.definitions.get.greet", headers={"Workflow-Version": "1"})
    )
    assert first["tasks"][1]["input"] == {"said": "hello ${workflow.input.who}"}
    listed = {
        d["name"]: d for d in body(await call(nc, "conductor.definitions.list", {}))["definitions"]
    }
    assert listed["greet"]["versions"] == [1, 2]
    assert {"plan_day", "approval"} <= set(listed)
    latest = body(await call(nc, "conductor.start.greet", {"who": "ann"}))
    older = body(await call(nc, "conductor.start.greet", {"who": "bob"}, {"Workflow-Version": "1"}))
    for workflow_id in (latest["workflow_id"], older["workflow_id"]):
        await call(nc, f"conductor.signal.{workflow_id}.wait", {})
    states = await wait_finished(js, [latest["workflow_id"], older["workflow_id"]])
    assert states[latest["workflow_id"]]["output"] == {"said": "hi ann"}
    assert states[older["workflow_id"]]["output"] == {"said": "hello bob"}
    assert states[older["workflow_id"]]["version"] == 1


async def test_a_running_workflow_keeps_its_version_when_a_new_one_is_registered(nc, js, stack):
    await register(nc, greeting(1, "hello"))
    started = body(await call(nc, "conductor.start.greet", {"who": "ann"}, {"Workflow-Id": "g-1"}))
    assert started["status"] == "RUNNING"
    await register(nc, greeting(2, "hi"))
    await call(nc, "conductor.signal.g-1.wait", {})
    state = (await wait_finished(js, ["g-1"]))["g-1"]
    assert (state["version"], state["output"]) == (1, {"said": "hello ann"})


async def test_versions_are_immutable(nc, js, stack):
    await register(nc, greeting(1, "hello"))
    assert body(await register(nc, greeting(1, "hello"))) == {
        "name": "greet",
        "version": 1,
    }  # same: ok
    error = assert_error(await register(nc, greeting(1, "bonjour")), 409)
    assert "register version 2" in error["message"]
    got = body(await call(nc, "conductor.definitions.get.greet"))
    assert got["tasks"][1]["input"] == {"said": "hello ${workflow.input.who}"}


BROKEN: list[tuple[str, dict[str, Any], str]] = [
    (
        "typo",
        {"name": "b", "tasks": [{"ref": "a", "type": "SWITCH", "expresion": "x"}]},
        "expresion",
    ),
    ("type", {"name": "b", "tasks": [{"ref": "a", "type": "LAMBDA"}]}, "$.tasks[0].type"),
    (
        "dup",
        {"name": "b", "tasks": [{"ref": "a", "type": "WAIT"}, {"ref": "a", "type": "WAIT"}]},
        "duplicate ref 'a' - at `tasks[1].ref`",
    ),
    (
        "task",
        {
            "name": "b",
            "tasks": [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "weather.reprot",
                    "input": {"date": "2019-04-02"},
                }
            ],
        },
        "tasks[0].task: no agent serves task 'weather.reprot'",
    ),
    (
        "field",
        {
            "name": "b",
            "tasks": [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "weather.report",
                    "input": {"date": "2019-04-02"},
                }
            ],
            "output": {"t": "${a.output.temprature}"},
        },
        "output.t: `${a.output.temprature}`: weather.report has no output field 'temprature'",
    ),
    (
        "input",
        {
            "name": "b",
            "tasks": [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "weather.report",
                    "input": {"day": "2019-04-02"},
                }
            ],
        },
        "tasks[0].input.day: weather.report takes no field 'day'",
    ),
    (
        "order",
        {
            "name": "b",
            "tasks": [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "weather.report",
                    "input": {"date": "${z.output.x}"},
                },
                {"ref": "z", "type": "WAIT"},
            ],
        },
        "tasks[0].input.date: `${z.output.x}` names a task that cannot have run before it",
    ),
    (
        "switch",
        {
            "name": "b",
            "tasks": [
                {
                    "ref": "w",
                    "type": "SIMPLE",
                    "task": "weather.report",
                    "input": {"date": "2019-04-02"},
                },
                {
                    "ref": "s",
                    "type": "SWITCH",
                    "expression": "${w.output.rain}",
                    "cases": {"true": []},
                },
            ],
        },
        "tasks[1].default: SWITCH 's' has no default",
    ),
    (
        "cycle",
        {"name": "b", "tasks": [{"ref": "again", "type": "SUB_WORKFLOW", "workflow": "b"}]},
        "tasks[0].workflow: sub-workflows form a cycle: b -> b",
    ),
    (
        "unknown sub",
        {"name": "b", "tasks": [{"ref": "s", "type": "SUB_WORKFLOW", "workflow": "nope"}]},
        "tasks[0].workflow: no workflow definition named 'nope'",
    ),
]


@pytest.mark.parametrize(("case", "definition", "fragment"), BROKEN, ids=[c[0] for c in BROKEN])
async def test_a_definition_that_cannot_work_is_rejected_with_its_path(
    nc, js, stack, case, definition, fragment
):
    before = await stored(js)
    error = assert_error(await register(nc, definition), 400)
    assert fragment in error["message"], error["message"]
    assert await stored(js) == before


async def test_not_json_at_all_is_a_400(nc, js, stack):
    assert_error(await register(nc, b"[1, 2"), 400)
    assert_error(await register(nc, b""), 400)


async def test_a_definition_registered_on_one_replica_starts_on_another(
    nc, js, two_conductors, agents
):
    one, two = two_conductors
    await one.definitions.register(msgspec.json.encode(greeting(1, "hey")))
    definition = await two.definitions.get("greet")  # not yet followed: read on the miss
    assert definition.version == 1
    started = body(await call(nc, "conductor.start.greet", {"who": "cy"}, {"Workflow-Id": "g-9"}))
    assert started["status"] == "RUNNING"
    assert (await saga(js, "g-9"))["workflow"] == "greet"
