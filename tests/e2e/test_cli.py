"""End to end: the ``kapellmeister`` command as a subprocess against services run as processes.

Each command is checked for what it sends (the reply proves the conductor understood it)
and what it prints: readable text by default, the reply itself with ``--json``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import msgspec
import nats.errors
import pytest
import yaml

from kapellmeister.processes import wait_for_services
from tests.support import Stack, call, stored_keys

pytestmark = pytest.mark.e2e

DEFINITIONS = Path(__file__).parents[2] / "services" / "conductor" / "definitions"

Run = Callable[..., subprocess.CompletedProcess[str]]


def cli(nats_url: str | None) -> Run:
    """``kapellmeister <args>`` in a clean environment pointed at ``nats_url``."""
    env = {"PATH": os.environ.get("PATH", "")}
    if nats_url is not None:
        env["NATS_URL"] = nats_url

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kapellmeister.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    return run


async def _services(nats_url, tmp_path, nc, names):
    stack = Stack(nats_url, tmp_path / "logs")
    for name in names:
        stack.start(name)
    try:
        await wait_for_services(nc, list(names), processes=stack.processes)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture
async def conductor(nats_url, tmp_path, nc):
    stack = await _services(nats_url, tmp_path, nc, ["conductor"])
    yield stack
    stack.stop()


@pytest.fixture
async def agents(nats_url, tmp_path, nc):
    stack = await _services(nats_url, tmp_path, nc, ["weather", "agenda"])
    yield stack
    stack.stop()


def _json(text: str):
    return msgspec.json.decode(text)


async def test_signal_and_terminate_the_approval_workflow(nats_url, conductor):
    run = cli(nats_url)
    started = run("start", "approval", '{"money": 100}', "--id", "pay-1", "--json")
    assert started.returncode == 0, started.stderr
    assert _json(started.stdout) == {"workflow_id": "pay-1", "status": "RUNNING"}

    signalled = run("signal", "pay-1", "approval_1", '{"status":"ok","approver":"kim"}', "--json")
    assert signalled.returncode == 0, signalled.stderr
    state = _json(signalled.stdout)
    approval_1 = next(t for t in state["tasks"] if t["ref"] == "approval_1")
    assert approval_1["status"] == "COMPLETED"
    assert approval_1["output"] == {"status": "ok", "approver": "kim"}

    got = run("get", "pay-1")
    assert got.returncode == 0, got.stderr
    assert re.search(r"^workflow\s+pay-1$", got.stdout, re.M)
    assert re.search(r"^name\s+approval v1$", got.stdout, re.M)
    assert re.search(r"^status\s+RUNNING$", got.stdout, re.M)
    assert re.search(r"^output\s+-$", got.stdout, re.M)
    assert re.search(r'^\s+approval_1\s+WAIT\s+COMPLETED\s+1\s+{"status":"ok"', got.stdout, re.M)
    assert re.search(r"^\s+approval_2\s+WAIT\s+IN_PROGRESS\s+1", got.stdout, re.M), got.stdout

    listed = run("list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["workflow_id", "workflow", "status"]
    assert row.split()[:4] == ["pay-1", "approval", "v1", "RUNNING"]
    assert run("list", "--tenant", "nobody").stdout == "no workflows\n"
    since = run(
        "list", "--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01T00:00:00", "--json"
    )
    assert [w["workflow_id"] for w in _json(since.stdout)["workflows"]] == ["pay-1"]

    terminated = run("terminate", "pay-1", "--reason", "changed my mind", "--json")
    assert terminated.returncode == 0, terminated.stderr
    assert _json(terminated.stdout)["status"] == "TERMINATED"
    again = run("terminate", "pay-1")
    assert again.returncode == 1
    assert again.stdout == ""
    assert _json(again.stderr)["error"]["code"] == 409


async def test_start_with_a_priority_and_a_bad_one(nats_url, conductor):
    run = cli(nats_url)
    started = run("start", "approval", '{"money": 5}', "--id", "urgent-1", "--priority", "80")
    assert started.returncode == 0, started.stderr
    assert _json(run("get", "urgent-1", "--json").stdout)["priority"] == 80
    refused = run("start", "approval", '{"money": 5}', "--id", "urgent-2", "--priority", "100")
    assert refused.returncode == 1
    assert _json(refused.stderr)["error"] == {
        "code": 400,
        "type": "bad_request",
        "message": "header Priority must be 0-99, got 100",
    }
    assert run("get", "urgent-2").returncode == 1


async def test_an_unknown_subject_says_nothing_answers(nats_url):
    got = cli(nats_url)("get", "pay-1")
    assert got.returncode == 1
    assert got.stderr.strip() == "no service answers conductor.get.pay-1: is it running?"


def test_check_a_good_and_a_bad_definition(tmp_path):
    pytest.importorskip("kapellmeister.checker")
    run = cli(None)  # offline: no server at all
    good = run("check", str(DEFINITIONS / "plan_day.yaml"))
    assert (good.returncode, good.stdout) == (0, "ok: plan_day v1\n"), good.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nversion: 1\ntasks:\n"
        "  - ref: tell\n    type: EVENT\n    subject: events.x\n"
        "    input:\n      v: ${nope.output.x}\n"
    )
    checked = run("check", str(bad))
    assert checked.returncode == 1
    assert checked.stdout.startswith("tasks[0].input"), checked.stdout
    assert "nope" in checked.stdout
    as_json = run("check", str(bad), "--json")
    assert as_json.returncode == 1
    assert [p["path"] for p in _json(as_json.stdout)["problems"]] == ["tasks[0].input"]

    bad.write_text("name: bad\nversion: 1\ntasks:\n  - ref: a\n    type: SIMPLE\n")
    missing_task = run("check", str(bad))
    assert missing_task.returncode == 1
    assert missing_task.stdout.startswith("tasks[0]: ")


async def test_check_online_uses_the_registered_tasks(nats_url, agents, tmp_path):
    pytest.importorskip("kapellmeister.checker")
    run = cli(nats_url)
    good = run("check", str(DEFINITIONS / "plan_day.yaml"), "--online")
    assert (good.returncode, good.stdout) == (0, "ok: plan_day v1\n"), good.stderr
    # A task no agent registered: fine offline, a problem online.
    unknown = tmp_path / "forecast.json"
    unknown.write_text(
        '{"name": "forecast", "version": 1, "tasks": [{"ref": "f", "type": "SIMPLE",'
        ' "task": "weather.forecast", "input": {"date": "2019-04-02"}}]}'
    )
    assert run("check", str(unknown)).returncode == 0
    online = run("check", str(unknown), "--online")
    assert online.returncode == 1
    assert online.stdout.startswith("tasks[0]"), online.stdout
    assert "weather.forecast" in online.stdout


async def _skip_without_definitions_api(nc) -> None:
    """The definitions endpoints are being built: skip until the conductor answers them."""
    try:
        reply = await nc.request("conductor.definitions.list", b"{}", timeout=5)
    except nats.errors.NoRespondersError:
        pytest.skip("the conductor does not serve conductor.definitions.* yet")
    if (reply.headers or {}).get("Nats-Service-Error-Code") == "404":
        pytest.skip("the conductor answers conductor.definitions.list with 404")


async def test_register_get_and_list_definitions(nats_url, nc, conductor, tmp_path):
    pytest.importorskip("kapellmeister.checker")
    await _skip_without_definitions_api(nc)
    run = cli(nats_url)
    # approval v2, written as JSON: the command reads YAML, and JSON is YAML.
    definition = yaml.safe_load((DEFINITIONS / "approval.yaml").read_text())
    definition["version"] = 2
    path = tmp_path / "approval-2.json"
    path.write_bytes(msgspec.json.encode(definition))

    registered = run("definitions", "register", str(path))
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout == "registered approval v2\n"
    definition["name"] = "approval_copy"
    copy = tmp_path / "approval-copy.yaml"
    copy.write_text(yaml.safe_dump(definition))
    as_json = run("definitions", "register", str(copy), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert _json(as_json.stdout) == {"name": "approval_copy", "version": 2}

    latest = run("definitions", "get", "approval", "--json")
    assert latest.returncode == 0, latest.stderr
    assert _json(latest.stdout)["version"] == 2
    first = run("definitions", "get", "approval", "--version", "1")
    assert first.returncode == 0, first.stderr
    assert _json(first.stdout)["version"] == 1  # the readable form is pretty JSON
    missing = run("definitions", "get", "nope")
    assert missing.returncode == 1
    assert _json(missing.stderr)["error"]["code"] == 404

    listed = run("definitions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    names = {d["name"] for d in _json(listed.stdout)["definitions"]}
    assert {"approval", "approval_copy", "plan_day"} <= names
    table = run("definitions", "list").stdout.splitlines()
    assert table[0].split() == ["name", "latest", "versions", "description"]
    assert any(line.split()[:3] == ["approval", "v2", "1,2"] for line in table[1:]), table


async def test_dead_letters_are_listed_and_replayed(nats_url, js, agents):
    run = cli(nats_url)
    await js.publish("tasks.agenda.activity", b"not a task", headers={"Nats-Msg-Id": "junk-1"})
    letters: list[Any] = []
    for _ in range(100):
        listed = run("dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        letters = _json(listed.stdout)
        if letters:
            break
        await asyncio.sleep(0.1)
    [letter] = letters
    assert (letter["service"], letter["subject"]) == ("agenda", "tasks.agenda.activity")
    assert letter["reason"].startswith("not a task request")
    table = run("dlq", "list")
    assert "tasks.agenda.activity" in table.stdout
    replayed = run("dlq", "replay", str(letter["seq"]))
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith(
        f"replayed dead letter {letter['seq']} to tasks.agenda.activity"
    )
    for _ in range(100):  # still not a task: it comes back as a second dead letter
        letters = _json(run("dlq", "list", "--json").stdout)
        if len(letters) == 2:
            break
        await asyncio.sleep(0.1)
    assert [d["headers"]["Nats-Msg-Id"] for d in letters] == [
        "junk-1",
        f"junk-1:replay:{letter['seq']}",
    ]
    missing = run("dlq", "replay", "999")
    assert missing.returncode == 1


async def test_events_tail_prints_the_events_as_stored(nats_url, js, conductor):
    run = cli(nats_url)
    for n in range(3):
        await js.publish(f"events.tail.t{n}", f'{{"n": {n}}}'.encode())
    shown = await asyncio.to_thread(run, "events", "tail", "events.tail.>", "--all", "--count", "2")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ['events.tail.t0 {"n": 0}', 'events.tail.t1 {"n": 1}']


def test_graph_draws_a_file_offline(tmp_path):
    run = cli(None)
    drawn = run("graph", str(DEFINITIONS / "plan_day.yaml"))
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.startswith("flowchart TD\n")
    assert "  is_free -->|free| weather\n" in drawn.stdout
    dot = run("graph", str(DEFINITIONS / "approval.yaml"), "--format", "dot")
    assert dot.returncode == 0, dot.stderr
    assert dot.stdout.startswith('digraph "approval" {')
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: b\ntasks: [{ref: a, type: SIMPLE, task: x.y, requires: [z]}]\n")
    refused = run("graph", str(broken))
    assert refused.returncode == 1
    assert "requires/produces belong to a GRAPH's tasks" in refused.stderr


async def test_graph_draws_a_registered_definition_and_a_workflow(nats_url, nc, conductor):
    run = cli(nats_url)
    await call(nc, "conductor.start.approval", {"money": 5}, {"Workflow-Id": "drawn-1"})
    await call(nc, "conductor.signal.drawn-1.approval_1", {"status": "ok", "approver": "a"})
    registered = await asyncio.to_thread(run, "graph", "approval")
    assert registered.returncode == 0, registered.stderr
    assert "class " not in registered.stdout  # no statuses without a workflow
    drawn = await asyncio.to_thread(run, "graph", "--workflow", "drawn-1")
    assert drawn.returncode == 0, drawn.stderr
    assert "  class approval_1,first_says COMPLETED\n" in drawn.stdout
    assert "  class approval_2 IN_PROGRESS\n" in drawn.stdout


def test_graph_writes_an_svg_of_its_own(tmp_path):
    svg = tmp_path / "plan_day.svg"
    drawn = cli(None)("graph", str(DEFINITIONS / "plan_day.yaml"), "--svg", str(svg))
    assert drawn.returncode == 0, drawn.stderr
    root = ElementTree.fromstring(svg.read_text())
    refs = {g.get("data-ref") for g in root.iter("{http://www.w3.org/2000/svg}g")}
    assert {"agenda", "weather", "run", "code_for_fun", "notify"} <= refs


async def test_schedules_create_list_get_pause_resume_delete(nats_url, conductor, js):
    run = cli(nats_url)
    made = run("schedules", "create", "tick", "approval", "--every", "1", "--input", '{"money": 2}')
    assert made.returncode == 0, made.stderr
    assert re.search(r"^schedule\s+tick$", made.stdout, re.M)
    assert re.search(r"^when\s+every 1 s$", made.stdout, re.M)
    for _ in range(150):  # its first ticks start approvals tick-<tick>
        if len([k for k in await _workflow_keys(js) if k.startswith("tick-")]) >= 2:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"no two ticks started: {await _workflow_keys(js)}")
    listed = run("schedules", "list")
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["name", "workflow", "when"]
    assert row.split()[:2] == ["tick", "approval"]
    assert _json(run("schedules", "pause", "tick", "--json").stdout)["paused"] is True
    got = run("schedules", "get", "tick")
    assert re.search(r"^paused\s+yes$", got.stdout, re.M)
    assert re.search(r"^last started\s+tick-\d+$", got.stdout, re.M)
    assert _json(run("schedules", "resume", "tick", "--json").stdout)["paused"] is False
    assert run("schedules", "delete", "tick").returncode == 0
    gone = run("schedules", "get", "tick")
    assert gone.returncode == 1 and _json(gone.stderr)["error"]["code"] == 404
    refused = run("schedules", "create", "bad", "approval", "--cron", "61 * * * *")
    assert refused.returncode == 1 and _json(refused.stderr)["error"]["code"] == 400
    unread = run("schedules", "create", "bad", "approval", "--every", "5", "--input", "{bad")
    assert unread.returncode == 1 and unread.stderr.startswith("--input is not JSON")


async def _workflow_keys(js) -> list[str]:
    return await stored_keys(js, "workflows")
