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

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

__all__ = ["GATHERS", "Counter", "Gather", "GroupState"]

GATHERS = "gathers"


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
            if len(state.parts) >= state.expected:
                state.completer = part
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
            entry = await self.kv.get(group)
        except KeyNotFoundError:
            return None
        return _decode(entry.value or b"{}")


class _Count(msgspec.Struct):
    count: int = 0
    ids: list[str] = []


_decode_count = msgspec.json.Decoder(_Count).decode


class Counter:
    """Counts in a KV bucket, idempotent by the id of what is counted: a redelivered
    event (the same id) is not counted twice. Remembers the last ``remember`` ids."""

    def __init__(self, kv: KeyValue, remember: int = 1000) -> None:
        self.kv = kv
        self.remember = remember

    async def add(self, key: str, counted_id: str) -> int:
        """Count ``counted_id`` under ``key`` (once); the count after it."""
        while True:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                state, revision = _Count(), 0
            else:
                state, revision = _decode_count(entry.value or b"{}"), entry.revision or 0
            if counted_id in state.ids:
                return state.count
            state.count += 1
            state.ids = [*state.ids, counted_id][-self.remember :]
            try:
                if revision:
                    await self.kv.update(key, _encode(state), last=revision)
                else:
                    await self.kv.create(key, _encode(state))
            except KeyWrongLastSequenceError:
                continue
            return state.count
