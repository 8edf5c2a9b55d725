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
)
from kapellmeister.slots import Semaphore, Slots, Verdict, Waiter, holder_of
from kapellmeister.store import read_bucket

if TYPE_CHECKING:
    from kapellmeister.conductor import Conductor

__all__ = ["Limits", "released_slots"]

log = logging.getLogger("kapellmeister.limits")

_WAITING = frozenset({"SCHEDULED", "IN_PROGRESS"})
_decode_semaphore = msgspec.json.Decoder(Semaphore).decode
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
        conductor = self.conductor
        workflow_id, ref, attempt = holder_of(waiter.id)
        state = (await conductor.store.load(workflow_id, fresh=True)).state
        if not ref:
            if state is None or state.status in TERMINAL:
                return False  # it ended while it waited
            if state.status != "QUEUED":
                return True  # running already (a grant sent on twice)
            semaphore, _ = await self.slots.read(name)
            if semaphore is None or waiter.id not in semaphore.holders:
                # Ended and queued anew since this grant (a rerun): not this grant's.
                return True
            at = conductor.clock.now()
            # Applied, its end (even at once) gives the slot back itself (`released`).
            await conductor.request(
                SlotGranted(workflow_id=workflow_id, at=at), operation="slot granted"
            )
            return True
        record = next((t for t in state.tasks if t.ref == ref), None) if state else None
        if (
            state is None
            or state.status in TERMINAL
            or record is None
            or record.attempt != attempt
            or record.status not in _WAITING
        ):
            return False
        if record.status != "SCHEDULED" or record.retry_at is not None:
            return True  # dispatched already, or not due yet: it holds its slot
        definition = await conductor.definitions.get(state.workflow, state.version)
        dispatch = tuple(
            c
            for c in commands_caused_by(definition, state, record.cause)
            if isinstance(c, RunTask) and c.ref == record.ref
        )
        # A replay: past the dedupe window only a dispatch that is not stored goes out.
        await conductor.publish_decided(state, dispatch, replay=True)
        return True

    async def members(self) -> set[str]:
        """Every id that holds or waits for a slot, in any semaphore in use (the sweeper
        leaves those QUEUED workflows alone: they wait in order already)."""
        found: set[str] = set()
        async for _, value in read_bucket(self.slots.kv):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                semaphore = _decode_semaphore(value)
                found.update(semaphore.holders)
                found.update(w.id for w in semaphore.waiting)
        return found

    async def audit(self) -> int:
        """In every semaphore in use: evict holders past their lease whose saga says
        they ended, send on again those granted whose dispatch was lost, and dispatch
        whom the freed slots go to. How many were dispatched."""
        count = 0
        names = [name async for name, _ in read_bucket(self.slots.kv)]
        for name in names:
            granted, stalled = await self.slots.audit(name, self._judge)
            for id in stalled:
                log.info("slot %s: %s was granted but not sent on; sending it on", name, id)
            await self.dispatch(name, [*granted, *(Waiter(id=id) for id in stalled)])
            count += len(granted) + len(stalled)
        return count

    async def _judge(self, id: str) -> Verdict:
        workflow_id, ref, attempt = holder_of(id)
        state = (await self.conductor.store.load(workflow_id, fresh=True)).state
        if state is None or state.status in TERMINAL:
            return "dead"
        if not ref:
            return "stalled" if state.status == "QUEUED" else "running"
        record = next((t for t in state.tasks if t.ref == ref), None)
        if record is None or record.attempt != attempt or record.status not in _WAITING:
            return "dead"
        if record.status == "SCHEDULED" and record.retry_at is None and not record.started_at:
            return "stalled"  # published or not: a replay sends only what is missing
        return "running"
