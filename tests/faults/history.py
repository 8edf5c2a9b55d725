"""A Jepsen-style history for the fault suite: what was accepted, what came out.

`History` logs each start the conductor replied to, then reads every saga (KV
``workflows``), every ``fault_effects`` counter and every ``events.faults.done`` event in
EVENTS, and computes:

* lost: accepted, but no saga, a terminal saga that is not COMPLETED, or a COMPLETED
  one without its event or without a step's effect;
* duplicated: a counter > 1 for a (workflow, ref, attempt), more than one event for a
  workflow, or a step run under more than one attempt (unless the scenario's fault is
  one that retries, and every earlier attempt failed for that reason);
* stuck: a saga not terminal at the deadline.

A scenario may expect some workflows to FAIL (a poison task): those must end FAILED with
the expected error, their compensation must have run exactly once, and the steps after
the failure must not have run; a compensation in any other workflow is a duplicate.

Lost and stuck are disjoint; the bar for all three is zero.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from kapellmeister.messages import TERMINAL
from kapellmeister.topology import EVENTS
from tests.support import stream_messages

STEPS = ("one", "two", "three")
DONE = "events.faults.done"

DEFINITION: dict[str, Any] = {
    "name": "faults",
    "version": 1,
    "description": "Three counted steps and an event (fault suite)",
    "tasks": [
        *(
            {
                "ref": ref,
                "type": "SIMPLE",
                "task": "faults.step",
                "input": {"workflow_id": "${workflow.id}", "ref": ref},
            }
            for ref in STEPS
        ),
        {
            "ref": "done",
            "type": "EVENT",
            "subject": DONE,
            "input": {"workflow_id": "${workflow.id}"},
        },
    ],
    "output": {"ok": "${three.output.ok}"},
}


def _variant(name: str, description: str, **step: Any) -> dict[str, Any]:
    """`DEFINITION` under another name, with ``step``'s fields added to every step."""
    tasks = [{**t, **step} if t["ref"] in STEPS else t for t in DEFINITION["tasks"]]
    return {**DEFINITION, "name": name, "description": description, "tasks": tasks}


# Each step under a 1.5 s heartbeat bound, retried at once when an agent goes silent.
HEARTBEAT = _variant(
    "faults_rt",
    "Three counted steps under a heartbeat (fault suite)",
    response_timeout_s=1.5,
    retry={"count": 3, "logic": "FIXED", "delay_s": 0},
)

# Step two is served by an agent that dies on a poison request; step one has a
# compensation, which runs when step two is given up on.
UNDO = "undo_one"
SAGA: dict[str, Any] = {
    "name": "faults_saga",
    "version": 1,
    "description": "A compensated step, a risky step that may be poison (fault suite)",
    "input": {"poison": "bool"},
    "tasks": [
        {
            **DEFINITION["tasks"][0],
            "compensate": {
                "ref": UNDO,
                "type": "SIMPLE",
                "task": "faults.undo",
                "input": {"workflow_id": "${workflow.id}", "ref": UNDO},
            },
        },
        {
            "ref": "two",
            "type": "SIMPLE",
            "task": "faults.risky",
            "input": {
                "workflow_id": "${workflow.id}",
                "ref": "two",
                "poison": "${workflow.input.poison}",
            },
        },
        *DEFINITION["tasks"][2:],
    ],
    "output": DEFINITION["output"],
}


@dataclasses.dataclass
class Verdict:
    lost: list[str] = dataclasses.field(default_factory=list)
    duplicated: list[str] = dataclasses.field(default_factory=list)
    stuck: list[str] = dataclasses.field(default_factory=list)
    # Effects recorded twice for one attempt where the fault makes JetStream redeliver a
    # task the agent had run (at-least-once handlers): reported, not counted as duplicated.
    reruns: list[str] = dataclasses.field(default_factory=list)

    def zeros(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck)

    def __str__(self) -> str:
        return (
            f"lost {len(self.lost)} {self.lost[:5]}, duplicated {len(self.duplicated)} "
            f"{self.duplicated[:5]}, stuck {len(self.stuck)} {self.stuck[:5]}"
        )


