"""Heartbeat leases: how a conductor tells a hung agent from a slow one.

A SIMPLE task with ``response_timeout_s`` is run under a lease, one key per attempt in
the ``leases`` bucket (``<workflow_id>.<ref>.<attempt>``):

* the agent **claims** it when it takes the task (``create``, or a compare-and-set
  take-over when JetStream redelivered the message of an agent that went silent), then
  **renews** it every third of ``response_timeout_s`` with a compare-and-set at the
  revision it last wrote, and deletes it once its result is published;
* a conductor **checks** it when the attempt's ``response`` timer fires: a revision
  that moved since the last check means alive (check again one timeout later); the same
  revision means no renewal for a whole ``response_timeout_s``, so it writes
  ``cancelled`` at that revision and fails the attempt as ``response_timeout``, which
  the task's ``retry`` then runs again elsewhere.

Only revisions are compared, never two hosts' clocks. Whoever loses a compare-and-set
learns the other side moved first: a renewal that finds ``cancelled`` stops the handler,
and a redelivered message whose lease is ``cancelled`` is dropped without running.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Final

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

__all__ = ["CANCELLED", "LEASES", "Lease", "Look", "cancel_if_silent", "lease_key", "look"]

LEASES: Final = "leases"
CANCELLED: Final = b"cancelled"


def lease_key(workflow_id: str, ref: str, attempt: int) -> str:
    return f"{workflow_id}.{ref}.{attempt}"


class Lease:
    """An agent's hold on one attempt; every write is a compare-and-set."""

    def __init__(self, kv: KeyValue, key: str, holder: str) -> None:
        self.kv = kv
        self.key = key
        self.holder = holder.encode()
        self.revision = 0

    async def claim(self) -> bool:
        """Take the attempt; False if a conductor already cancelled it (do not run it)."""
        while True:
            try:
                self.revision = await self.kv.create(self.key, self.holder)
                return True
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.kv.get(self.key)
            except KeyNotFoundError:
                continue  # deleted in between: create again
            if entry.value == CANCELLED:
                return False
            # A redelivery: the holder before us went silent past the ack wait.
            try:
                self.revision = await self.kv.update(self.key, self.holder, last=entry.revision)
                return True
            except KeyWrongLastSequenceError:
                continue

    async def renew(self) -> bool:
        """Renew at our revision; False if someone else wrote since (cancelled or taken)."""
        try:
            self.revision = await self.kv.update(self.key, self.holder, last=self.revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def release(self) -> None:
        """Delete it, only if still ours (a cancellation must stay visible)."""
        with contextlib.suppress(KeyWrongLastSequenceError, nats.errors.Error):
            await self.kv.delete(self.key, last=self.revision)


class Look(enum.Enum):
    """What a conductor's check of a lease found."""

    WAITING = "waiting"  # not claimed yet (queued) or already released
    ALIVE = "alive"  # renewed since the last check
    CANCELLED = "cancelled"  # cancelled before (a redelivered timer)
    SILENT = "silent"  # not renewed since the last check


async def look(kv: KeyValue, key: str, seen: int) -> tuple[Look, int]:
    """The lease's state against the revision ``seen`` at the last check, and its revision."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return Look.WAITING, 0
    revision = entry.revision or 0
    if entry.value == CANCELLED:
        return Look.CANCELLED, revision
    if revision != seen:
        return Look.ALIVE, revision
    return Look.SILENT, revision


async def cancel_if_silent(kv: KeyValue, key: str, revision: int) -> bool:
    """Write ``cancelled`` at ``revision``; False if the agent renewed in between."""
    try:
        await kv.update(key, CANCELLED, last=revision)
    except KeyWrongLastSequenceError:
        return False
    return True
