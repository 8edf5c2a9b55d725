"""End to end through the public NATS API: approvals, registered definitions, durable delays.

The conductor, weather and agenda run as processes (``python -m services.<name>``); the
tests talk to them only as a user would, with plain requests (``nats req``), and read
the KV bucket and the EVENTS stream as ``nats kv get`` and ``nats stream get`` would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import nats.errors
import pytest

from kapellmeister.processes import wait_for_services
from kapellmeister.topology import EVENTS
from tests.support import Stack, assert_error, body, call, saga, stream_messages, wait_finished

pytestmark = pytest.mark.e2e

# Short ack wait and sweep so a killed conductor's work is picked up within the test.
ENV = {"KAPELLMEISTER_ACK_WAIT_S": "3", "KAPELLMEISTER_SWEEP_INTERVAL_S": "1"}
SERVICES = ("conductor", "weather", "agenda")


async def _until_answered(nc, subject: str, payload: Any, timeout: float = 15.0) -> None:
    """Request ``subject`` until someone answers: an agent serves its endpoint only once its
    task registration is stored, so a definition using it can be registered after this."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await call(nc, subject, payload, timeout=1.0)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            assert loop.time() < deadline, f"nobody answers {subject}"
            await asyncio.sleep(0.1)


@pytest.fixture
async def stack(nats_url, tmp_path, nc):
    stack = Stack(nats_url, tmp_path / "logs", ENV)
    for name in SERVICES:
        stack.start(name)
    try:
        await wait_for_services(nc, list(SERVICES), processes=stack.processes)
        await _until_answered(nc, "weather.report", {"date": "2019-04-02"})
        await _until_answered(nc, "agenda.activity", {"datetime": "2019-04-06T12:00:00"})
        yield stack
    finally:
        stack.stop()


async def start(nc, name: str, data: Any, workflow_id: str, **headers: str) -> dict[str, Any]:
    reply = await call(nc, f"conductor.start.{name}", data, {"Workflow-Id": workflow_id, **headers})
    return dict(body(reply))


async def signal(nc, workflow_id: str, ref: str, data: Any):
    return await call(nc, f"conductor.signal.{workflow_id}.{ref}", data)


async def register(nc, definition: dict[str, Any]) -> dict[str, Any]:
    reply = await call(nc, "conductor.definitions.register", definition)
    assert not (reply.headers or {}).get("Nats-Service-Error-Code"), reply.data
    return dict(body(reply))


async def granted(js) -> list[dict[str, Any]]:
    return [
        msgspec.json.decode(m.data or b"")
        for m in await stream_messages(js, EVENTS, "events.approval.granted")
    ]


