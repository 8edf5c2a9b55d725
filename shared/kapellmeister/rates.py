"""Rate limits: at most ``limit`` runs of a task per ``per_s`` seconds, across replicas.

A task declares its limit (``task("mail.send", send, rate=Rate(limit=10, per_s=1))``),
optionally keyed by a field of its input (``key="customer"``: each customer its own
budget). It is the generic cell rate algorithm (GCRA) as a reservation: the key of the
``rates`` bucket holds the *theoretical arrival time* of the next run, and every agent
replica reserves a slot by one compare-and-set, before it waits:

- a run may start at ``max(now, tat - (limit - 1) * interval)``, with ``interval =
  per_s / limit``; the reservation moves ``tat`` to ``max(tat, start) + interval``;
- so after a quiet spell ``limit`` runs start at once, then one each ``interval``;
- ``tat`` only moves forward: a replica whose clock is behind cannot hand out the same
  slot again, and one whose clock is ahead only starts early by its own skew;
- each run reserves once and then sleeps until its slot: no herd of waiters racing for
  every token; within a replica slots go out in its queue's order (across replicas, in
  the order their compare-and-sets land).

Times are the NATS server's (`ServerClock`, re-read every few minutes), seconds as floats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated, Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kapellmeister.expressions import Json
from kapellmeister.locks import KeyedLocks

__all__ = ["RATES", "Rate", "RateLimiter", "bucket_key", "reserve"]

RATES: Final = "rates"
# A key idles out of the rates bucket after a day (its TTL): no window may be longer.
MAX_PER_S: Final = 86_400.0


class Rate(msgspec.Struct, frozen=True, kw_only=True):
    """At most ``limit`` runs per ``per_s`` seconds (at most a day), per value of the
    input's ``key`` field (a dotted path; None: one budget for the task)."""

    limit: Annotated[int, msgspec.Meta(ge=1)]
    per_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_PER_S)] = 1.0
    key: str | None = None

    @property
    def interval(self) -> float:
        """Seconds between two runs once the burst is spent."""
        return self.per_s / self.limit


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(float).decode


def _field(data: Json, path: str) -> Json:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def bucket_key(task: str, rate: Rate, data: Json) -> str:
    """The rates bucket's key for one run of ``task`` with input ``data``: the task's own
    name (so NATS permissions can give each agent its own keys), then a digest of the
    keyed field's value."""
    if rate.key is None:
        return task
    value = msgspec.json.encode(_field(data, rate.key), order="sorted")
    return f"{task}.k.{hashlib.sha256(value).hexdigest()[:16]}"


def reserve(rate: Rate, tat: float | None, now: float) -> tuple[float, float]:
    """GCRA as a reservation: when a run asked for at ``now`` may start, and the new
    theoretical arrival time (pure)."""
    start = now if tat is None else max(now, tat - (rate.limit - 1) * rate.interval)
    return start, (start if tat is None else max(tat, start)) + rate.interval


class RateLimiter:
    """Reserves slots in the rates bucket; ``now`` is the server's time in seconds."""

    def __init__(self, kv: KeyValue, now: Callable[[], float]) -> None:
        self.kv = kv
        self.now = now
        # One reservation of a key at a time in this process, in the order they come:
        # a replica hands its slots out in the order of its queue, and only replicas
        # race each other's compare-and-set.
        self._locks = KeyedLocks()

    async def reserve(self, key: str, rate: Rate) -> float:
        """Reserve the next slot of ``key``: how many seconds from now it starts."""
        async with self._locks.hold(key):
            return await self._reserve(key, rate)

    async def _reserve(self, key: str, rate: Rate) -> float:
        while True:
            tat, revision = await self._read(key)
            now = self.now()
            start, after = reserve(rate, tat, now)
            try:
                if revision:
                    await self.kv.update(key, _encode(after), last=revision)
                else:
                    await self.kv.create(key, _encode(after))
            except KeyWrongLastSequenceError:
                continue  # another run reserved meanwhile: the next slot is ours
            return max(start - now, 0.0)

    async def _read(self, key: str) -> tuple[float | None, int]:
        """The key's theoretical arrival time and revision (None, 0: unused or expired)."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        revision = entry.revision or 0
        try:
            return (_decode(entry.value) if entry.value else None), revision
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None, revision  # unreadable: counted again from now
