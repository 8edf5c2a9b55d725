"""Concurrency limits: counting semaphores in the ``slots`` KV bucket, shared by every
conductor replica.

A definition caps how many of its workflows run at once (``concurrency`` on the
workflow), or how many attempts of a task name are dispatched at once in all workflows
(``concurrency`` on a SIMPLE task), optionally per value of a ``key`` expression. Each
cap is one key of the bucket (`kapellmeister.definitions.slot_name`):

    wf.<workflow>[.k.<digest>]     holders: workflow ids
    task.<task>[.k.<digest>]       holders: task attempts (``<workflow_id>:<ref>:<n>``)

Its value (`Semaphore`) holds the ``limit``, the ``holders`` and the ``waiting`` queue,
highest priority first, then in order of arrival. Every change is one compare-and-set,
so replicas never hand out the same slot twice:

- `take`: a holder keeps its slot; anyone else gets one if one is free and nobody waits
  before it, else joins the queue (once);
- `give_back`: a holder leaves (or a waiter leaves the queue), and the slots it frees go
  to the head of the queue at once;
- every change also grants free slots to waiters, so a grant lost in a crash is made
  by the next change;
- a semaphore with no holder and nobody waiting is deleted: the bucket holds only the
  semaphores in use.

The conductor releases a slot when the saga says its holder ended (the attempt ended,
or the workflow did). A holder's lease (``until``) is its guard against a release lost
in a crash: when it runs out, the sweeper looks at the holder's saga and evicts it if
it no longer runs (`Slots.audit`), else renews it. Who is granted a slot is told to the
caller, which dispatches it (`kapellmeister.conductor`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kapellmeister.messages import utc_shift

__all__ = ["SLOTS", "Holder", "Semaphore", "Slots", "Waiter", "give_back", "take"]

SLOTS: Final = "slots"
# JetStream's error code for a compare-and-set that found another revision.
_WRONG_LAST_SEQUENCE: Final = 10071


class Waiter(msgspec.Struct, frozen=True, kw_only=True):
    """Who asks for a slot: a workflow (``ref`` empty) or a task attempt."""

    id: str
    workflow_id: str
    ref: str = ""
    attempt: int = 0
    priority: int = 0
    since: str = ""


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    """Who holds a slot, since when, and until when its lease runs."""

    workflow_id: str
    ref: str = ""
    attempt: int = 0
    since: str
    until: str

    def as_waiter(self, id: str) -> Waiter:
        return Waiter(id=id, workflow_id=self.workflow_id, ref=self.ref, attempt=self.attempt)


class Semaphore(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a `slots` key: readable with ``nats kv get slots <key>``."""

    limit: int
    holders: dict[str, Holder] = {}
    waiting: list[Waiter] = []


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Semaphore).decode


def _queue(waiting: list[Waiter], waiter: Waiter) -> None:
    """Put ``waiter`` after everyone of its priority or higher."""
    at = next((i for i, w in enumerate(waiting) if w.priority < waiter.priority), len(waiting))
    waiting.insert(at, waiter)


def _grant(
    holders: dict[str, Holder], waiting: list[Waiter], limit: int, now: str, lease_s: float
) -> list[Waiter]:
    """Hand free slots to the head of the queue; those granted, in order."""
    granted: list[Waiter] = []
    while waiting and len(holders) < limit:
        waiter = waiting.pop(0)
        holders[waiter.id] = Holder(
            workflow_id=waiter.workflow_id,
            ref=waiter.ref,
            attempt=waiter.attempt,
            since=now,
            until=utc_shift(now, lease_s),
        )
        granted.append(waiter)
    return granted


def take(
    semaphore: Semaphore | None, waiter: Waiter, limit: int, now: str, lease_s: float
) -> tuple[Semaphore, bool, list[Waiter]]:
    """``waiter`` asks for a slot: the semaphore after, whether it holds one, and who else
    was granted one (a grant a crash had lost). ``limit`` is the newest the caller has."""
    current = semaphore or Semaphore(limit=limit)
    holders, waiting = dict(current.holders), list(current.waiting)
    if waiter.id not in holders and all(w.id != waiter.id for w in waiting):
        _queue(waiting, waiter)
    granted = _grant(holders, waiting, limit, now, lease_s)
    after = Semaphore(limit=limit, holders=holders, waiting=waiting)
    return after, waiter.id in holders, [w for w in granted if w.id != waiter.id]


