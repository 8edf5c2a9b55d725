"""The conductor's side of concurrency limits: who may be dispatched, who gets a freed
slot, and the audit of lost releases (the semaphores themselves: `kapellmeister.slots`).

- A task attempt with a limit (its `RunTask` names a ``slot``) is published only once it
  holds a slot (`Limits.admit`); until then it stays SCHEDULED in its saga and waits in
  the semaphore's queue. The sweeper's re-drive of a SCHEDULED task goes through the
  same gate, so nothing is dispatched past the limit.
- A workflow with a limit starts QUEUED; its `AcquireSlot` takes a slot or queues it,
  and a grant is applied as its `SlotGranted` (`Limits.acquire`).
- When a saga write ends a holder (an attempt ended or was replaced, the workflow
  ended), its slot is given back and the next in the queue is dispatched at once
  (`Limits.released`).
- Lost releases (a crash between the saga write and the release) are found by the
  sweeper when a holder's lease runs out (`Limits.audit`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import TYPE_CHECKING

import msgspec
import nats.errors

from kapellmeister.decider import commands_caused_by, task_msg_id
from kapellmeister.definitions import Definition
from kapellmeister.messages import (
    TERMINAL,
    AcquireSlot,
    RunTask,
    Saga,
    SlotGranted,
    TaskRecord,
)
from kapellmeister.slots import Semaphore, Slots, Verdict, Waiter, decode_semaphore, holder_of
from kapellmeister.store import read_bucket

if TYPE_CHECKING:
    from kapellmeister.conductor import Conductor

__all__ = ["Limits", "released_slots"]

log = logging.getLogger("kapellmeister.limits")

_WAITING = frozenset({"SCHEDULED", "IN_PROGRESS"})
# The grants the running `Limits.dispatch` loop (of this task) still has to send on.
_GRANTS: contextvars.ContextVar[list[tuple[str, Waiter]] | None] = contextvars.ContextVar(
    "slot_grants", default=None
)


def released_slots(before: Saga, after: Saga) -> list[tuple[str, str]]:
    """The (semaphore, holder id) pairs a saga write ends: attempts with a slot that
    ended or were replaced, and the workflow's own slot when it ended."""
    ended: list[tuple[str, str]] = []
    now = {t.ref: t for t in after.tasks}
    for record in before.tasks:
        if not record.slot or record.status not in _WAITING:
            continue
        later = now.get(record.ref)
        if later is None or later.attempt != record.attempt or later.status not in _WAITING:
            ended.append((record.slot, task_msg_id(before.workflow_id, record.ref, record.attempt)))
    if before.slot and before.status not in TERMINAL and after.status in TERMINAL:
        ended.append((before.slot, before.workflow_id))
    return ended


