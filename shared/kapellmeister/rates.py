"""Rate limits: at most ``limit`` runs of a task per ``per_s`` seconds, across replicas.

A task declares its limit (``task("mail.send", send, rate=Rate(limit=10, per_s=1))``),
optionally keyed by a field of its input (``key="customer"``: each customer its own
budget). Every agent replica takes a token from the same token bucket before it runs the
task: a key of the ``rates`` bucket holding the tokens left and when they were counted,
changed only by compare-and-set. The bucket refills continuously (``limit / per_s``
tokens a second) up to ``limit``, so a burst of ``limit`` may run at once after a quiet
spell, and over any longer stretch at most ``limit`` per ``per_s`` run.

A task over its limit waits in its agent (the message is held, its ack wait extended),
so the order of the work queue is kept and no delivery is spent on waiting; times are
the NATS server's (`ServerClock`), so replicas on hosts whose clocks differ agree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kapellmeister.expressions import Json

__all__ = ["RATES", "Rate", "RateLimiter", "bucket_key", "take"]

RATES: Final = "rates"
# A key of the rates bucket: the task's name and the key's value, made safe for a KV key.
_SAFE = re.compile(r"[^A-Za-z0-9_=-]")


class Rate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """At most ``limit`` runs per ``per_s`` seconds, per value of the input's ``key``
    field (a dotted path; None: one budget for the task)."""

    limit: Annotated[int, msgspec.Meta(ge=1)]
    per_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    key: str | None = None

    @property
    def per_second(self) -> float:
        return self.limit / self.per_s


class _Tokens(msgspec.Struct, frozen=True):
    tokens: float
    at: float


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Tokens).decode


def _field(data: Json, path: str) -> Json:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def bucket_key(task: str, rate: Rate, data: Json) -> str:
    """The rates bucket's key for one run of ``task`` with input ``data``."""
    base = _SAFE.sub("_", task)
    if rate.key is None:
        return base
    value = msgspec.json.encode(_field(data, rate.key))
    # A short digest: any value (long, with dots or spaces) makes a valid key.
    return f"{base}.{hashlib.sha256(value).hexdigest()[:16]}"


def take(rate: Rate, stored: _Tokens | None, now: float) -> tuple[_Tokens, float]:
    """The bucket after taking a token now, or how long until one is there (seconds,
    0 when taken): pure, the arithmetic of the token bucket."""
    tokens = float(rate.limit) if stored is None else stored.tokens
    since = 0.0 if stored is None else max(now - stored.at, 0.0)
    tokens = min(float(rate.limit), tokens + since * rate.per_second)
    if tokens >= 1.0:
        return _Tokens(tokens=tokens - 1.0, at=now), 0.0
    return _Tokens(tokens=tokens, at=now), (1.0 - tokens) / rate.per_second


class RateLimiter:
    """Takes tokens from the rates bucket; ``now`` is the server's time in seconds."""

    def __init__(self, kv: KeyValue, now: Callable[[], float]) -> None:
        self.kv = kv
        self.now = now

    async def acquire(
        self, key: str, rate: Rate, waiting: Callable[[float], Awaitable[None]]
    ) -> float:
        """Take a token for ``key``, waiting (by ``waiting(seconds)``) while there is
        none; the seconds waited."""
        waited = 0.0
        while True:
            stored, revision = await self._read(key)
            after, wait = take(rate, stored, self.now())
            if wait > 0:
                await waiting(wait)
                waited += wait
                continue
            try:
                if revision:
                    await self.kv.update(key, _encode(after), last=revision)
                else:
                    await self.kv.create(key, _encode(after))
            except KeyWrongLastSequenceError:
                continue  # another replica took one meanwhile: count again
            return waited

    async def _read(self, key: str) -> tuple[_Tokens | None, int]:
        """The bucket's tokens and revision (None, 0: never used, or expired)."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        revision = entry.revision or 0
        try:
            return (_decode(entry.value) if entry.value else None), revision
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None, revision  # unreadable: counted again from full
