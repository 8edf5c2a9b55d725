"""``kapellmeister demo``: plan a few days and two approvals, on an embedded NATS server.

Starts ``nats-server`` with JetStream in ``.kapellmeister/demo`` (unless ``NATS_URL`` names
a server), the conductor, weather and agenda services as separate processes, starts a
handful of ``plan_day`` workflows through the public API, prints each task as the saga
state in KV records it and the event each workflow publishes, then runs the ``approval``
workflow twice with signals (paid, refused), and shuts everything down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client

from kapellmeister.config import Settings
from kapellmeister.messages import TERMINAL, Saga
from kapellmeister.processes import ServiceProcess, wait_for_services
from kapellmeister.runtime import connect
from kapellmeister.server import EmbeddedServer

__all__ = ["DAYS", "run_demo"]

# (user, when): a free Saturday noon, a Monday at work, a Sunday morning with the kids,
# a free Sunday evening, a weeknight asleep, a free winter Saturday.
DAYS = [
    ("ann", "2026-11-21T12:00:00"),
    ("bob", "2026-11-23T10:00:00"),
    ("cid", "2026-11-22T09:30:00"),
    ("dee", "2026-11-22T20:00:00"),
    ("eve", "2026-11-24T23:00:00"),
    ("fay", "2027-01-09T14:00:00"),
]
_decode_saga = msgspec.json.Decoder(Saga).decode


def _show(value: object) -> str:
    return msgspec.json.encode(value).decode()


async def _drive(nats_url: str, settings: Settings, logs: Path, ui_port: int | None) -> int:
    settings = msgspec.structs.replace(settings, nats_url=nats_url)
    services = [
        ServiceProcess(name, nats_url, logs / f"{name}.log").start()
        for name in ("conductor", "weather", "agenda")
    ]
    for service in services:
        print(f"started {service.name:<9} pid {service.pid}, log {service.log_path}")
    nc = await connect(settings, "kapellmeister-demo")
    try:
        await wait_for_services(nc, ["conductor", "weather", "agenda"], processes=services)
        kv = await nc.jetstream().key_value("workflows")
        watcher = await kv.watchall()
        events = await nc.subscribe("events.activity.chosen")
        users: dict[str, str] = {}
        for user, when in DAYS:
            reply = await nc.request(
                "conductor.start.plan_day",
                _show({"user": user, "datetime": when}).encode(),
                timeout=10,
            )
            workflow_id = msgspec.json.decode(reply.data)["workflow_id"]
            users[workflow_id] = user
            print(f"{user:<4} started plan_day for {when}  (workflow {workflow_id})")
        seen: set[tuple[str, str, str]] = set()
        done: dict[str, Saga] = {}
        while len(done) < len(users):
            entry = await watcher.updates(timeout=30)
            if entry is None or entry.key not in users or not entry.value:
                continue
            saga = _decode_saga(entry.value)
            user = users[saga.workflow_id]
            for task in saga.tasks:
                if (saga.workflow_id, task.ref, task.status) in seen or task.status == "SCHEDULED":
                    continue
                seen.add((saga.workflow_id, task.ref, task.status))
                shown = task.output if task.type == "SIMPLE" else task.input
                print(f"{user:<4}   {task.ref:<13}{task.type:<13}{task.status:<10}{_show(shown)}")
            if saga.status in TERMINAL:
                done[saga.workflow_id] = saga
                print(f"{user:<4} {saga.status}: {_show(saga.output)}  trace {saga.trace_id}")
        await watcher.stop()
        print("\nevents.activity.chosen:")
        for _ in users:
            msg = await events.next_msg(timeout=10)
            print(f"  {msg.data.decode()}")
        await events.unsubscribe()
        failed = [s for s in done.values() if s.status != "COMPLETED"]
        print(f"\n{len(done) - len(failed)} of {len(done)} plan_day workflows completed")
        approved = await _approvals(nc)
        if ui_port is not None:
            await _serve_ui(nc, nats_url, logs, ui_port)
        return 1 if failed or not approved else 0
    finally:
        await nc.drain()
        for service in services:
            code = service.stop()
            print(f"stopped {service.name:<9} exit {code}")


async def _approvals(nc: Client) -> bool:
    """Two approvals of the Conductor seed: one paid (ok, ok), one refused (ok, ng)."""
    granted = await nc.subscribe("events.approval.granted")
    outcomes = []
    for answers in (("ok", "ok"), ("ok", "ng")):
        reply = await nc.request("conductor.start.approval", b'{"money": 1000}', timeout=10)
        workflow_id = msgspec.json.decode(reply.data)["workflow_id"]
        print(f"\napproval {workflow_id}: waiting for approval_1")
        state: dict[str, Any] = {}
        for step, (answer, approver) in enumerate(zip(answers, ("kim", "lee"), strict=True), 1):
            signal = _show({"status": answer, "approver": approver}).encode()
            subject = f"conductor.signal.{workflow_id}.approval_{step}"
            state = msgspec.json.decode((await nc.request(subject, signal, timeout=10)).data)
            print(f"  {approver} says {answer} on approval_{step}: workflow {state['status']}")
        print(f"  output {_show(state['output'])}")
        outcomes.append(state["status"])
    event = await granted.next_msg(timeout=10)
    # Unsubscribed now: a drain would wait for a later event (one approved in the web UI)
    # that nobody reads.
    await granted.unsubscribe()
    print(f"events.approval.granted: {event.data.decode()}")
    return outcomes == ["COMPLETED", "FAILED"]


async def _serve_ui(nc: Client, nats_url: str, logs: Path, port: int) -> None:
    """Leave the stack running with the web UI on ``port`` until Ctrl-C (or SIGTERM), and
    an approval waiting for its first signal, to give from the page."""
    ui = ServiceProcess(
        "ui",
        nats_url,
        logs / "ui.log",
        {k: v for k, v in os.environ.items() if k.startswith(("KAPELLMEISTER_", "NATS_"))},
        argv=[sys.executable, "-m", "kapellmeister.cli", "ui", "--port", str(port)],
    ).start()
    reply = await nc.request("conductor.start.approval", b'{"money": 250}', timeout=10)
    waiting = msgspec.json.decode(reply.data)["workflow_id"]
    if not await _listening(port, ui):
        print(f"the web UI did not start:\n{ui.log_tail()}")
        ui.stop()
        return
    print(f"\nweb UI on http://127.0.0.1:{port}/ (log {ui.log_path})")
    print(f"approval {waiting} waits for you: http://127.0.0.1:{port}/workflows/{waiting}")
    print("Ctrl-C stops the demo", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        print(f"stopped ui        exit {ui.stop()}")


async def _listening(port: int, process: ServiceProcess, timeout: float = 20.0) -> bool:
    """Whether ``process`` accepts connections on ``port`` within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.alive() and loop.time() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return True
    return False


def run_demo(settings: Settings, *, embedded: bool, ui_port: int | None = None) -> None:
    """Run the demo; exits non-zero if a workflow did not complete."""
    data = Path(settings.data_dir) / "demo"
    server = EmbeddedServer(data / "nats") if embedded else None
    url = settings.nats_url
    if server is not None:
        url = server.start()
        print(f"embedded nats-server on {url}, JetStream data in {data / 'nats'}")
    try:
        code = asyncio.run(_drive(url, settings, data / "logs", ui_port))
    finally:
        if server is not None:
            server.stop()
            print("stopped nats-server")
    sys.exit(code)
