"""Past the dedupe window, only what is verifiably missing is republished (real server)."""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec
import pytest

from kapellmeister.clock import ServerClock, server_now
from kapellmeister.conductor import Conductor
from kapellmeister.messages import (
    Command,
    NotifyParent,
    ParentLink,
    PublishEvent,
    RunTask,
    Saga,
    ScheduleTimer,
    StartWorkflow,
    TaskResult,
    utc_shift,
    utc_text,
)
from kapellmeister.recovery import MARGIN_S, Recovery, is_old
from kapellmeister.topology import ensure_streams
from services.conductor.__main__ import registry
from tests.support import body, call, stream_messages

WF = "rc-1"


def run_task(msg_id: str) -> RunTask:
    return RunTask(
        msg_id=msg_id, workflow_id=WF, workflow="w", ref="a", task="t.a", attempt=1, input={}
    )


def saga(updated_at: str) -> Saga:
    return Saga(
        workflow_id=WF,
        workflow="w",
        version=1,
        status="RUNNING",
        input={},
        output=None,
        tenant="",
        created_at=updated_at,
        updated_at=updated_at,
        trace_id="",
        error=None,
        tasks=(),
    )


async def test_server_now_is_the_servers_clock(nc, js):
    await ensure_streams(js)
    ack = await js.publish("events.clock", b"{}")
    stored = await js.get_msg("EVENTS", seq=ack.seq)
    now = await server_now(nc)
    assert stored.time is not None
    assert stored.time.isoformat()[:19] <= now[:19]
    assert not is_old(saga(now), now)
    assert is_old(saga(utc_shift(now, -MARGIN_S - 1)), now)
    assert not is_old(saga(utc_shift(now, -MARGIN_S + 5)), now)


async def test_what_is_stored_is_not_missing(nc, js):
    await ensure_streams(js)
    await js.publish("tasks.t.a", b"{}", headers={"Nats-Msg-Id": f"{WF}:a:1"})
    await js.publish("events.x.done", b"{}", headers={"Nats-Msg-Id": f"{WF}:e:1"})
    await js.publish(
        f"timers.{WF}.a.1.retry",
        b"{}",
        headers={
            "Nats-Msg-Id": f"{WF}:a:1:retry",
            "Nats-Schedule": "@at 2099-01-01T00:00:00Z",
            "Nats-Schedule-Target": f"results.{WF}",
        },
    )
    stored_task, lost_task = run_task(f"{WF}:a:1"), run_task(f"{WF}:a:2")
    stored_event = PublishEvent(msg_id=f"{WF}:e:1", subject="events.x.done", data={})
    lost_event = PublishEvent(msg_id=f"{WF}:e:2", subject="events.x.done", data={})
    timer = ScheduleTimer(
        msg_id=f"{WF}:a:1:retry",
        workflow_id=WF,
        ref="a",
        attempt=1,
        fire_at="2099-01-01T00:00:00Z",
        purpose="retry",
    )
    lost_timer = msgspec.structs.replace(timer, purpose="timeout", msg_id=f"{WF}:a:1:timeout")
    child = StartWorkflow(
        msg_id=f"{WF}:c:1",
        workflow_id=f"{WF}-c-1",
        workflow="w",
        version=None,
        input={},
        tenant="",
        parent=None,
    )
    notify = NotifyParent(
        msg_id=f"{WF}:ended",
        parent=ParentLink(workflow_id="parent-1", ref="c", attempt=1),
        child=WF,
        status="COMPLETED",
        output=None,
    )
    commands: list[Command] = [
        stored_task,
        lost_task,
        stored_event,
        lost_event,
        timer,
        lost_timer,
        child,
        notify,
    ]
    missing = await Recovery(js).missing(saga("2026-01-01T00:00:00Z"), commands)
    assert missing == [lost_task, lost_event, lost_timer, child, notify]


async def test_nothing_is_missing_while_a_result_waits(nc, js):
    await ensure_streams(js)
    await js.publish(f"results.{WF}", b"{}", headers={"Nats-Msg-Id": f"{WF}:a:1:result"})
    missing = await Recovery(js).missing(saga("2026-01-01T00:00:00Z"), [run_task(f"{WF}:a:1")])
    assert missing == []


# --- the conductor past the window ---------------------------------------------------------

FREE = {"user": "ann", "datetime": "2026-11-21T12:00:00"}


@pytest.fixture
async def conductor(nc, settings):
    """A conductor that sweeps only when the test says: what one sweep does is the point
    (a sweep of its own between two steps would set the workflow's backoff)."""
    conductor = Conductor(msgspec.structs.replace(settings, sweep_interval_s=3600.0), registry())
    await conductor.start(nc)
    await asyncio.wait_for(conductor.swept.wait(), 10)  # its own first sweep is behind it
    yield conductor
    await conductor.stop()