def give_back(
    semaphore: Semaphore, id: str, now: str, lease_s: float
) -> tuple[Semaphore, list[Waiter]]:
    """``id`` leaves (its slot, or its place in the queue): the semaphore after, and who
    got a slot it freed."""
    holders = {k: v for k, v in semaphore.holders.items() if k != id}
    waiting = [w for w in semaphore.waiting if w.id != id]
    granted = _grant(holders, waiting, semaphore.limit, now, lease_s)
    return Semaphore(limit=semaphore.limit, holders=holders, waiting=waiting), granted


# Whether a holder (its id and record) still runs: its saga says so.
Liveness = Callable[[str, Holder], Awaitable[bool]]


class Slots:
    """The semaphores of one NATS account's `slots` bucket.

    ``now`` is the server's time (`ServerClock.now`); ``lease_s`` how long a holder is
    trusted before the sweeper looks at its saga.
    """

    def __init__(self, kv: KeyValue, now: Callable[[], str], lease_s: float) -> None:
        self.kv = kv
        self.now = now
        self.lease_s = lease_s

    async def acquire(self, name: str, waiter: Waiter, limit: int) -> tuple[bool, list[Waiter]]:
        """Take a slot of ``name`` for ``waiter`` or queue it: whether it holds one, and
        who else got one meanwhile (the caller dispatches them)."""
        while True:
            current, revision = await self.read(name)
            after, holds, granted = take(current, waiter, limit, self.now(), self.lease_s)
            if after == current:
                return holds, granted
            if await self._write(name, after, revision):
                return holds, granted

    async def release(self, name: str, id: str) -> list[Waiter]:
        """``id`` gives its slot (or its place in the queue) back: who got a slot."""
        while True:
            current, revision = await self.read(name)
            if current is None:
                return []
            after, granted = give_back(current, id, self.now(), self.lease_s)
            if after == current:
                return []
            if await self._write(name, after, revision):
                return granted

    async def audit(self, name: str, alive: Liveness) -> list[Waiter]:
        """Evict the holders whose lease ran out and whose saga says they no longer run;
        renew the others' leases. Who got the slots freed."""
        while True:
            current, revision = await self.read(name)
            if current is None:
                return []
            now = self.now()
            expired = {k: h for k, h in current.holders.items() if h.until <= now}
            if not expired:
                return []
            holders = dict(current.holders)
            for id, holder in expired.items():
                if await alive(id, holder):
                    holders[id] = msgspec.structs.replace(
                        holder, until=utc_shift(now, self.lease_s)
                    )
                else:
                    del holders[id]
            waiting = list(current.waiting)
            granted = _grant(holders, waiting, current.limit, now, self.lease_s)
            after = Semaphore(limit=current.limit, holders=holders, waiting=waiting)
            if await self._write(name, after, revision):
                return granted

    async def read(self, name: str) -> tuple[Semaphore | None, int]:
        """The semaphore and its revision (None, 0: never used)."""
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            return None, 0
        revision = entry.revision or 0
        if not entry.value:
            return None, revision
        return _decode(entry.value), revision

    async def _write(self, name: str, semaphore: Semaphore, revision: int) -> bool:
        """Compare-and-set; an idle semaphore is deleted (the bucket keeps only those in
        use, which the sweeper reads)."""
        try:
            if revision and not semaphore.holders and not semaphore.waiting:
                await self.kv.delete(name, last=revision)
            elif revision:
                await self.kv.update(name, _encode(semaphore), last=revision)
            else:
                await self.kv.create(name, _encode(semaphore))
        except KeyWrongLastSequenceError:
            return False  # someone else changed it: read again
        except BadRequestError as exc:
            # A delete's compare-and-set says so in an API error of its own.
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True
