"""Fixtures of the fault suite: services as processes on our own server, and the table.

Each test appends a row (scenario, workflows, faults injected, lost, duplicated, stuck)
to `ROWS`; `pytest_terminal_summary` prints them at the end of the session.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from kapellmeister.processes import ServiceProcess, wait_for_services
from tests.faults.history import DEFINITION, Verdict
from tests.support import call

ROOT = Path(__file__).resolve().parents[2]

# Short ack wait and sweeps so redeliveries and re-drives happen within a test.
ENV = {
    "KAPELLMEISTER_ACK_WAIT_S": "2",
    "KAPELLMEISTER_SWEEP_INTERVAL_S": "1",
    "KAPELLMEISTER_SWEEP_GRACE_S": "1",
    "KAPELLMEISTER_LOG_LEVEL": "WARNING",
}

ROWS: list[dict[str, Any]] = []


class Stack:
    """The services of one test as child processes, each ended by its PID."""

    def __init__(self, nats_url: str, logs: Path) -> None:
        self.nats_url = nats_url
        self.logs = logs
        self.processes: list[ServiceProcess] = []

    def start(self, name: str, module: str = "", **env: str) -> ServiceProcess:
        """Start service ``name`` (``services.<name>``, or ``module`` run as it)."""
        index = sum(p.name == name for p in self.processes)
        if name.startswith("faults"):
            module = "tests.faults.counter_agent"
        argv = [sys.executable, "-m", module or f"services.{name}"]
        process = ServiceProcess(
            name, self.nats_url, self.logs / f"{name}-{index}.log", {**ENV, **env}, ROOT, argv
        ).start()
        self.processes.append(process)
        return process

    async def up(self, nc: Client, *names: str) -> None:
        live = [p for p in self.processes if p.alive()]  # killed ones stay listed
        await wait_for_services(nc, list(names), processes=live)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
async def stack(nats_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    services = Stack(nats_url, tmp_path / "logs")
    try:
        yield services
    finally:
        services.stop()


async def register_faults(nc: Client, definition: dict[str, Any] = DEFINITION) -> None:
    """Register a fault-suite definition (after its agents are up: it checks the tasks)."""
    reply = await call(nc, "conductor.definitions.register", definition)
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.data
    assert msgspec.json.decode(reply.data) == {"name": definition["name"], "version": 1}


@pytest.fixture
def record() -> Iterator[Any]:
    """``record(scenario, workflows, faults, verdict)``: add this test's row to the table."""

    def add(scenario: str, workflows: int, faults: str, verdict: Verdict) -> None:
        ROWS.append(
            {
                "scenario": scenario,
                "workflows": workflows,
                "faults": faults,
                "lost": len(verdict.lost),
                "duplicated": len(verdict.duplicated),
                "stuck": len(verdict.stuck),
                "handler re-runs": len(verdict.reruns),
            }
        )

    yield add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    columns = ["scenario", "workflows", "faults", "lost", "duplicated", "stuck", "handler re-runs"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in ROWS)) for c in columns}
    terminalreporter.section("fault injection: nothing lost, nothing twice")
    line = " | ".join(c.ljust(widths[c]) for c in columns)
    terminalreporter.write_line(line)
    terminalreporter.write_line("-+-".join("-" * widths[c] for c in columns))
    for row in ROWS:
        terminalreporter.write_line(" | ".join(str(row[c]).ljust(widths[c]) for c in columns))
