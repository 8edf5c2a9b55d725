"""A test agent for the fault suite: ``python -m tests.faults.counter_agent``.

Serves ``faults.step``. Each run of the handler records its side effect by
CAS-incrementing a counter in the KV bucket ``fault_effects`` under
``<workflow_id>.<ref>.<attempt>``, so a handler that ran twice for one attempt shows 2.
The handler does not see NATS or the attempt number, so it keeps its own connection and
reads the attempt from the saga (the conductor writes the saga before it dispatches).

``FAULTS_SLOW_MS`` makes each run sleep that long *before* its effect, so a crash during
the sleep leaves no effect behind (the redelivered run records the only one).

It also serves ``faults.undo`` (a compensation, counted the same way). With
``FAULTS_SERVE=risky`` it is instead the ``faults-risky`` agent serving ``faults.risky``:
counted like a step, except that a request with ``poison: true`` SIGKILLs the agent
before any effect, every time it is delivered (a poison message).
"""

from __future__ import annotations

import asyncio
import os
import signal

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kapellmeister import Settings, connect, run_agent, task

EFFECTS = "fault_effects"


class StepRequest(msgspec.Struct, frozen=True):
    workflow_id: str
    ref: str


class StepResult(msgspec.Struct, frozen=True):
    ok: bool


class RiskyRequest(msgspec.Struct, frozen=True):
    workflow_id: str
    ref: str
    poison: bool = False


class _Effects:
    """Lazily opened: the connection and buckets the handler records its effects with."""

    def __init__(self) -> None:
        self.lock: asyncio.Lock | None = None
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.effects: KeyValue | None = None
        self.workflows: KeyValue | None = None

    async def open(self) -> tuple[KeyValue, KeyValue]:
        if self.effects is None or self.workflows is None:
            if self.lock is None:
                self.lock = asyncio.Lock()
            async with self.lock:
                if self.effects is None or self.workflows is None:
                    self.nc = await connect(Settings.from_env(), "faults-effects")
                    self.js = self.nc.jetstream()
                    try:
                        effects = await self.js.key_value(EFFECTS)
                    except BucketNotFoundError:
                        effects = await self.js.create_key_value(bucket=EFFECTS)
                    self.workflows = await self.js.key_value("workflows")
                    self.effects = effects
        return self.effects, self.workflows


_state = _Effects()


async def _attempt(workflows: KeyValue, workflow_id: str, ref: str) -> int:
    entry = await workflows.get(workflow_id)
    saga = msgspec.json.decode(entry.value or b"{}")
    for record in saga.get("tasks", []):
        if record.get("ref") == ref:
            return int(record.get("attempt", 0))
    return 0


async def increment(kv: KeyValue, key: str) -> int:
    """Compare-and-set +1 on ``key``: create the first time, update at the read revision."""
    while True:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            try:
                await kv.create(key, b"1")
            except KeyWrongLastSequenceError:
                continue  # someone created it first: read it and update
            return 1
        count = int(entry.value or b"0") + 1
        try:
            await kv.update(key, str(count).encode(), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue
        return count


async def step(req: StepRequest) -> StepResult:
    """Record one side effect for this workflow, ref and attempt."""
    slow_ms = float(os.environ.get("FAULTS_SLOW_MS", "0") or 0)
    if slow_ms:
        await asyncio.sleep(slow_ms / 1000)
    effects, workflows = await _state.open()
    attempt = await _attempt(workflows, req.workflow_id, req.ref)
    await increment(effects, f"{req.workflow_id}.{req.ref}.{attempt}")
    return StepResult(ok=True)


async def undo(req: StepRequest) -> StepResult:
    """A compensation: one counted effect per run, like a step."""
    return await step(req)


async def risky(req: RiskyRequest) -> StepResult:
    """A step, unless the request is poison: then the agent dies on it, every delivery."""
    if req.poison:
        os.kill(os.getpid(), signal.SIGKILL)
    return await step(StepRequest(workflow_id=req.workflow_id, ref=req.ref))


def main() -> None:
    if os.environ.get("FAULTS_SERVE") == "risky":
        run_agent(
            "faults-risky",
            [task("faults.risky", risky)],
            description="Fault-suite agent that dies on a poison request",
        )
        return
    run_agent(
        "faults",
        [task("faults.step", step), task("faults.undo", undo)],
        description="Fault-suite agent: counts its side effects",
    )


if __name__ == "__main__":
    main()