async def wait_granted(js, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The granted events once there is at least one (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await granted(js)
        if found or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


def task_of(state: dict[str, Any], ref: str) -> dict[str, Any]:
    return dict(next(t for t in state["tasks"] if t["ref"] == ref))


# --- the shipped approval workflow ---------------------------------------------------------


async def test_approval_by_signals_pays_only_after_two_oks(nc, js, stack):
    ok = {"status": "ok", "approver": "kim"}
    ng = {"status": "ng", "approver": "lee"}
    assert await start(nc, "approval", {"money": 1000}, "pay-ok") == {
        "workflow_id": "pay-ok",
        "status": "RUNNING",
    }
    assert body(await signal(nc, "pay-ok", "approval_1", ok))["status"] == "RUNNING"
    done = body(await signal(nc, "pay-ok", "approval_2", ok))
    assert (done["status"], done["output"]) == ("COMPLETED", {"your_got_the_money": 1000})
    assert await wait_granted(js) == [{"workflow_id": "pay-ok", "money": 1000}]

    for workflow_id, answers in [("pay-ok-ng", [ok, ng]), ("pay-ng", [ng])]:
        await start(nc, "approval", {"money": 50}, workflow_id)
        for i, answer in enumerate(answers, start=1):
            reply = await signal(nc, workflow_id, f"approval_{i}", answer)
        state = (await wait_finished(js, [workflow_id], timeout=10))[workflow_id]
        assert body(reply)["status"] == state["status"] == "FAILED"
        assert state["output"] == {"your_got_the_money": None}
        assert "granted" not in [t["ref"] for t in state["tasks"]]

    # Still exactly one event: for the approved workflow only, never doubled.
    assert await granted(js) == [{"workflow_id": "pay-ok", "money": 1000}]
    assert (await saga(js, "pay-ok"))["status"] == "COMPLETED"


async def test_a_signal_to_a_task_that_is_not_waiting_is_a_409(nc, js, stack):
    ok = {"status": "ok", "approver": "kim"}
    await start(nc, "approval", {"money": 5}, "pay-409")
    revision = (await js.stream_info("KV_workflows")).state.last_seq
    not_reached = assert_error(await signal(nc, "pay-409", "approval_2", ok), 409, "conflict")
    assert "approval_2" in not_reached["message"]
    not_a_wait = assert_error(await signal(nc, "pay-409", "granted", ok), 409, "conflict")
    assert "granted" in not_a_wait["message"]
    assert (await js.stream_info("KV_workflows")).state.last_seq == revision

    await signal(nc, "pay-409", "approval_1", ok)
    state = await saga(js, "pay-409")
    assert_error(await signal(nc, "pay-409", "approval_1", ok), 409, "conflict")  # done already
    assert await saga(js, "pay-409") == state

    await signal(nc, "pay-409", "approval_2", ok)
    finished = assert_error(await signal(nc, "pay-409", "approval_2", ok), 409, "conflict")
    assert "COMPLETED" in finished["message"]


# --- a registered definition using every control-flow task ---------------------------------

CHILD: dict[str, Any] = {
    "name": "e2e_child",
    "input": {"when": "datetime"},
    "tasks": [
        {
            "ref": "plan",
            "type": "SIMPLE",
            "task": "agenda.activity",
            "input": {"datetime": "${workflow.input.when}"},
        }
    ],
    "output": {"activity": "${plan.output.activity}", "asked": "${workflow.input.when}"},
}

TOUR: dict[str, Any] = {
    "name": "e2e_tour",
    "input": {"date": "str", "when": "str", "dates": "list"},
    "tasks": [
        {
            "ref": "first",
            "type": "SIMPLE",
            "task": "weather.report",
            "input": {"date": "${workflow.input.date}"},
        },
        {
            # A boolean covered by both cases needs no default.
            "ref": "wet",
            "type": "SWITCH",
            "expression": "${first.output.rain}",
            "cases": {
                "true": [{"ref": "umbrella", "type": "SET_VARIABLE", "input": {"sky": "wet"}}],
                "false": [
                    {
                        "ref": "sunhat",
                        "type": "SET_VARIABLE",
                        "input": {"sky": "dry at ${first.output.temperature}"},
                    }
                ],
            },
        },
        {
            "ref": "both",
            "type": "FORK",
            "branches": [
                [{"ref": "nap", "type": "DELAY", "duration_s": 2}],
                [
                    {
                        "ref": "kid",
                        "type": "SUB_WORKFLOW",
                        "workflow": "e2e_child",
                        "input": {"when": "${workflow.input.when}"},
                    }
                ],
            ],
        },
        {"ref": "joined", "type": "JOIN", "join_on": ["nap", "kid"]},
        {
            "ref": "reports",
            "type": "FORK",
            "over": "${workflow.input.dates}",
            "each": {
                "ref": "report",
                "type": "SIMPLE",
                "task": "weather.report",
                "input": {"date": "${item}"},
            },
        },
    ],
    "output": {
        "sky": "${workflow.variables.sky}",
        "kid": "${joined.output.kid}",
        "first": "${first.output}",
        "reports": "${reports.output}",
    },
}


async def test_switch_forks_join_sub_workflow_and_delay_in_a_registered_definition(nc, js, stack):
    assert await register(nc, CHILD) == {"name": "e2e_child", "version": 1}
    assert await register(nc, TOUR) == {"name": "e2e_tour", "version": 1}
    dates = ["2019-01-10", "2019-04-02", "2019-07-15", "2019-10-30"]
    data = {"date": "2019-04-02", "when": "2026-11-21T12:00:00", "dates": dates}
    assert (await start(nc, "e2e_tour", data, "tour-1"))["status"] == "RUNNING"

    state = (await wait_finished(js, ["tour-1"], timeout=20))["tour-1"]

    async def weather(date: str) -> dict[str, Any]:
        return dict(body(await call(nc, "weather.report", {"date": date})))

    first = await weather("2019-04-02")
    activity = body(await call(nc, "agenda.activity", {"datetime": data["when"]}))["activity"]
    assert state["status"] == "COMPLETED", state["error"]
    assert state["output"] == {
        "sky": "wet" if first["rain"] else f"dry at {first['temperature']}",
        "kid": {"activity": activity, "asked": data["when"]},
        "first": first,
        "reports": [await weather(d) for d in dates],
    }
    chosen = "umbrella" if first["rain"] else "sunhat"
    ran = {t["ref"] for t in state["tasks"]}
    assert chosen in ran
    assert ({"umbrella", "sunhat"} - {chosen}).isdisjoint(ran)
    assert {f"report[{i}]" for i in range(len(dates))} <= ran
    nap = task_of(state, "nap")
    assert nap["ended_at"] >= nap["input"]["fire_at"]
    assert set(task_of(state, "joined")["output"]) == {"nap", "kid"}
    kid = task_of(state, "kid")
    child = await saga(js, kid["child"])
    assert (child["workflow"], child["status"]) == ("e2e_child", "COMPLETED")
    assert child["parent"]["workflow_id"] == "tour-1"


# --- durability and versions ---------------------------------------------------------------

NAP: dict[str, Any] = {
    "name": "e2e_nap",
    "input": {"date": "str"},
    "tasks": [
        {"ref": "nap", "type": "DELAY", "duration_s": 3},
        {
            "ref": "after",
            "type": "SIMPLE",
            "task": "weather.report",
            "input": {"date": "${workflow.input.date}"},
        },
    ],
    "output": {"report": "${after.output}"},
}


async def test_a_delay_fires_across_a_conductor_killed_right_after_the_start(nc, js, stack):
    await register(nc, NAP)
    assert (await start(nc, "e2e_nap", {"date": "2019-04-02"}, "nap-1"))["status"] == "RUNNING"
    next(p for p in stack.processes if p.name == "conductor").kill()
    await asyncio.sleep(4.0)  # the timer fires while no conductor is running
    assert task_of(await saga(js, "nap-1"), "nap")["status"] == "SCHEDULED"
    again = stack.start("conductor")
    await wait_for_services(nc, ["conductor"], processes=[again])

    state = (await wait_finished(js, ["nap-1"], timeout=20))["nap-1"]
    assert state["status"] == "COMPLETED", state["error"]
    report = body(await call(nc, "weather.report", {"date": "2019-04-02"}))
    assert state["output"] == {"report": report}
    nap = task_of(state, "nap")
    assert (nap["status"], nap["attempt"]) == ("COMPLETED", 1)
    assert nap["ended_at"] >= nap["input"]["fire_at"]


def greeting(version: int, word: str) -> dict[str, Any]:
    return {
        "name": "e2e_greet",
        "version": version,
        "input": {"who": "str"},
        "tasks": [
            {"ref": "hold", "type": "WAIT"},
            {
                "ref": "say",
                "type": "SET_VARIABLE",
                "input": {"said": f"{word} ${{workflow.input.who}}"},
            },
        ],
        "output": {"said": "${workflow.variables.said}", "version": "${workflow.version}"},
    }


async def test_a_running_workflow_keeps_its_version_when_a_new_one_is_registered(nc, js, stack):
    assert await register(nc, greeting(1, "hello")) == {"name": "e2e_greet", "version": 1}
    assert (await start(nc, "e2e_greet", {"who": "ann"}, "greet-1"))["status"] == "RUNNING"
    assert await register(nc, greeting(2, "hi")) == {"name": "e2e_greet", "version": 2}
    assert body(await signal(nc, "greet-1", "hold", {}))["status"] == "COMPLETED"
    old = (await wait_finished(js, ["greet-1"], timeout=10))["greet-1"]
    assert (old["version"], old["output"]) == (1, {"said": "hello ann", "version": 1})

    await start(nc, "e2e_greet", {"who": "bob"}, "greet-2")
    await signal(nc, "greet-2", "hold", {})
    new = (await wait_finished(js, ["greet-2"], timeout=10))["greet-2"]
    assert (new["version"], new["output"]) == (2, {"said": "hi bob", "version": 2})