async def age(js, workflow_id: str, seconds: float = 3600) -> None:
    """Move the saga's last write ``seconds`` into the past, as if it sat that long."""
    kv = await js.key_value("workflows")
    entry = await kv.get(workflow_id)
    state = msgspec.json.decode(entry.value or b"", type=Saga)
    old = msgspec.structs.replace(state, updated_at=utc_shift(state.updated_at, -seconds))
    await kv.update(workflow_id, msgspec.json.encode(old), last=entry.revision)


async def short_dedupe_window(js) -> None:
    """Shrink TASKS' dedupe window to 0.5 s, so a test can wait it out as a user waits out
    ten minutes: after it, a republished message is stored again."""
    config = (await js.stream_info("TASKS")).config
    await js.update_stream(dataclasses.replace(config, duplicate_window=0.5))


async def task_ids(js, subject: str) -> list[str]:
    return sorted(
        (m.headers or {}).get("Nats-Msg-Id", "")
        for m in await stream_messages(js, "TASKS", subject)
    )


async def test_the_sweeper_redrives_an_old_workflow_only_if_its_dispatch_is_lost(nc, js, conductor):
    for workflow_id in ("old-kept", "old-lost"):
        await call(nc, "conductor.start.plan_day", FREE, {"Workflow-Id": workflow_id})
    assert await task_ids(js, "tasks.agenda.activity") == ["old-kept:agenda:1", "old-lost:agenda:1"]
    # Shrunk only now: a publish retried under load within the usual window is deduped.
    await short_dedupe_window(js)
    for workflow_id in ("old-kept", "old-lost"):
        await age(js, workflow_id)
    [lost] = [
        m
        for m in await stream_messages(js, "TASKS", "tasks.agenda.activity")
        if (m.headers or {}).get("Nats-Msg-Id") == "old-lost:agenda:1"
    ]
    await js.delete_msg("TASKS", lost.seq)  # a dispatch a server crash lost, an hour ago
    await asyncio.sleep(1.0)  # past the (shrunk) dedupe window
    await conductor.sweep()
    # The stored dispatch was not copied; the lost one came back, under its own id.
    assert await task_ids(js, "tasks.agenda.activity") == ["old-kept:agenda:1", "old-lost:agenda:1"]


async def test_a_fact_replayed_past_the_window_republishes_only_what_is_lost(nc, js, conductor):
    await call(nc, "conductor.start.plan_day", FREE, {"Workflow-Id": "late"})
    result = TaskResult(
        workflow_id="late", ref="agenda", attempt=1, status="COMPLETED", output={"activity": "free"}
    )
    await js.publish("results.late", msgspec.json.encode(result), headers={"Nats-Msg-Id": "r1"})
    for _ in range(100):
        if await task_ids(js, "tasks.weather.report"):
            break
        await asyncio.sleep(0.05)
    assert await task_ids(js, "tasks.weather.report") == ["late:weather:1"]
    await drained(js)  # r1 applied and acked: nothing of it can be published again
    # Shrunk only now: a publish retried under load within the usual window is deduped.
    await short_dedupe_window(js)
    await age(js, "late")
    # Aged behind the conductor's back: its cache still holds the saga as written.
    conductor.store.forget("late")
    await asyncio.sleep(1.0)  # past the (shrunk) dedupe window
    # The same result again, an hour on (a redelivery after a long outage): the weather
    # dispatch it decided is still stored, so nothing is copied.
    await js.publish("results.late", msgspec.json.encode(result), headers={"Nats-Msg-Id": "r2"})
    await drained(js)
    assert await task_ids(js, "tasks.weather.report") == ["late:weather:1"]
    # Once that dispatch is lost, the next replay brings it back.
    [weather] = await stream_messages(js, "TASKS", "tasks.weather.report")
    await js.delete_msg("TASKS", weather.seq)
    await asyncio.sleep(1.0)
    await js.publish("results.late", msgspec.json.encode(result), headers={"Nats-Msg-Id": "r3"})
    await drained(js)
    assert await task_ids(js, "tasks.weather.report") == ["late:weather:1"]
    state = body(await call(nc, "conductor.get.late"))
    assert [t["ref"] for t in state["tasks"]] == ["agenda", "is_free", "weather"]


async def drained(js) -> None:
    """Until the conductor has taken every result (RESULTS is a work queue)."""
    for _ in range(200):
        if not (await js.stream_info("RESULTS", subjects_filter="results.>")).state.messages:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and acted on the last one


async def test_the_server_clock_reads_the_servers_time_between_syncs(nc, js):
    await ensure_streams(js)
    clock = ServerClock(nc)
    await clock.sync()
    await asyncio.sleep(0.3)  # time passes on the monotonic clock, not read from the host
    before = clock.now()
    ack = await js.publish("events.clock", b"{}")
    after = clock.now()
    stored = await js.get_msg("EVENTS", seq=ack.seq)
    assert stored.time is not None
    stamp = utc_text(stored.time)
    # The message's server stamp falls between the two readings (50 ms for the estimate).
    assert utc_shift(before, -0.05) <= stamp <= utc_shift(after, 0.05)
