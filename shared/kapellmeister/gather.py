"""Scatter-gather with concurrency-aware state: the seed's ETags are KV revisions.

Fan out N events; each gatherer, on its part's event, calls `Gather.arrive`. The group's
state is one key in the ``gathers`` bucket (``{"parts": [...], "completer": ...}``),
changed only by compare-and-set at the revision read, so concurrent gatherers never lose
each other's part. Exactly one call completes the set: the one whose write made it
whole. It gets True and emits the "gathered" event; every other call gets False. A
redelivered part changes nothing and gets the same answer as the first time (True only
for the completer's own part, so a completer that crashed before emitting emits on its
redelivery; give the "gathered" event a deterministic ``Nats-Msg-Id`` and the copy is
dropped), whatever the interleaving.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

__all__ = ["GATHERS", "Counter", "Gather", "GroupState", "kv_key"]

GATHERS = "gathers"


_KEY: Final = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")


def kv_key(name: str) -> str:
    """``name`` as a KV key: itself when it is one, else ``h.<digest>`` (any text may
    name a group or a counter, and two different names never share a key)."""
    if _KEY.match(name) and not name.startswith("h."):
        return name
    return "h." + hashlib.sha256(name.encode()).hexdigest()


class GroupState(msgspec.Struct):
    """A group's parts so far, and which part completed it ('' until one did)."""

    expected: int
    parts: list[str] = []
    completer: str = ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(GroupState).decode


class Gather:
    """Arrivals of parts into groups, in a KV bucket (``gathers`` by default)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def arrive(self, group: str, part: str, expected: int) -> bool:
        """Record ``part`` of ``group`` (of ``expected`` parts); True iff this part's
        arrival completed the group."""
        group = kv_key(group)
        while True:
            try:
                entry = await self.kv.get(group)
            except KeyNotFoundError:
                state = GroupState(expected=expected)
                revision = 0
            else:
                state = _decode(entry.value or b"{}")
                revision = entry.revision or 0
            if part in state.parts:
                return state.completer == part  # a redelivery: the first answer again
            state.parts.append(part)
            if not state.completer and len(state.parts) >= state.expected:
                state.completer = part  # once: a part beyond the set completes nothing
            try:
                if revision:
                    await self.kv.update(group, _encode(state), last=revision)
                else:
                    await self.kv.create(group, _encode(state))
            except KeyWrongLastSequenceError:
                continue  # another part arrived first: read again
            return state.completer == part

    async def state(self, group: str) -> GroupState | None:
        try:
            entry = await self.kv.get(kv_key(group))
        except KeyNotFoundError:
            return None
        return _decode(entry.value or b"{}")


class _Count(msgspec.Struct):
    count: int = 0
    # The count each remembered id got, oldest first.
    ids: dict[str, int] = {}


_decode_count = msgspec.json.Decoder(_Count).decode


class Counter:
    """Counts in a KV bucket, idempotent by the id of what is counted: a redelivered
    event (the same id) is not counted twice and gets the count it got the first time.
    Remembers the last ``remember`` ids."""

    def __init__(self, kv: KeyValue, remember: int = 1000) -> None:
        self.kv = kv
        self.remember = remember

    async def add(self, key: str, counted_id: str) -> int:
        """Count ``counted_id`` under ``key`` (once); the count it made."""
        key = kv_key(key)
        while True:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                state, revision = _Count(), 0
            else:
                state, revision = _decode_count(entry.value or b"{}"), entry.revision or 0
            if counted_id in state.ids:
                return state.ids[counted_id]
            state.count += 1
            state.ids[counted_id] = state.count
            while len(state.ids) > self.remember:
                del state.ids[next(iter(state.ids))]
            try:
                if revision:
                    await self.kv.update(key, _encode(state), last=revision)
                else:
                    await self.kv.create(key, _encode(state))
            except KeyWrongLastSequenceError:
                continue
            return state.count
