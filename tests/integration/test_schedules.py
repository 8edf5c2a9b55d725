"""Schedules against a real nats-server: ticks, replicas, restarts, the API's answers."""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any

import msgspec
import pytest

from kapellmeister.conductor import Conductor
from kapellmeister.messages import Started
from services.conductor.__main__ import registry
from tests.support import assert_error, body, call, stored_keys, wait_finished

PLAN = {"user": "ann", "datetime": "2026-11-21T12:00:00"}
MONEY = {"money": 1}


async def create(nc, **spec: Any) -> dict[str, Any]:
    reply = await call(nc, "conductor.schedules.create", spec)
    return dict(body(reply))


def ticks(keys: list[str], name: str) -> list[int]:
    return sorted(int(key.removeprefix(f"{name}-")) for key in keys)


async def started(js, name: str, count: int, timeout: float = 15.0) -> list[int]:
    """The ticks started for ``name`` once there are ``count`` of them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = ticks(await stored_keys(js, "workflows", f"{name}-"), name)
        if len(found) >= count:
            return found
        assert loop.time() < deadline, f"{name}: only {found}"
        await asyncio.sleep(0.2)


async def test_a_schedule_starts_one_workflow_per_tick_with_the_tick_as_its_id(nc, js, stack):
    schedule = await create(nc, name="daily", workflow="plan_day", every_s=1, input=PLAN)
    assert schedule["next_tick"] > 0 and schedule["paused"] is False
    found = await started(js, "daily", 3)
    assert found == list(range(found[0], found[0] + len(found)))  # every tick, once each
    assert found[0] >= schedule["next_tick"]
    states = await wait_finished(js, [f"daily-{tick}" for tick in found])
    assert {state["status"] for state in states.values()} == {"COMPLETED"}
    assert {state["input"]["user"] for state in states.values()} == {"ann"}
    got = body(await call(nc, "conductor.schedules.get.daily", b""))
    assert got["last_tick"] >= found[-1] and got["next_tick"] > got["last_tick"]
    assert got["last_started"].startswith("daily-")


def count_creations(monkeypatch, conductors) -> collections.Counter[str]:
    """How often each workflow was created (a Started fact that wrote its saga)."""
    created: collections.Counter[str] = collections.Counter()
    for conductor in conductors:

        async def apply(fact, original=conductor._apply):
            decision, wrote = await original(fact)
            if isinstance(fact, Started) and wrote:
                created[fact.workflow_id] += 1
            return decision, wrote

        monkeypatch.setattr(conductor, "_apply", apply)
    return created


async def test_two_replicas_start_each_tick_exactly_once(nc, js, two_conductors, monkeypatch):
    created = count_creations(monkeypatch, two_conductors)
    await create(nc, name="pair", workflow="approval", every_s=1, input=MONEY)
    await started(js, "pair", 5)
    await call(nc, "conductor.schedules.pause.pair", b"")
    found = ticks(await stored_keys(js, "workflows", "pair-"), "pair")
    assert found == list(range(found[0], found[0] + len(found)))
    assert created == collections.Counter({f"pair-{tick}": 1 for tick in found})

    # Both replicas fire one due tick at the same moment: both start it, one creates it,
    # one records it. (Their own passes are stopped, so only these two race.)
    for conductor in two_conductors:
        await conductor.scheduler.stop()
    kv = await js.key_value("schedules")
    now = two_conductors[0].scheduler.now()
    due_now = {**body(await call(nc, "conductor.schedules.get.pair", b"")), "paused": False}
    due_now.update(every_s=3600, catch_up="once", next_tick=now // 3600 * 3600)
    attempts = []
    for conductor in two_conductors:

        async def start(schedule, workflow_id, original=conductor.scheduler.start):
            attempts.append(workflow_id)
            return await original(schedule, workflow_id)

        monkeypatch.setattr(conductor.scheduler, "start", start)
    await kv.put("pair", msgspec.json.encode(due_now))
    fired = await asyncio.gather(*(c.scheduler._fire("pair") for c in two_conductors))
    tick_id = f"pair-{now // 3600 * 3600}"
    assert attempts.count(tick_id) >= 2 and created[tick_id] == 1, (attempts, created)
    assert sorted(fired) == [0, 1]  # the loser's record failed: it counts nothing
    stored = body(await call(nc, "conductor.schedules.get.pair", b""))
    assert stored["last_started"] == tick_id and stored["next_tick"] > now


async def test_a_crash_between_the_start_and_its_record_starts_nothing_twice(
    nc, js, conductor, monkeypatch
):
    created = count_creations(monkeypatch, [conductor])
    kv = conductor.scheduler.kv
    failed: list[str] = []

    async def lost_once(key, value, last=None):
        if not failed:  # the first record after a start is lost, as in a crash
            failed.append(key)
            raise TimeoutError("the record was lost")
        return await type(kv).update(kv, key, value, last=last)

    monkeypatch.setattr(kv, "update", lost_once)
    await create(nc, name="lossy", workflow="approval", every_s=1, input=MONEY)
    found = await started(js, "lossy", 3)
    assert failed == ["lossy"]
    assert set(created.values()) == {1}  # the tick whose record was lost ran once
    assert found == list(range(found[0], found[0] + len(found)))


async def test_one_failing_schedule_holds_back_no_other(nc, js, conductor, monkeypatch, caplog):
    original = conductor.scheduler.start

    async def start(schedule, workflow_id):
        if schedule.name == "bad":
            raise RuntimeError("its definition's agent is on fire")
        return await original(schedule, workflow_id)

    monkeypatch.setattr(conductor.scheduler, "start", start)
    await create(nc, name="bad", workflow="approval", every_s=1, input=MONEY)
    await create(nc, name="good", workflow="approval", every_s=1, input=MONEY)
    await started(js, "good", 4)
    assert await stored_keys(js, "workflows", "bad-") == []
    failures = [r for r in caplog.records if "schedule bad: a pass failed" in r.getMessage()]
    assert 1 <= len(failures) <= 6  # backing off: 0.5 s, 1 s, 2 s, ... not 4 a second


@pytest.mark.parametrize("catch_up", ["all", "skip"])
async def test_missed_ticks_after_a_restart_by_catch_up(nc, js, settings, catch_up):
    name = f"restart-{catch_up}"
    first = Conductor(settings, registry())
    await first.start(nc)
    await create(nc, name=name, workflow="approval", every_s=1, catch_up=catch_up, input=MONEY)
    before = await started(js, name, 2)
    await first.stop()
    await asyncio.sleep(3.5)  # three ticks or so with no conductor
    second = Conductor(settings, registry())
    await second.start(nc)
    try:
        after = await started(js, name, len(before) + 2)
    finally:
        await second.stop()
    gaps = [b - a for a, b in itertools.pairwise(after)]
    if catch_up == "all":
        assert set(gaps) == {1}, after  # every missed tick ran, after the restart
    else:
        assert max(gaps) >= 3, after  # the missed ones are skipped; the latest runs


async def test_pause_resume_delete_list_and_what_is_refused(nc, js, conductor):
    spec = {"name": "nightly", "workflow": "approval", "cron": "0 3 * * *", "input": MONEY}
    created = await create(nc, **spec)
    assert await create(nc, **spec) == created  # the same spec again: the same schedule
    assert_error(await call(nc, "conductor.schedules.create", {**spec, "cron": "0 4 * * *"}), 409)
    bad = {"name": "x", "workflow": "approval", "input": MONEY}
    for wrong, code in (
        ({**bad, "cron": "0 25 * * *"}, 400),
        ({**bad, "cron": "* * * * *", "every_s": 60}, 400),
        ({**bad}, 400),
        ({**bad, "every_s": 0}, 400),
        ({**bad, "every_s": 60, "timezone": "Nowhere/Else"}, 400),
        ({**bad, "every_s": 60, "input": {"money": "lots"}}, 400),
        ({**bad, "every_s": 60, "workflow": "no_such"}, 404),
        ({**bad, "every_s": 60, "name": "a.b"}, 400),
        ({**bad, "every_s": 60, "surprise": True}, 400),
    ):
        assert_error(await call(nc, "conductor.schedules.create", wrong), code)
    assert [
        s["name"] for s in body(await call(nc, "conductor.schedules.list", b""))["schedules"]
    ] == ["nightly"]

    paused = body(await call(nc, "conductor.schedules.pause.nightly", b""))
    assert paused["paused"] is True
    resumed = body(await call(nc, "conductor.schedules.resume.nightly", b""))
    assert resumed["paused"] is False and resumed["next_tick"] == created["next_tick"]
    deleted = body(await call(nc, "conductor.schedules.delete.nightly", b""))
    assert deleted["name"] == "nightly"
    for subject in ("get", "pause", "resume", "delete"):
        assert_error(await call(nc, f"conductor.schedules.{subject}.nightly", b""), 404)
    assert body(await call(nc, "conductor.schedules.list", b""))["schedules"] == []


async def test_a_paused_schedule_starts_nothing_and_resumes_without_the_paused_ticks(
    nc, js, conductor
):
    await create(nc, name="often", workflow="approval", every_s=1, input=MONEY)
    await started(js, "often", 1)
    await call(nc, "conductor.schedules.pause.often", b"")
    await asyncio.sleep(0.5)  # a pass that was firing has recorded its tick
    paused_at = ticks(await stored_keys(js, "workflows", "often-"), "often")
    await asyncio.sleep(2.5)
    assert ticks(await stored_keys(js, "workflows", "often-"), "often") == paused_at
    resumed = body(await call(nc, "conductor.schedules.resume.often", b""))
    after = await started(js, "often", len(paused_at) + 1)
    new = [tick for tick in after if tick not in paused_at]
    assert min(new) >= resumed["next_tick"] > paused_at[-1] + 2  # nothing from the pause


async def test_a_tick_that_cannot_start_is_recorded_with_the_reason(nc, js, conductor):
    await create(nc, name="pay", workflow="approval", every_s=1, input={"money": 5})
    await started(js, "pay", 1)
    # approval v2 wants a currency the schedule does not give: its ticks are refused.
    v2 = {
        "name": "approval",
        "version": 2,
        "input": {"money": "int", "currency": "str"},
        "tasks": [{"ref": "approval_1", "type": "WAIT"}],
    }
    body(await call(nc, "conductor.definitions.register", v2))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (got := body(await call(nc, "conductor.schedules.get.pay", b""))).get("last_error"):
        assert loop.time() < deadline, got
        await asyncio.sleep(0.2)
    assert "currency" in got["last_error"]
    refused_tick = int(got["last_error"].split()[1])
    assert f"pay-{refused_tick}" not in await stored_keys(js, "workflows", "pay-")


async def test_a_definitions_schedule_is_stored_at_registration_and_follows_new_versions(
    nc, js, conductor
):
    v1 = {
        "name": "heartbeat",
        "input": {"beat": "int"},
        "tasks": [{"ref": "wait", "type": "WAIT"}],
        "schedules": [{"every_s": 1, "input": {"beat": 1}}],
    }
    assert body(await call(nc, "conductor.definitions.register", v1))["version"] == 1
    await started(js, "heartbeat", 2)
    first = body(await call(nc, "conductor.schedules.get.heartbeat", b""))
    assert (first["workflow"], first["every_s"], first["input"]) == ("heartbeat", 1, {"beat": 1})

    v2 = {**v1, "version": 2, "schedules": [{"every_s": 3600, "input": {"beat": 2}}]}
    body(await call(nc, "conductor.definitions.register", v2))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (got := body(await call(nc, "conductor.schedules.get.heartbeat", b"")))[
        "every_s"
    ] != 3600:
        assert loop.time() < deadline, got
        await asyncio.sleep(0.1)
    assert got["input"] == {"beat": 2} and got["created_at"] == first["created_at"]
    assert got["next_tick"] % 3600 == 0 and got["brought_by"] == 2
    # It comes with the definition: paused, not deleted (it would come back).
    refused = assert_error(await call(nc, "conductor.schedules.delete.heartbeat", b""), 409)
    assert "pause it" in refused["message"]

    # A schedule that cannot work refuses the definition: nothing is registered.
    broken = {**v1, "name": "broken", "schedules": [{"cron": "every day", "input": {"beat": 1}}]}
    error = assert_error(await call(nc, "conductor.definitions.register", broken), 400)
    assert "schedules[0]" in error["message"]
    assert_error(await call(nc, "conductor.definitions.get.broken", b""), 404)
    assert_error(await call(nc, "conductor.schedules.get.broken", b""), 404)
