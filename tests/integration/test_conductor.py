"""The conductor runtime against a real nats-server, with the agents in the same process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kapellmeister.conductor import Conductor
from kapellmeister.decider import decide
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.messages import Started, TaskCompleted, utc_text
from kapellmeister.registry import Registry
from kapellmeister.topology import EVENTS, TASKS
from services.conductor.__main__ import registry
from tests.support import (
    assert_error,
    body,
    call,
    dead_letters,
    expected_activity,
    saga,
    stream_messages,
    wait_finished,
)

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FREE_SATURDAY: dict[str, Any] = {"user": "ann", "datetime": "2026-11-21T12:00:00"}
WORKDAY: dict[str, Any] = {"user": "bob", "datetime": "2026-11-23T10:00:00"}


async def start(nc, payload, headers=None) -> str:
    reply = await call(nc, "conductor.start.plan_day", payload, headers)
    data = body(reply)
    assert data["status"] == "RUNNING", data
    return str(data["workflow_id"])


async def kv_revisions(js) -> int:
    return int((await js.stream_info("KV_workflows")).state.last_seq)


async def test_plan_day_on_a_free_saturday_asks_the_weather(nc, js, stack):
    workflow_id = await start(nc, FREE_SATURDAY)
    state = (await wait_finished(js, [workflow_id]))[workflow_id]
    chosen = await expected_activity(FREE_SATURDAY["datetime"])
    assert state["status"] == "COMPLETED"
    assert state["output"] == {"activity": chosen}
    refs = [t["ref"] for t in state["tasks"]]
    assert refs[:4] == ["agenda", "is_free", "weather", "is_wet"]
    assert refs[-2:] == [chosen, "notify"]
    events = await stream_messages(js, EVENTS, "events.activity.chosen")
    assert [msgspec.json.decode(e.data or b"") for e in events] == [
        {"user": "ann", "activity": chosen, "workflow_id": workflow_id}
    ]


async def test_plan_day_on_a_workday_does_not_ask_the_weather(nc, js, stack):
    workflow_id = await start(nc, WORKDAY)
    state = (await wait_finished(js, [workflow_id]))[workflow_id]
    assert state["output"] == {"activity": "work"}
    assert "weather" not in [t["ref"] for t in state["tasks"]]


async def test_saga_state_is_readable_json_with_the_contract_fields(nc, js, stack):
    workflow_id = await start(nc, FREE_SATURDAY, {"Tenant": "acme"})
    await wait_finished(js, [workflow_id])
    state = body(await call(nc, f"conductor.get.{workflow_id}"))
    assert state == await saga(js, workflow_id)  # `nats kv get workflows <id>` says the same
    for field in (
        "workflow_id",
        "workflow",
        "version",
        "status",
        "input",
        "output",
        "tenant",
        "created_at",
        "updated_at",
        "trace_id",
        "error",
        "tasks",
    ):
        assert field in state
    assert (state["workflow"], state["version"], state["tenant"]) == ("plan_day", 1, "acme")
    assert state["input"] == FREE_SATURDAY
    assert re.fullmatch(r"[0-9a-f]{32}", state["trace_id"])
    agenda = state["tasks"][0]
    assert agenda["name"] == "agenda.activity"
    assert agenda["attempt"] == 1
    assert agenda["input"] == {"datetime": FREE_SATURDAY["datetime"]}
    assert agenda["output"] == {"activity": "free"}
    for stamp in ("scheduled_at", "started_at", "ended_at"):
        assert RFC3339_MS.match(agenda[stamp]), agenda[stamp]
    assert state["created_at"] <= agenda["ended_at"] <= state["updated_at"]


async def test_traceparent_header_sets_the_workflow_trace(nc, js, stack):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    workflow_id = await start(nc, WORKDAY, headers)
    state = (await wait_finished(js, [workflow_id]))[workflow_id]
    assert state["trace_id"] == trace_id


@pytest.mark.parametrize(
    ("subject", "payload", "headers", "code", "fragment"),
    [
        ("conductor.start.plan_day", b"{oops", None, 400, "malformed JSON"),
        ("conductor.start.plan_day", b"[1, 2]", None, 400, "JSON object"),
        (
            "conductor.start.plan_day",
            {"user": 3, "datetime": "2026-11-21T12:00:00"},
            None,
            400,
            "$.user",
        ),
        ("conductor.start.plan_day", {"user": "ann"}, None, 400, "datetime"),
        (
            "conductor.start.plan_day",
            {**FREE_SATURDAY, "extra": 1},
            None,
            400,
            "unknown field `extra`",
        ),
        (
            "conductor.start.plan_day",
            {"user": "ann", "datetime": "2026-13-45T99:00:00"},
            None,
            400,
            "$.datetime",
        ),
        (
            "conductor.start.plan_day",
            {"user": "ann", "datetime": "tomorrow"},
            None,
            400,
            "$.datetime",
        ),
        ("conductor.start.plan_day", FREE_SATURDAY, {"Workflow-Id": "has.dot"}, 400, "Workflow-Id"),
        (
            "conductor.start.plan_day",
            FREE_SATURDAY,
            {"Workflow-Version": "x"},
            400,
            "Workflow-Version",
        ),
        ("conductor.start.plan_day", FREE_SATURDAY, {"Workflow-Version": "9"}, 404, "no version 9"),
        ("conductor.start.nope", FREE_SATURDAY, None, 404, "nope"),
        ("conductor.get.unknown-id", b"", None, 404, "unknown-id"),
        ("conductor.get.a$b", b"", None, 404, "a$b"),
        ("conductor.list", {"statu": "RUNNING"}, None, 400, "statu"),
        ("conductor.list", {"status": "DONE"}, None, 400, "$.status"),
        ("conductor.list", {"limit": 0}, None, 400, "$.limit"),
        ("conductor.list", {"workflow": "*"}, None, 400, "$.workflow"),
        ("conductor.list", {"workflow": ""}, None, 400, "$.workflow"),
    ],
)
async def test_bad_requests_get_an_error_and_change_nothing(
    nc, js, conductor, subject, payload, headers, code, fragment
):
    before = await kv_revisions(js)
    error = assert_error(await call(nc, subject, payload, headers), code)
    assert fragment in error["message"]
    assert await kv_revisions(js) == before
    assert (await js.stream_info(TASKS)).state.last_seq == 0
    reply = await call(nc, "conductor.start.plan_day", WORKDAY)  # and it keeps serving
    assert body(reply)["status"] == "RUNNING"


async def test_start_with_workflow_id_is_idempotent(nc, js, stack):
    headers = {"Workflow-Id": "day-ann-1"}
    first = body(await call(nc, "conductor.start.plan_day", FREE_SATURDAY, headers))
    assert first == {"workflow_id": "day-ann-1", "status": "RUNNING"}
    await wait_finished(js, ["day-ann-1"])
    dispatched = (await js.stream_info(TASKS)).state.last_seq
    again = body(await call(nc, "conductor.start.plan_day", WORKDAY, headers))
    assert again == {"workflow_id": "day-ann-1", "status": "COMPLETED"}
    assert (await js.stream_info(TASKS)).state.last_seq == dispatched
    assert (await saga(js, "day-ann-1"))["input"] == FREE_SATURDAY


async def test_list_is_newest_first_and_filters(nc, js, stack):
    ids = [await start(nc, WORKDAY) for _ in range(3)]
    await wait_finished(js, ids)
    listed = body(await call(nc, "conductor.list", {}))["workflows"]
    assert [w["workflow_id"] for w in listed] == ids[::-1]
    assert set(listed[0]) == {
        "workflow_id",
        "workflow",
        "version",
        "status",
        "tenant",
        "created_at",
        "updated_at",
    }
    assert body(await call(nc, "conductor.list", {"status": "RUNNING"}))["workflows"] == []
    limited = body(await call(nc, "conductor.list", {"workflow": "plan_day", "limit": 2}))[
        "workflows"
    ]
    assert [w["workflow_id"] for w in limited] == ids[:0:-1]
    assert body(await call(nc, "conductor.list", b""))["workflows"]  # no body at all is fine


async def test_list_filters_by_tenant_and_creation_time(nc, js, stack):
    ids = [await start(nc, WORKDAY, {"Tenant": tenant}) for tenant in ("acme", "globex", "acme")]
    await wait_finished(js, ids)
    created = [(await saga(js, workflow_id))["created_at"] for workflow_id in ids]

    async def listed(query: dict[str, Any]) -> list[str]:
        return [
            w["workflow_id"] for w in body(await call(nc, "conductor.list", query))["workflows"]
        ]

    assert await listed({"tenant": "acme"}) == [ids[2], ids[0]]
    assert await listed({"tenant": "nobody"}) == []
    assert await listed({"since": created[1]}) == [ids[2], ids[1]]
    assert await listed({"until": created[1]}) == [ids[0]]
    assert await listed({"tenant": "acme", "since": created[1]}) == [ids[2]]
    # No offset is UTC: the same instant as its Z form.
    assert await listed({"since": created[1].removesuffix("Z")}) == [ids[2], ids[1]]
    assert_error(await call(nc, "conductor.list", {"since": "yesterday"}), 400)


async def test_two_conductors_racing_on_one_fact_write_once(js, two_conductors):
    one, two = two_conductors
    started = Started(
        workflow_id="race",
        workflow="plan_day",
        version=1,
        input=FREE_SATURDAY,
        at="2026-11-21T12:00:00.000Z",
    )
    decisions = await asyncio.gather(one.apply(started), two.apply(started))
    assert decisions[0].state == decisions[1].state
    assert decisions[0].commands == decisions[1].commands
    before = await kv_revisions(js)
    fact = TaskCompleted(
        workflow_id="race",
        ref="agenda",
        attempt=1,
        output={"activity": "free"},
        at="2026-11-21T12:00:01.000Z",
    )
    results = await asyncio.gather(one.apply(fact), two.apply(fact))
    assert await kv_revisions(js) == before + 1  # applied once
    assert results[0].commands == results[1].commands  # the loser re-decided on the new state
    assert [c.msg_id for c in results[0].commands] == ["race:weather:1"]


async def test_a_stale_cache_costs_a_conflict_never_a_lost_fact(js, two_conductors):
    one, two = two_conductors
    # Their sweepers would reload the saga (refreshing the cache this test keeps stale).
    for conductor in two_conductors:
        assert conductor._sweeper is not None
        conductor._sweeper.cancel()
    await one.apply(
        Started(
            workflow_id="stale",
            workflow="plan_day",
            version=1,
            input=FREE_SATURDAY,
            at="2026-11-21T12:00:00.000Z",
        )
    )
    await two.store.load("stale")  # `two` caches the first revision: agenda SCHEDULED
    agenda = TaskCompleted(
        workflow_id="stale",
        ref="agenda",
        attempt=1,
        output={"activity": "free"},
        at="2026-11-21T12:00:01.000Z",
    )
    first = await one.apply(agenda)
    before = await kv_revisions(js)
    late = await two.apply(agenda)  # decided on the stale copy, CAS refused, re-decided
    assert two.conflicts == 1
    assert await kv_revisions(js) == before
    assert late.commands == first.commands
    # A fact the stale copy cannot place (weather was not scheduled there) is not dropped.
    await two.store.load("stale")
    await one.apply(
        TaskCompleted(
            workflow_id="stale",
            ref="weather",
            attempt=1,
            output={"rain": True, "snow": False, "temperature": 9},
            at="2026-11-21T12:00:02.000Z",
        )
    )
    state = await saga(js, "stale")
    assert state["status"] == "COMPLETED"
    assert state["output"] == {"activity": "code_for_fun"}


async def test_a_fact_unknown_to_a_stale_cache_is_reloaded_not_dropped(js, two_conductors):
    one, two = two_conductors
    await one.apply(
        Started(
            workflow_id="behind",
            workflow="plan_day",
            version=1,
            input=FREE_SATURDAY,
            at="2026-11-21T12:00:00.000Z",
        )
    )
    await two.store.load("behind")  # agenda SCHEDULED, no weather task yet
    await one.apply(
        TaskCompleted(
            workflow_id="behind",
            ref="agenda",
            attempt=1,
            output={"activity": "free"},
            at="2026-11-21T12:00:01.000Z",
        )
    )
    decision = await two.apply(
        TaskCompleted(
            workflow_id="behind",
            ref="weather",
            attempt=1,
            output={"rain": False, "snow": False, "temperature": 9},
            at="2026-11-21T12:00:02.000Z",
        )
    )
    assert decision.state is not None
    assert decision.state.status == "COMPLETED"
    assert (await saga(js, "behind"))["output"] == {"activity": "run"}


async def test_sweeper_redrives_a_start_that_crashed_before_publishing(nc, js, settings, stack):
    # The saga was written but its first task never published (a crash between steps 3 and 4).
    # It was written ten seconds ago: older than the sweeper's grace, inside the window.
    ago = utc_text(datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=10))
    fact = Started(workflow_id="orphan", workflow="plan_day", version=1, input=WORKDAY, at=ago)
    decision = decide(registry().get("plan_day"), None, fact)
    assert decision.state is not None
    await stack.store.save(decision.state, 0)  # the crashed process noted nothing in the index
    await stack.sweep()
    assert (await saga(js, "orphan"))["status"] == "RUNNING"  # unseen until reconciled
    # A conductor reconciles the index with the sagas as it starts (a crashed one restarts).
    await stack.index.reconcile()
    await stack.sweep()
    state = (await wait_finished(js, ["orphan"]))["orphan"]
    assert state["output"] == {"activity": "work"}


def test_shipped_definitions_load(tmp_path: Path):
    assert registry().names() == ["approval", "drinks", "plan_day"]
    (tmp_path / "extra.yaml").write_text(
        "name: extra\ntasks:\n  - {ref: t, type: SIMPLE, task: weather.report}\n"
    )
    assert registry(str(tmp_path)).names() == ["approval", "drinks", "extra", "plan_day"]


HELLO = """
name: hello
input: {who: str}
tasks:
  - {ref: say, type: EVENT, subject: events.hello.said, input: {who: "${workflow.input.who}"}}
