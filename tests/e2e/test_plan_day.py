"""End to end: the three services as processes (``python -m services.<name>``) on one server."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
from typing import IO

import msgspec
import pytest

from kapellmeister.processes import wait_for_services
from kapellmeister.topology import EVENTS, RESULTS, TASKS
from tests.support import (
    Stack,
    body,
    call,
    days,
    expected_activity,
    free_days,
    stream_messages,
    wait_finished,
)

pytestmark = pytest.mark.e2e

# Short ack wait so a killed conductor's unacked results come back within the test.
ENV = {"KAPELLMEISTER_ACK_WAIT_S": "3", "KAPELLMEISTER_SWEEP_INTERVAL_S": "1"}


@pytest.fixture
async def stack(nats_url, tmp_path, nc):
    stack = Stack(nats_url, tmp_path / "logs", ENV)
    for name in ("conductor", "weather", "agenda"):
        stack.start(name)
    try:
        # The agenda process serves its actors as a second micro service, which comes up
        # after its agent: a discovery right after "agenda" answers may not see it yet.
        names = ["conductor", "weather", "agenda", "agenda-actors"]
        await wait_for_services(nc, names, processes=stack.processes)
        yield stack
    finally:
        stack.stop()


async def start_all(nc, inputs):
    replies = await asyncio.gather(
        *(
            call(nc, "conductor.start.plan_day", {"user": user, "datetime": when})
            for user, when in inputs
        )
    )
    return [body(r)["workflow_id"] for r in replies]


async def events_per_workflow(js, ids, timeout: float = 30.0) -> collections.Counter[str]:
    """Count events.activity.chosen per workflow once every workflow has one (or time is up)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        stored = await stream_messages(js, EVENTS, "events.activity.chosen")
        counts = collections.Counter(
            msgspec.json.decode(m.data or b"")["workflow_id"] for m in stored
        )
        if all(counts[i] for i in ids) or loop.time() > deadline:
            return counts
        await asyncio.sleep(0.2)


async def check_each_completed_once(js, ids, inputs):
    """Each workflow COMPLETED with the right activity; one event each; no task dispatched twice."""
    states = await wait_finished(js, ids, timeout=90)
    expected = [await expected_activity(when) for _, when in inputs]
    assert [states[i]["output"] for i in ids] == [{"activity": a} for a in expected]
    assert all(states[i]["status"] == "COMPLETED" for i in ids)
    # A workflow can be COMPLETED in KV before its event is out: a conductor killed between
    # the write and the publish leaves the result unacked, and the redelivery publishes it.
    per_workflow = await events_per_workflow(js, ids)
    assert {i: per_workflow[i] for i in ids} == dict.fromkeys(ids, 1)
    # Each (workflow, ref, attempt) is published once: the stream's sequence counts what was stored.
    dispatches = len(ids) + sum(a in {"run", "code_for_fun"} for a in expected)
    assert (await js.stream_info(TASKS)).state.last_seq == dispatches
    assert (await js.stream_info(RESULTS)).state.last_seq == dispatches
    assert all(t["attempt"] == 1 for i in ids for t in states[i]["tasks"])


async def test_plan_day_for_many_users(nc, js, stack):
    inputs = days(24)
    ids = await start_all(nc, inputs)
    await check_each_completed_once(js, ids, inputs)


async def test_services_answer_micro_discovery_and_direct_requests(nc, stack):
    names = set()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.PING", b"", reply=inbox)
    for _ in range(4):  # the agenda process serves its actors as a second micro service
        names.add(body(await sub.next_msg(timeout=5))["name"])
    await sub.unsubscribe()
    assert names == {"conductor", "weather", "agenda", "agenda-actors"}
    assert set(body(await call(nc, "weather.report", {"date": "2019-04-02"}))) == {
        "rain",
        "temperature",
        "snow",
    }
    assert body(await call(nc, "agenda.activity", {"datetime": "2026-11-23T10:00:00"})) == {
        "activity": "work"
    }


