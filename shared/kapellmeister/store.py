"""Saga state in the ``workflows`` KV bucket: load with revision, create, compare-and-set.

The KV revision is the workflow's lock. A writer names the revision it read
(``kv.update(key, value, last=revision)``); if another replica wrote in between, JetStream
refuses with ``KeyWrongLastSequenceError`` and the writer reloads and decides again.

The store also keeps the last state and revision this process wrote or read per
workflow, so a conductor that owns a workflow's traffic can try the CAS straight away
and skip a read; a stale entry costs one failed CAS and a reload, never a wrong write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from kapellmeister.messages import TERMINAL, Saga
from kapellmeister.publisher import Publisher

__all__ = [
    "CasConflict",
    "SagaStore",
    "Versioned",
    "drop",
    "ephemeral",
    "is_deleted",
    "read_bucket",
    "read_stream",
]

log = logging.getLogger("kapellmeister.store")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Saga).decode


class Versioned(msgspec.Struct, frozen=True):
    """A saga and the KV revision it was read at (0 means: not stored yet)."""

    state: Saga | None
    revision: int


async def ephemeral(
    js: JetStreamContext,
    stream: str,
    subjects: Sequence[str],
    *,
    deliver: DeliverPolicy = DeliverPolicy.ALL,
    start_seq: int | None = None,
    quiet_s: float = 10.0,
) -> JetStreamContext.PullSubscription:
    """An ephemeral pull consumer on ``stream`` for ``subjects`` (no acks, in memory);
    end it with `drop`."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_seq is not None else deliver,
        opt_start_seq=max(start_seq, 1) if start_seq is not None else None,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=max(60.0, quiet_s * 2),
        mem_storage=True,
        num_replicas=1,
        filter_subjects=list(subjects) if len(subjects) > 1 else None,
    )
    return await js.pull_subscribe(subjects[0], stream=stream, config=config)


async def drop(js: JetStreamContext, stream: str, sub: JetStreamContext.PullSubscription) -> None:
    """End an `ephemeral` consumer now. Not left to its inactivity timeout: a sweep or a
    listing every few seconds would pile them up."""
    with contextlib.suppress(nats.errors.Error):
        await sub.unsubscribe()
        # nats-py named the ephemeral consumer itself: no round trip to learn it.
        await js.delete_consumer(stream, sub._consumer)


async def read_stream(
    js: JetStreamContext,
    stream: str,
    subjects: Sequence[str],
    *,
    deliver: DeliverPolicy = DeliverPolicy.ALL,
    start_seq: int | None = None,
    quiet_s: float = 10.0,
    batch: int = 1000,
) -> AsyncGenerator[Msg, None]:
    """What an `ephemeral` consumer delivers, fetched ``batch`` at a time, up to the
    first message with nothing pending after it; memory stays at a batch (nats-py's KV
    watcher buffers whatever the server pushes: 150 MB at the peak for 100,000 sagas).
    Nothing to read is known from the consumer's count at once, not after a fetch's
    wait. Should the end never come (a reconnect), ``quiet_s`` without a message while
    the consumer still counts some pending ends it."""
    sub = await ephemeral(
        js, stream, subjects, deliver=deliver, start_seq=start_seq, quiet_s=quiet_s
    )
    loop = asyncio.get_running_loop()
    try:
        if (await sub.consumer_info()).num_pending == 0:
            return
        deadline = loop.time() + quiet_s
        while True:
            try:
                messages = await sub.fetch(batch, timeout=1.0)
            except nats.errors.TimeoutError:
                # Nothing came: the end, or a message removed under the read left a gap
                # the server waits out; the consumer's own count says which.
                if (await sub.consumer_info()).num_pending == 0:
                    return
                if loop.time() > deadline:
                    log.warning("reading %s: no end after %.0fs", stream, quiet_s)
                    return
                continue
            deadline = loop.time() + quiet_s
            for msg in messages:
                yield msg
                if msg.metadata.num_pending == 0:
                    return
    finally:
        await drop(js, stream, sub)


def is_deleted(msg: Msg) -> bool:
    """A KV delete or purge marker."""
    return msg.headers is not None and "KV-Operation" in msg.headers


async def read_bucket(
    kv: KeyValue, quiet_s: float = 10.0, batch: int = 1000
) -> AsyncIterator[tuple[str, bytes]]:
    """The key and latest value of every key of a bucket, ``batch`` at a time
    (`read_stream`; a key written again while it reads comes once, at the value first
    seen)."""
    prefix = f"$KV.{kv._name}."
    seen: set[str] = set()
    reading = read_stream(
        kv._js,
        kv._stream,
        [prefix + ">"],
        deliver=DeliverPolicy.LAST_PER_SUBJECT,
        quiet_s=quiet_s,
        batch=batch,
    )
    async with contextlib.aclosing(reading) as messages:
        async for msg in messages:
            key = msg.subject.removeprefix(prefix)
            if msg.data and not is_deleted(msg) and key not in seen:
                seen.add(key)
                yield key, msg.data


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
            self.forget(workflow_id)
            return Versioned(None, 0)
        versioned = Versioned(_decode(entry.value or b""), entry.revision or 0)
        if versioned.state is not None and versioned.state.status not in TERMINAL:
            self._remember(workflow_id, versioned)  # as `save` does: running ones only
        else:
            self.forget(workflow_id)  # no older running state left to decide on
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

    def subject(self, key: str) -> str:
        """The subject a saga's revisions are stored on."""
        return self._subject + key

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