output: {said_to: "${workflow.input.who}"}
"""


async def test_a_workflow_that_ends_at_start_still_publishes_its_event(nc, js, settings):
    conductor = Conductor(settings, Registry([compile_definition(parse_definition(HELLO))]))
    await conductor.start(nc)
    heard = await nc.subscribe("events.hello.said")  # sees every publish, even deduped ones
    try:
        headers = {"Workflow-Id": "hello-1"}
        first = body(await call(nc, "conductor.start.hello", {"who": "ann"}, headers))
        again = body(await call(nc, "conductor.start.hello", {"who": "ann"}, headers))
        messages = [await heard.next_msg(timeout=5)]
        with contextlib.suppress(TimeoutError):
            messages.append(await heard.next_msg(timeout=0.5))
    finally:
        await heard.unsubscribe()
        await conductor.stop()
    assert first == again == {"workflow_id": "hello-1", "status": "COMPLETED"}
    assert [msgspec.json.decode(m.data) for m in messages] == [{"who": "ann"}]
    assert (await saga(js, "hello-1"))["output"] == {"said_to": "ann"}


async def test_an_undecodable_result_is_a_dead_letter_and_the_conductor_goes_on(nc, js, stack):
    await js.publish("results.nope", b'{"workflow_id": 3}', headers={"Nats-Msg-Id": "bad-result"})
    [letter] = await dead_letters(js, "deadletter.conductor")
    assert letter["reason"].startswith("not a task result")
    assert letter["subject"] == "results.nope"
    workflow_id = await start(nc, WORKDAY)
    assert (await wait_finished(js, [workflow_id]))[workflow_id]["status"] == "COMPLETED"
    for _ in range(100):  # the last result is acked just after the saga is written
        if (await js.stream_info("RESULTS")).state.messages == 0:
            break
        await asyncio.sleep(0.05)
    assert (await js.stream_info("RESULTS")).state.messages == 0  # the bad one was terminated


async def test_a_result_is_taken_only_from_its_own_task_subject(nc, js, conductor):
    """An agent may publish results.<workflow_id>.<its task> only (its NATS permissions);
    the conductor checks the rest: the workflow in the subject, no timers, the task name."""
    workflow_id = await start(nc, FREE_SATURDAY)  # no agents: the first task waits
    [first] = (await saga(js, workflow_id))["tasks"]
    assert (first["name"], first["status"]) == ("agenda.activity", "SCHEDULED")
    result = {"workflow_id": workflow_id, "ref": first["ref"], "attempt": 1}
    done = {**result, "status": "COMPLETED", "output": {"activity": "free"}}
    before = await kv_revisions(js)
    # Another task's name: ignored. Another workflow's subject, or a timer: dead letters.
    await js.publish(f"results.{workflow_id}.weather.report", msgspec.json.encode(done))
    await js.publish("results.other-1.agenda.activity", msgspec.json.encode(done))
    timer = {**done, "timer": "workflow_timeout"}
    await js.publish(f"results.{workflow_id}.agenda.activity", msgspec.json.encode(timer))
    letters = await dead_letters(js, "deadletter.conductor", count=2)
    assert {letter["subject"] for letter in letters} == {
        "results.other-1.agenda.activity",
        f"results.{workflow_id}.agenda.activity",
    }
    assert all("may only end a task agenda.activity of" in letter["reason"] for letter in letters)
    for _ in range(100):
        if (await js.stream_info("RESULTS")).state.messages == 0:
            break
        await asyncio.sleep(0.05)
    assert await kv_revisions(js) == before  # nothing of the three changed the saga
    assert (await saga(js, workflow_id))["tasks"][0]["status"] == "SCHEDULED"
    # Its own task's subject: taken.
    await js.publish(f"results.{workflow_id}.agenda.activity", msgspec.json.encode(done))
    for _ in range(100):
        state = await saga(js, workflow_id)
        if state["tasks"][0]["status"] == "COMPLETED":
            break
        await asyncio.sleep(0.05)
    assert state["tasks"][0]["output"] == {"activity": "free"}
