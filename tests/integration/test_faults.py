"""A crash at each point of the conductor's five steps loses nothing and doubles nothing.

Each test makes the conductor fail once at one exact point (after the KV write, after the
publish) for one kind of fact, lets JetStream redeliver, and checks the workflow ends
once with one event and no task dispatched twice.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from kapellmeister.conductor import Conductor
from kapellmeister.topology import EVENTS, TASKS
from services.conductor.__main__ import registry
from tests.support import body, call, stream_messages, wait_finished

FREE = {"user": "ann", "datetime": "2026-11-21T12:00:00"}


class Crash(Exception):
    """Stands for the process dying at this point."""


class CrashingConductor(Conductor):
    """Fails once, at ``point``, while handling the result of task ``ref``."""

    def __init__(self, *args, point: str, ref: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.point, self.ref, self.crashed = point, ref, False

    async def publish(self, state, commands, trace=None):
        crash_now = not self.crashed and any(
            getattr(t, "ref", None) == self.ref and t.status == "COMPLETED" for t in state.tasks
        )
        if crash_now and self.point == "after-write":
            self.crashed = True
            raise Crash("after the KV write, before the publish")
        await super().publish(state, commands, trace)
        if crash_now and self.point == "after-publish":
            self.crashed = True
            raise Crash("after the publish, before the ack")


@pytest.mark.parametrize("point", ["after-write", "after-publish"])
@pytest.mark.parametrize("ref", ["agenda", "weather"])
async def test_a_crash_between_steps_is_healed_by_redelivery(nc, js, settings, agents, point, ref):
    conductor = CrashingConductor(settings, registry(), point=point, ref=ref)
    await conductor.start(nc)
    try:
        reply = body(await call(nc, "conductor.start.plan_day", FREE, {"Workflow-Id": "crashy"}))
        assert reply["workflow_id"] == "crashy"
        state = (await wait_finished(js, ["crashy"], timeout=30))["crashy"]
        # The KV may say COMPLETED before the redelivered fact republished the event.
        for _ in range(300):
            events = await stream_messages(js, EVENTS, "events.activity.chosen")
            if events:
                break
            await asyncio.sleep(0.1)
    finally:
        await conductor.stop()
    assert conductor.crashed
    assert state["status"] == "COMPLETED"
    assert [msgspec.json.decode(e.data or b"")["workflow_id"] for e in events] == ["crashy"]
    assert (await js.stream_info(TASKS)).state.last_seq == 2  # agenda and weather, once each
    assert all(t["attempt"] == 1 for t in state["tasks"])
