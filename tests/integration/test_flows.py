"""Approvals by signal, durable delays, sub-workflows and forks, against a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from kapellmeister.conductor import Conductor
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.registry import Registry
from services.conductor.__main__ import registry
from tests.support import assert_error, body, call, saga, stream_messages, wait_finished


async def start(nc, name: str, data: Any, workflow_id: str) -> dict[str, Any]:
    return dict(body(await call(nc, f"conductor.start.{name}", data, {"Workflow-Id": workflow_id})))


async def signal(nc, workflow_id: str, ref: str, data: Any):
    return await call(nc, f"conductor.signal.{workflow_id}.{ref}", data)


async def granted(js) -> list[dict[str, Any]]:
    return [
        msgspec.json.decode(m.data or b"")
        for m in await stream_messages(js, "EVENTS", "events.approval.granted")
    ]


async def test_two_oks_pay_the_money_and_announce_it(nc, js, conductor):
    assert await start(nc, "approval", {"money": 1000}, "pay-1") == {
        "workflow_id": "pay-1",
        "status": "RUNNING",
    }
    waiting = await saga(js, "pay-1")
    assert [(t["ref"], t["status"], t["input"]) for t in waiting["tasks"]] == [
        ("approval_1", "IN_PROGRESS", {"money": 1000})
    ]
    after_first = body(await signal(nc, "pay-1", "approval_1", {"status": "ok", "approver": "kim"}))
    assert after_first["status"] == "RUNNING"
    assert after_first["tasks"][-1]["ref"] == "approval_2"
    assert after_first["tasks"][-1]["input"] == {"money": 1000, "approved_by": "kim"}
    final = body(await signal(nc, "pay-1", "approval_2", {"status": "ok", "approver": "lee"}))
    assert final["status"] == "COMPLETED"
    assert final["output"] == {"your_got_the_money": 1000}
    for _ in range(50):
        if await granted(js):
            break
        await asyncio.sleep(0.1)
    assert await granted(js) == [{"workflow_id": "pay-1", "money": 1000}]


@pytest.mark.parametrize("answers", [["ok", "ng"], ["ng"]])
async def test_an_ng_fails_the_workflow_without_the_money(nc, js, conductor, answers):
    await start(nc, "approval", {"money": 50}, "pay-2")
    state: dict[str, Any] = {}
    for i, answer in enumerate(answers, start=1):
        state = body(
            await signal(nc, "pay-2", f"approval_{i}", {"status": answer, "approver": "x"})
        )
    assert state["status"] == "FAILED"
    assert state["output"] == {"your_got_the_money": None}
    assert state["error"]["message"] == f"approval_{len(answers)} said ng"
    assert await granted(js) == []


async def test_signals_that_do_not_fit_are_refused_and_change_nothing(nc, js, conductor):
    await start(nc, "approval", {"money": 5}, "pay-3")
    revision = (await js.stream_info("KV_workflows")).state.last_seq
    assert_error(await signal(nc, "pay-3", "approval_2", {"status": "ok"}), 409)  # not reached
    assert_error(await signal(nc, "pay-3", "nope", {"status": "ok"}), 404)
    assert_error(await signal(nc, "missing", "approval_1", {"status": "ok"}), 404)
    assert_error(await signal(nc, "pay-3", "approval_1", b"{not json"), 400)
    assert (await js.stream_info("KV_workflows")).state.last_seq == revision
    await signal(nc, "pay-3", "approval_1", {"status": "ng", "approver": "x"})
    error = assert_error(await signal(nc, "pay-3", "approval_1", {"status": "ok"}), 409)
    assert "FAILED" in error["message"]  # finished


async def test_terminate_ends_a_waiting_workflow(nc, js, conductor):
    await start(nc, "approval", {"money": 5}, "pay-4")
    state = body(await call(nc, "conductor.terminate.pay-4", {"reason": "budget cut"}))
    assert state["status"] == "TERMINATED"
    assert state["error"]["message"] == "budget cut"
    assert [t["status"] for t in state["tasks"]] == ["CANCELED"]
    assert_error(await call(nc, "conductor.terminate.pay-4", {}), 409)
    assert_error(await call(nc, "conductor.terminate.pay-4", {"why": "typo"}), 400)


EVERYTHING = """
name: everything
input: {cities: list, date: str, pause: float}
tasks:
  - ref: pick
    type: SWITCH
    expression: ${workflow.input.date}
    cases:
      never: [{ref: nothing, type: TERMINATE, status: FAILED}]
    default: []
  - ref: both
    type: FORK
    branches:
      - - {ref: nap, type: DELAY, duration_s: "${workflow.input.pause}"}
      - - ref: kid
          type: SUB_WORKFLOW
          workflow: child
          input: {n: 21}
  - ref: all_cities
    type: FORK
    over: ${workflow.input.cities}
    each: {ref: report, type: SIMPLE, task: weather.report, input: {date: "${workflow.input.date}"}}
