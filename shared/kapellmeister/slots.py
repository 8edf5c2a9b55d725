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

import bisect
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Literal

import msgspec
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kapellmeister.messages import utc_shift

__all__ = [
    "MAX_WAITING",
    "SLOTS",
    "Holder",
    "Judge",
    "Semaphore",
    "Slots",
    "Verdict",
    "Waiter",
    "decode_semaphore",
    "give_back",
    "holder_of",
    "take",
]

log = logging.getLogger("kapellmeister.slots")

SLOTS: Final = "slots"
# JetStream's error code for a compare-and-set that found another revision.
_WRONG_LAST_SEQUENCE: Final = 10071


# At most this many wait in one semaphore's queue, and its value stays under this many
# bytes (a NATS message carries 1 MiB): who comes when it is full is not queued, and
# asks again when the sweeper re-drives it.
MAX_WAITING: Final = 10_000
_MAX_BYTES: Final = 768 * 1024
# Compare-and-sets an audit tries on a busy semaphore before it leaves it to the next sweep.
_AUDIT_TRIES: Final = 5


def holder_of(id: str) -> tuple[str, str, int]:
    """The workflow id, task ref and attempt an id names: a workflow's own id (ref "",
    attempt 0), or a task attempt's ``<workflow_id>:<ref>:<attempt>`` (`task_msg_id`;
    neither a workflow id nor a ref has a colon)."""
    if ":" not in id:
        return id, "", 0
    workflow_id, ref, attempt = id.rsplit(":", 2)
    return workflow_id, ref, int(attempt)


class Waiter(msgspec.Struct, frozen=True, array_like=True):
    """Who waits for a slot, stored as ``["<id>", <priority>, "<since>"]``: a workflow
    (its id) or a task attempt (``<workflow_id>:<ref>:<attempt>``)."""

    id: str
    priority: int = 0
    since: str = ""


class Holder(msgspec.Struct, frozen=True, array_like=True):
    """Who holds a slot (the key it is stored under), as ``["<since>", "<until>"]``:
    until when its lease runs."""

    since: str
    until: str


class Semaphore(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a `slots` key: readable with ``nats kv get slots <key>``."""

    limit: int
    holders: dict[str, Holder] = {}
    waiting: list[Waiter] = []

    def members(self) -> set[str]:
        """The ids that hold a slot or wait for one."""
        return {*self.holders, *(w.id for w in self.waiting)}


_encode = msgspec.json.Encoder().encode
decode_semaphore = msgspec.json.Decoder(Semaphore).decode

Taken = Literal["holds", "waits", "full"]


def _queue(waiting: list[Waiter], waiter: Waiter) -> None:
    """Put ``waiter`` after everyone of its priority or higher."""
    waiting.insert(bisect.bisect_right(waiting, -waiter.priority, key=_rank), waiter)


def _rank(waiter: Waiter) -> int:
    """The queue's order, ascending: higher priorities first."""
    return -waiter.priority


def _grant(
    holders: dict[str, Holder], waiting: list[Waiter], limit: int, now: str, lease_s: float
) -> list[Waiter]:
    """Hand free slots to the head of the queue; those granted, in order."""
    granted: list[Waiter] = []
    while waiting and len(holders) < limit:
        waiter = waiting.pop(0)
        holders[waiter.id] = Holder(since=now, until=utc_shift(now, lease_s))
        granted.append(waiter)
    return granted


def take(
    semaphore: Semaphore | None, waiter: Waiter, limit: int, now: str, lease_s: float
) -> tuple[Semaphore, Taken, list[Waiter]]:
    """``waiter`` asks for a slot: the semaphore after; whether it holds one, waits, or
    found the queue full; and who else was granted one (a grant a crash had lost).
    ``limit`` is the newest the caller has. A holder asking again renews its lease."""
    current = semaphore or Semaphore(limit=limit)
    holders, waiting = dict(current.holders), list(current.waiting)
    if waiter.id in holders:
        holders[waiter.id] = Holder(since=holders[waiter.id].since, until=utc_shift(now, lease_s))
    elif all(w.id != waiter.id for w in waiting):
        if len(waiting) >= MAX_WAITING:
            return current, "full", []
        _queue(waiting, waiter)
    granted = _grant(holders, waiting, limit, now, lease_s)
    after = Semaphore(limit=limit, holders=holders, waiting=waiting)
    taken: Taken = "holds" if waiter.id in holders else "waits"
    return after, taken, [w for w in granted if w.id != waiter.id]


def give_back(
    semaphore: Semaphore, id: str, now: str, lease_s: float
) -> tuple[Semaphore, list[Waiter]]:
    """``id`` leaves (its slot, or its place in the queue): the semaphore after, and who
    got a slot it freed."""
    holders = {k: v for k, v in semaphore.holders.items() if k != id}
    waiting = [w for w in semaphore.waiting if w.id != id]
    granted = _grant(holders, waiting, semaphore.limit, now, lease_s)
    return Semaphore(limit=semaphore.limit, holders=holders, waiting=waiting), granted


# What a holder's saga says of it: ended ("dead"), running, or granted but never sent
# on ("stalled": a crash lost its dispatch).
Verdict = Literal["dead", "running", "stalled"]
Judge = Callable[[str], Awaitable[Verdict]]


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
            after, taken, granted = take(current, waiter, limit, self.now(), self.lease_s)
            if taken == "full" or len(_encode(after)) > _MAX_BYTES:
                log.warning("slot %s: queue full; %s waits to be queued", name, waiter.id)
                return False, []
            if after == current:
                return taken == "holds", granted
            if await self._write(name, after, revision):
                return taken == "holds", granted

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

    async def audit(self, name: str, judge: Judge) -> tuple[list[Waiter], list[str]]:
        """Look at the holders whose lease ran out: evict those whose saga says they
        ended, renew the others. Who got the slots freed, and the holders granted but
        never sent on (to send on again). Each holder is judged once; a holder that
        changed meanwhile is left to the next audit."""
        current, revision = await self.read(name)
        if current is None:
            return [], []
        now = self.now()
        expired = {k: h for k, h in current.holders.items() if h.until <= now}
        if not expired:
            return [], []
        verdicts = {id: await judge(id) for id in expired}
        for _ in range(_AUDIT_TRIES):
            holders = dict(current.holders)
            stalled: list[str] = []
            for id, seen in expired.items():
                if holders.get(id) != seen:
                    continue  # renewed, or gone, meanwhile
                if verdicts[id] == "dead":
                    del holders[id]
                    continue
                holders[id] = Holder(since=seen.since, until=utc_shift(now, self.lease_s))
                if verdicts[id] == "stalled":
                    stalled.append(id)
            waiting = list(current.waiting)
            granted = _grant(holders, waiting, current.limit, now, self.lease_s)
            after = Semaphore(limit=current.limit, holders=holders, waiting=waiting)
            if await self._write(name, after, revision):
                return granted, stalled
            current, revision = await self.read(name)
            if current is None:
                return [], []
        return [], []  # too busy to settle now: the next sweep looks again

    async def read(self, name: str) -> tuple[Semaphore | None, int]:
        """The semaphore and its revision (None, 0: never used)."""
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            return None, 0
        revision = entry.revision or 0
        if not entry.value:
            return None, revision
        return decode_semaphore(entry.value), revision

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