class Limits:
    """Concurrency limits for one conductor replica (all replicas share the semaphores)."""

    def __init__(self, conductor: Conductor, slots: Slots) -> None:
        self.conductor = conductor
        self.slots = slots

    async def admit(self, command: RunTask) -> bool:
        """Whether the attempt holds a slot now (taking one, or queueing it)."""
        waiter = Waiter(id=command.msg_id, priority=command.priority, since=self.slots.now())
        holds, granted = await self.slots.acquire(command.slot, waiter, command.limit)
        await self.dispatch(command.slot, granted)
        return holds

    async def acquire(self, command: AcquireSlot) -> None:
        """A QUEUED workflow asks for its slot: it starts now, or when one frees."""
        waiter = Waiter(id=command.workflow_id, priority=command.priority, since=self.slots.now())
        holds, granted = await self.slots.acquire(command.slot, waiter, command.limit)
        if holds:
            granted = [waiter, *granted]
        await self.dispatch(command.slot, granted)

    async def released(self, before: Saga | None, after: Saga, definition: Definition) -> None:
        """Give back the slots a saga write ended; dispatch whom they go to."""
        if before is None or not definition.limited:
            return
        for name, holder in released_slots(before, after):
            try:
                granted = await self.slots.release(name, holder)
            except (TimeoutError, nats.errors.Error) as exc:
                # The saga is written: the fact goes on. The holder's lease runs out and
                # the sweeper's audit frees the slot then.
                log.warning("slot %s: %s not given back (%r); the audit will", name, holder, exc)
                continue
            await self.dispatch(name, granted)

    async def dispatch(self, name: str, granted: list[Waiter]) -> None:
        """Send on each waiter that was granted a slot of ``name``; one whose saga no longer
        wants it gives the slot back at once, to the next.

        Sending one on may end it, and free its slot for the next (a workflow that ends
        in its first step): the grants that makes join this loop rather than nest in it,
        so a long queue of such workflows does not recurse."""
        outer = _GRANTS.get()
        if outer is not None:
            outer.extend((name, waiter) for waiter in granted)
            return
        pending = [(name, waiter) for waiter in granted]
        token = _GRANTS.set(pending)
        try:
            while pending:
                name, waiter = pending.pop(0)
                if await self._send_on(name, waiter):
                    continue
                log.info("slot %s: %s no longer waits; given to the next", name, waiter.id)
                pending.extend((name, w) for w in await self.slots.release(name, waiter.id))
        finally:
            _GRANTS.reset(token)

    async def _send_on(self, name: str, waiter: Waiter) -> bool:
        """Dispatch a granted waiter; False if its saga shows it no longer waits."""
        verdict, state, record = await self._look(waiter.id)
        if verdict != "stalled":
            return verdict == "running"  # dispatched already, or not due yet: it holds
        assert state is not None
        conductor = self.conductor
        if record is None:  # a QUEUED workflow
            semaphore, _ = await self.slots.read(name)
            if semaphore is None or waiter.id not in semaphore.holders:
                # Ended and queued anew since this grant (a rerun): not this grant's.
                return True
            # Applied, its end (even at once) gives the slot back itself (`released`).
            granted = SlotGranted(workflow_id=state.workflow_id, at=conductor.clock.now())
            await conductor.request(granted, operation="slot granted")
            return True
        definition = await conductor.definitions.get(state.workflow, state.version)
        dispatch = tuple(
            c
            for c in commands_caused_by(definition, state, record.cause)
            if isinstance(c, RunTask) and c.ref == record.ref
        )
        # A replay: past the dedupe window only a dispatch that is not stored goes out.
        await conductor.publish_decided(state, dispatch, replay=True)
        return True

    async def semaphores(self) -> dict[str, Semaphore]:
        """Every semaphore in use, by name, as read now (one read of the bucket)."""
        found: dict[str, Semaphore] = {}
        async for name, value in read_bucket(self.slots.kv):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                found[name] = decode_semaphore(value)
        return found

    async def audit(self, semaphores: dict[str, Semaphore]) -> int:
        """In every semaphore in use (``semaphores``, as `semaphores` read them): evict
        holders past their lease whose saga says they ended, send on again those granted
        whose dispatch was lost, and dispatch whom the freed slots go to. How many were
        dispatched."""
        count = 0
        for name in semaphores:
            granted, stalled = await self.slots.audit(name, self._judge)
            for id in stalled:
                log.info("slot %s: %s was granted but not sent on; sending it on", name, id)
            await self.dispatch(name, [*granted, *(Waiter(id=id) for id in stalled)])
            count += len(granted) + len(stalled)
        return count

    async def _judge(self, id: str) -> Verdict:
        return (await self._look(id))[0]

    async def _look(self, id: str) -> tuple[Verdict, Saga | None, TaskRecord | None]:
        """What a holder's saga says of it, with the saga and the attempt's record."""
        workflow_id, ref, attempt = holder_of(id)
        state = (await self.conductor.store.load(workflow_id, fresh=True)).state
        if state is None or state.status in TERMINAL:
            return "dead", state, None
        if not ref:
            return ("stalled" if state.status == "QUEUED" else "running"), state, None
        record = next((t for t in state.tasks if t.ref == ref), None)
        if record is None or record.attempt != attempt or record.status not in _WAITING:
            return "dead", state, record
        if record.status == "SCHEDULED" and record.retry_at is None and not record.started_at:
            # Published or not: a replay sends only what is missing.
            return "stalled", state, record
        return "running", state, record