async def _bucket(js: JetStreamContext, bucket: str) -> dict[str, bytes]:
    """The latest value of every key in ``bucket``, read from its stream message by message
    (a KV watcher's end-of-values marker can come early; direct gets cannot)."""
    values: dict[str, bytes] = {}
    prefix = f"$KV.{bucket}."
    for msg in await stream_messages(js, f"KV_{bucket}", f"{prefix}>"):
        key = (msg.subject or "")[len(prefix) :]
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            values.pop(key, None)
        else:
            values[key] = msg.data
    return values


class History:
    """Accepted starts for one scenario, and the check of what came of them."""

    def __init__(self, nc: Client, prefix: str, workflow: str = "faults") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.workflow = workflow
        self.accepted: list[str] = []
        self.unanswered: list[str] = []  # no reply: indeterminate, not counted as accepted
        # Workflows expected to end FAILED, with the error type they must fail with.
        self.failing: dict[str, str] = {}
        # Error types of earlier attempts that the scenario's fault legitimately causes.
        self.retry_causes: frozenset[str] = frozenset()

    async def start(
        self, count: int, concurrency: int = 64, timeout: float = 10.0, data: bytes = b"{}"
    ) -> None:
        """Start ``count`` workflows ``<prefix>-<n>``; log those whose start got a reply."""
        gate = asyncio.Semaphore(concurrency)

        async def one(workflow_id: str) -> None:
            async with gate:
                try:
                    reply = await self.nc.request(
                        f"conductor.start.{self.workflow}",
                        data,
                        timeout=timeout,
                        headers={"Workflow-Id": workflow_id},
                    )
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    self.unanswered.append(workflow_id)
                    return
                headers = reply.headers or {}
                assert "Nats-Service-Error-Code" not in headers, (headers, reply.data)
                self.accepted.append(workflow_id)

        base = len(self.accepted) + len(self.unanswered)
        await asyncio.gather(*(one(f"{self.prefix}-{base + i:05d}") for i in range(count)))

    @property
    def completing(self) -> list[str]:
        """The accepted workflows expected to complete (and publish their event)."""
        return [w for w in self.accepted if w not in self.failing]

    async def wait(self, timeout: float = 60.0) -> None:
        """Until every accepted workflow is terminal and has its event, or ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        kv = await self.js.key_value("workflows")
        pending = set(self.accepted)
        while pending and loop.time() < deadline:
            for workflow_id in list(pending):
                with contextlib.suppress(KeyNotFoundError):
                    entry = await kv.get(workflow_id)
                    if msgspec.json.decode(entry.value or b"{}")["status"] in TERMINAL:
                        pending.discard(workflow_id)
            if pending:
                await asyncio.sleep(0.25)
        # A saga can be COMPLETED before its event is out (a conductor killed between the
        # write and the publish): the redelivered result publishes it.
        while loop.time() < deadline:
            info = await self.js.stream_info(EVENTS, subjects_filter=DONE)
            if (info.state.messages or 0) >= len(self.completing):
                break
            await asyncio.sleep(0.25)

    @staticmethod
    async def running(js: JetStreamContext, ids: list[str]) -> int:
        """How many of ``ids`` are not terminal now (to show a fault hit work in flight)."""
        kv = await js.key_value("workflows")
        count = 0
        for workflow_id in ids:
            with contextlib.suppress(KeyNotFoundError):
                entry = await kv.get(workflow_id)
                count += msgspec.json.decode(entry.value or b"{}")["status"] not in TERMINAL
        return count

    async def check(self, reruns_expected: bool = False) -> Verdict:
        """The verdict; ``reruns_expected`` files counters > 1 under `Verdict.reruns`."""
        verdict = Verdict()
        sagas = {
            key: msgspec.json.decode(value)
            for key, value in (await _bucket(self.js, "workflows")).items()
            if key.startswith(f"{self.prefix}-")
        }
        effects = await _bucket(self.js, "fault_effects")
        events = collections.Counter(
            msgspec.json.decode(m.data or b"{}").get("workflow_id")
            for m in await stream_messages(self.js, EVENTS, DONE)
        )
        self._lost_and_stuck(verdict, sagas, effects, events)
        self._duplicates(verdict, sagas, effects, events, reruns_expected)
        return verdict

    def _lost_and_stuck(
        self,
        verdict: Verdict,
        sagas: dict[str, Any],
        effects: dict[str, bytes],
        events: collections.Counter[Any],
    ) -> None:
        for workflow_id in self.accepted:
            state = sagas.get(workflow_id)
            if state is None:
                verdict.lost.append(f"{workflow_id}: no saga")
            elif state["status"] not in TERMINAL:
                tasks = ",".join(
                    f"{t.get('ref')}={t.get('status')}" for t in state.get("tasks", [])
                )
                verdict.stuck.append(f"{workflow_id}: {state['status']} [{tasks}]")
            elif workflow_id in self.failing:
                self._failed_as_expected(verdict, workflow_id, state, effects)
            elif state["status"] != "COMPLETED":
                verdict.lost.append(f"{workflow_id}: {state['status']} {state.get('error')}")
            elif events[workflow_id] == 0:
                verdict.lost.append(f"{workflow_id}: COMPLETED without its event")
            else:
                for record in state.get("tasks", []):
                    key = f"{workflow_id}.{record.get('ref')}.{record.get('attempt')}"
                    if record.get("ref") in STEPS and key not in effects:
                        verdict.lost.append(f"{key}: COMPLETED without its effect")

    def _failed_as_expected(
        self, verdict: Verdict, workflow_id: str, state: Any, effects: dict[str, bytes]
    ) -> None:
        """A workflow the fault must fail: failed so, compensated once, went no further."""
        errors = {(t.get("error") or {}).get("type") for t in state.get("tasks", [])}
        if state["status"] != "FAILED" or self.failing[workflow_id] not in errors:
            verdict.lost.append(f"{workflow_id}: {state['status']} {errors}, not FAILED")
        undone = sum(int(v) for k, v in effects.items() if k.startswith(f"{workflow_id}.{UNDO}."))
        if undone == 0:
            verdict.lost.append(f"{workflow_id}: FAILED without its compensation")
        elif undone > 1:
            verdict.duplicated.append(f"{workflow_id}: compensated x{undone}")
        if any(k.startswith(f"{workflow_id}.three.") for k in effects):
            verdict.duplicated.append(f"{workflow_id}: ran a step after the failure")

    def _duplicates(
        self,
        verdict: Verdict,
        sagas: dict[str, Any],
        effects: dict[str, bytes],
        events: collections.Counter[Any],
        reruns_expected: bool,
    ) -> None:
        # Duplicates are looked for in every saga of the run, accepted or not.
        for key, value in effects.items():
            if key.startswith(f"{self.prefix}-") and int(value) > 1:
                found = verdict.reruns if reruns_expected else verdict.duplicated
                found.append(f"effect {key} x{int(value)}")
        for workflow_id, count in events.items():
            if str(workflow_id).startswith(f"{self.prefix}-") and count > 1:
                verdict.duplicated.append(f"event {workflow_id} x{count}")
        for workflow_id, state in sagas.items():
            if workflow_id not in self.failing and any(
                k.startswith(f"{workflow_id}.{UNDO}.") for k in effects
            ):
                verdict.duplicated.append(f"{workflow_id}: compensated without a failure")
            for record in state.get("tasks", []):
                earlier = record.get("history") or []
                causes = {(h.get("error") or {}).get("type") for h in earlier}
                if record.get("ref") in STEPS and (
                    record.get("attempt", 1) != len(earlier) + 1 or not causes <= self.retry_causes
                ):
                    verdict.duplicated.append(
                        f"{workflow_id}.{record['ref']} attempt {record.get('attempt')} {causes}"
                    )
                for abandoned in earlier:  # an attempt given up on must have had no effect
                    key = f"{workflow_id}.{record.get('ref')}.{abandoned.get('attempt')}"
                    if record.get("ref") in STEPS and key in effects:
                        verdict.duplicated.append(f"effect {key} of an abandoned attempt")