output:
  child: ${kid.output.doubled}
  reports: ${all_cities.output}
  napped: ${nap.output.fired_at}
"""

CHILD = """
name: child
input: {n: int}
tasks:
  - {ref: double, type: SET_VARIABLE, input: {d: "${workflow.input.n}"}}
output: {doubled: "${workflow.variables.d}", parent_saw: "${workflow.input.n}"}
"""


@pytest.fixture
async def everything(nc, settings, agents):
    definitions = [compile_definition(parse_definition(t)) for t in (EVERYTHING, CHILD)]
    conductor = Conductor(settings, Registry(definitions))
    await conductor.start(nc)
    yield conductor
    await conductor.stop()


async def test_switch_fork_dynamic_fork_sub_workflow_and_delay_together(nc, js, everything):
    data = {"cities": ["oslo", "rome"], "date": "2019-04-02", "pause": 1.0}
    assert (await start(nc, "everything", data, "all-1"))["status"] == "RUNNING"
    state = (await wait_finished(js, ["all-1"], timeout=20))["all-1"]
    assert state["status"] == "COMPLETED", state["error"]
    report = body(await call(nc, "weather.report", {"date": "2019-04-02"}))
    assert state["output"]["reports"] == [report, report]
    assert state["output"]["child"] == 21
    assert state["output"]["napped"] >= state["created_at"]
    child = await saga(js, "all-1-kid-1")
    assert child["parent"] == {"workflow_id": "all-1", "ref": "kid", "attempt": 1}
    kid = next(t for t in state["tasks"] if t["ref"] == "kid")
    assert kid["child"] == "all-1-kid-1"  # linked both ways
    nap = next(t for t in state["tasks"] if t["ref"] == "nap")
    assert nap["ended_at"] >= nap["input"]["fire_at"]


async def test_a_child_that_cannot_start_fails_its_task(nc, js, settings, agents):
    parent = compile_definition(
        parse_definition(
            "name: lonely\ntasks:\n  - {ref: kid, type: SUB_WORKFLOW, workflow: nobody}\n"
        )
    )
    conductor = Conductor(settings, Registry([parent]))
    await conductor.start(nc)
    try:
        await start(nc, "lonely", {}, "lonely-1")
        state = (await wait_finished(js, ["lonely-1"]))["lonely-1"]
    finally:
        await conductor.stop()
    assert state["status"] == "FAILED"
    assert "nobody" in state["error"]["message"]


def test_registry_fixture_still_has_plan_day():
    assert "approval" in registry().names()


async def test_pause_holds_dispatch_and_resume_goes_on(nc, js, conductor):
    await start(nc, "approval", {"money": 7}, "pay-p")
    paused = body(await call(nc, "conductor.pause.pay-p"))
    assert paused["status"] == "PAUSED"
    assert_error(await call(nc, "conductor.pause.pay-p"), 409)
    # A signal while paused is recorded, and nothing after it starts.
    held = body(await signal(nc, "pay-p", "approval_1", {"status": "ok", "approver": "kim"}))
    assert held["status"] == "PAUSED"
    assert [(t["ref"], t["status"]) for t in held["tasks"]] == [("approval_1", "COMPLETED")]
    resumed = body(await call(nc, "conductor.resume.pay-p"))
    assert resumed["status"] == "RUNNING"
    assert [(t["ref"], t["status"]) for t in resumed["tasks"]][-1] == ("approval_2", "IN_PROGRESS")
    assert_error(await call(nc, "conductor.resume.pay-p"), 409)


async def test_rerun_a_finished_plan_day_from_its_weather(nc, js, stack):
    await start(nc, "plan_day", {"user": "ann", "datetime": "2026-11-21T12:00:00"}, "day-r")
    first = (await wait_finished(js, ["day-r"]))["day-r"]
    assert first["status"] == "COMPLETED"
    rerun = body(await call(nc, "conductor.rerun.day-r", {"task": "weather"}))
    assert rerun["status"] == "RUNNING"
    again = (await wait_finished(js, ["day-r"]))["day-r"]
    assert again["status"] == "COMPLETED"
    assert again["output"] == first["output"]  # the same date: the same weather
    weather = next(t for t in again["tasks"] if t["ref"] == "weather")
    agenda = next(t for t in again["tasks"] if t["ref"] == "agenda")
    assert (weather["attempt"], len(weather["history"])) == (2, 1)
    assert (agenda["attempt"], agenda.get("history", [])) == (1, [])  # none: omitted
    assert_error(await call(nc, "conductor.rerun.day-r", {"task": "nope"}), 404)
    assert_error(await call(nc, "conductor.rerun.day-r", {"tsk": "weather"}), 400)
