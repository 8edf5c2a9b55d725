"""Saga state in the ``workflows`` KV bucket: load with revision, create, compare-and-set.

The KV revision is the workflow's lock. A writer names the revision it read
(``kv.update(key, value, last=revision)``); if another replica wrote in between, JetStream
refuses with ``KeyWrongLastSequenceError`` and the writer reloads and decides again.

The store also keeps the last state and revision this process wrote or read per
workflow, so a conductor that owns a workflow's traffic can try the CAS straight away
and skip a read; a stale entry costs one failed CAS and a reload, never a wrong write.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TypeVar

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from kapellmeister.messages import TERMINAL, Saga
from kapellmeister.publisher import Publisher

__all__ = ["CasConflict", "SagaStore", "Versioned", "read_bucket"]

log = logging.getLogger("kapellmeister.store")

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Saga).decode


class Versioned(msgspec.Struct, frozen=True):
    """A saga and the KV revision it was read at (0 means: not stored yet)."""

    state: Saga | None
    revision: int


async def read_bucket(kv: KeyValue, quiet_s: float = 10.0) -> AsyncIterator[tuple[str, bytes]]:
    """The key and latest value of every key of a bucket (an ordered consumer over it).

    The end is the first entry with nothing pending after it (its ``delta`` is 0), and an
    empty bucket is known from its status first. nats-py's own end marker (a None update)
    is not trusted: it is sent early when the server has pushed every entry before the
    client counted one, so a read ending on it can miss the whole bucket. Should the end
    never come (a reconnect mid-read, a purge under the read), a quiet ``quiet_s`` ends it.
    """
    if (await kv.status()).values == 0:
        return
    watcher = await kv.watchall()
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=quiet_s)
            except nats.errors.TimeoutError:
                log.warning("reading bucket %s: no end after %.0fs", kv._name, quiet_s)
                return
            if entry is None:  # nats-py's marker: not the end (see above)
                continue
            if entry.value and entry.operation is None:
                yield entry.key, entry.value
            if entry.delta == 0:
                return
    finally:
        await watcher.stop()


class CasConflict(Exception):
    """Another writer changed the saga since it was read: reload and decide again."""


class SagaStore:
    """The ``workflows`` bucket, with a small cache of what this process last saw."""

    def __init__(self, kv: KeyValue, publisher: Publisher, cache_size: int = 20_000) -> None:
        self.kv = kv
        self._publisher = publisher
        self._subject = f"$KV.{kv._name}."
        self._cache: OrderedDict[str, Versioned] = OrderedDict()
        self._cache_size = cache_size

    def _remember(self, key: str, versioned: Versioned) -> None:
        self._cache[key] = versioned
        self._cache.move_to_end(key)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    def cached(self, workflow_id: str) -> Versioned | None:
        return self._cache.get(workflow_id)

    async def load(self, workflow_id: str, *, fresh: bool = False) -> Versioned:
        """The saga and its revision; from the cache unless ``fresh``."""
        if not fresh and (cached := self._cache.get(workflow_id)) is not None:
            return cached
        try:
            entry = await self.kv.get(workflow_id)
        except KeyNotFoundError:
            return Versioned(None, 0)
        versioned = Versioned(_decode(entry.value or b""), entry.revision or 0)
        self._remember(workflow_id, versioned)
        return versioned

    async def save(self, state: Saga, revision: int) -> int:
        """Write ``state`` if the stored revision is still ``revision`` (0: create).

        Raises:
            CasConflict: someone else wrote first; the cache entry is dropped.
        """
        key = state.workflow_id
        value = _encode(state)
        try:
            try:
                new_revision = await self._write(key, value, revision)
            except KeyWrongLastSequenceError:
                if revision != 0:
                    raise
                # A create over a key deleted or purged (past its retention): the marker
                # is its last revision; anything else means the workflow exists.
                marker = await self._deleted_at(key)
                if marker is None:
                    raise
                new_revision = await self._write(key, value, marker)
        except KeyWrongLastSequenceError as exc:
            self.forget(key)
            raise CasConflict(key) from exc
        if state.status in TERMINAL:
            # Nothing more will happen to it here: keep the cache for running workflows.
            self.forget(key)
        else:
            self._remember(key, Versioned(state, new_revision))
        return new_revision

    async def _deleted_at(self, key: str) -> int | None:
        """The revision of the delete or purge marker that is the key's last, if it is."""
        try:
            last = await self.kv._js.get_last_msg(self.kv._stream, self._subject + key)
        except NotFoundError:
            return None
        operation = (last.headers or {}).get("KV-Operation")
        return last.seq if operation in ("DEL", "PURGE") and last.seq else None

    async def _write(self, key: str, value: bytes, revision: int) -> int:
        """Put ``value`` if the key's last revision is ``revision`` (0: none yet)."""
        expected = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
        return (await self._publisher.publish(self._subject + key, value, expected)).seq

    async def scan(self, as_type: type[T]) -> AsyncIterator[T]:
        """Every stored saga, latest revision each, decoded as ``as_type``.

        ``as_type`` may be a struct with a few of the saga's fields (unknown fields are
        ignored), so a listing or a sweep pays only for what it reads.
        """
        decode = msgspec.json.Decoder(as_type).decode
        async for _, value in read_bucket(self.kv):
            yield decode(value)