async def test_command_line_drives_the_public_api(nats_url, js, stack):
    env = {"PATH": os.environ.get("PATH", ""), "NATS_URL": nats_url}
    cli = [sys.executable, "-m", "kapellmeister.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=30)

    started = run(
        "start",
        "plan_day",
        '{"user":"ann","datetime":"2026-11-23T10:00:00"}',
        "--id",
        "cli-1",
        "--json",
    )
    assert started.returncode == 0, started.stderr
    assert msgspec.json.decode(started.stdout) == {"workflow_id": "cli-1", "status": "RUNNING"}
    await wait_finished(js, ["cli-1"])
    got = run("get", "cli-1", "--json")
    assert msgspec.json.decode(got.stdout)["output"] == {"activity": "work"}
    listed = run("list", "--json")
    assert [w["workflow_id"] for w in msgspec.json.decode(listed.stdout)["workflows"]] == ["cli-1"]
    missing = run("get", "nope")
    assert missing.returncode == 1
    assert msgspec.json.decode(missing.stderr)["error"]["code"] == 404


@pytest.mark.fault
async def test_sigkill_the_conductor_with_50_in_flight(nc, js, stack):
    inputs = free_days(50)  # every one needs two agent round trips
    conductor = next(p for p in stack.processes if p.name == "conductor")
    # Start the 50 with the agenda held back, freeze the conductor, let the agenda answer
    # all 50, then thaw the conductor and kill it while it decides that batch of results.
    next(p for p in stack.processes if p.name == "agenda").stop()
    ids = await start_all(nc, inputs)
    conductor.pause()
    stack.start("agenda")
    await _wait_for(lambda: _stored(js, RESULTS), len(ids))
    watcher = await (await js.key_value("workflows")).watchall()
    while await watcher.updates(timeout=10) is not None:  # the current values, then a marker
        pass
    conductor.resume()
    await watcher.updates(timeout=30)  # it has written its first decision: kill it now
    conductor.kill()
    await watcher.stop()
    in_flight = [i for i in ids if (await _status(js, i)) != "COMPLETED"]
    stack.start("conductor")
    await check_each_completed_once(js, ids, inputs)
    assert len(in_flight) >= 10, (
        f"only {len(in_flight)} in flight when killed: too late to test much"
    )


@pytest.mark.fault
async def test_two_conductors_at_once(nc, js, stack):
    stack.start("conductor")
    await asyncio.sleep(1.0)
    inputs = days(60)
    ids = await start_all(nc, inputs)
    await check_each_completed_once(js, ids, inputs)
    # Both replicas took part: each answered some of the start requests.
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.STATS.conductor", b"", reply=inbox)
    replicas = [body(await sub.next_msg(timeout=5)) for _ in range(2)]
    await sub.unsubscribe()
    starts = [
        next(e["num_requests"] for e in r["endpoints"] if e["name"] == "start") for r in replicas
    ]
    assert sum(starts) == len(ids)
    assert min(starts) > 0, starts


async def _stored(js, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def _wait_for(count, target: int, timeout: float = 30.0) -> None:
    """Poll ``count()`` until it reaches ``target`` (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await count() < target:
        assert loop.time() < deadline, f"{await count()} of {target} after {timeout}s"
        await asyncio.sleep(0.05)


async def _status(js, workflow_id: str) -> str:
    kv = await js.key_value("workflows")
    return str(msgspec.json.decode((await kv.get(workflow_id)).value or b"")["status"])


def _serve(service: str, nats_url: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ.get("PATH", ""), "NATS_URL": nats_url}
    command = [sys.executable, "-m", "kapellmeister.cli", "serve", service]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


async def test_kapellmeister_serve_runs_a_service(nats_url, nc, tmp_path):
    log = (tmp_path / "serve.log").open("wb")
    process = _serve("agenda", nats_url, log)
    try:
        await wait_for_services(nc, ["agenda"])
        reply = await call(nc, "agenda.activity", {"datetime": "2026-11-22T12:00:00"})
        assert body(reply) == {"activity": "free"}
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0  # SIGTERM drains and exits cleanly
        log.close()
