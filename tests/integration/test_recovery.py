"""Past the dedupe window, only what is verifiably missing is republished (real server)."""

from __future__ import annotations

import msgspec

from kapellmeister.messages import (
    NotifyParent,
    ParentLink,
    PublishEvent,
    RunTask,
    Saga,
    ScheduleTimer,
    StartWorkflow,
    utc_shift,
)
from kapellmeister.recovery import MARGIN_S, Recovery, is_old, server_now
from kapellmeister.topology import ensure_streams

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
        created_at=updated_at,
        updated_at=updated_at,
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
    commands = [stored_task, lost_task, stored_event, lost_event, timer, lost_timer, child, notify]
    missing = await Recovery(js).missing(saga("2026-01-01T00:00:00Z"), commands)
    assert missing == [lost_task, lost_event, lost_timer, child, notify]


async def test_nothing_is_missing_while_a_result_waits(nc, js):
    await ensure_streams(js)
    await js.publish(f"results.{WF}", b"{}", headers={"Nats-Msg-Id": f"{WF}:a:1:result"})
    missing = await Recovery(js).missing(saga("2026-01-01T00:00:00Z"), [run_task(f"{WF}:a:1")])
    assert missing == []
