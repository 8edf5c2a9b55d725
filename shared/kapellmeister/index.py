"""The workflow index: what ``conductor.list`` and the sweeper read instead of every saga.

A KV bucket, ``workflow_index``, beside ``workflows``. Its keys carry a workflow's status
and name, so a reader gives JetStream a subject filter and gets only what matches:

    s.<status>.<workflow>.<workflow_id>   one per workflow: its summary (`IndexEntry`)
    u.<workflow_id>                       a finished workflow whose last commands are not
                                          marked published yet (the sweeper looks at it)

The saga is the truth and the index follows it, a moment later. After each saga write
the conductor notes the change (`note`); a flusher writes the notes every ``flush_s``
and removes the keys of the state before (a workflow that starts and ends within one
flush costs one index write; one whose status does not change costs none). A note lost
with a crashed process, or two replicas' flushes crossing, leave the index behind, so
no reader trusts it alone: ``list`` re-reads the saga of every row it returns and mends
what differs, the sweeper loads each workflow it looks at, and `reconcile` rebuilds the
index from the sagas when a conductor starts and every ``reconcile_s`` after.

Newest first: ``list`` reads the bucket's stream backwards, a window of sequences at a
time, each window a filtered read (JetStream sends only matching keys), until it has
``limit`` rows. Its cost follows the rows asked for, not the workflows stored. "Newest"
is the order the index was written in: each workflow's last change of status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Final, NamedTuple

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from kapellmeister.messages import TERMINAL, Saga, WorkflowSummary
from kapellmeister.publisher import Publisher
from kapellmeister.store import drop, ephemeral, is_deleted, read_bucket, read_stream

__all__ = ["INDEX", "IndexEntry", "WorkflowIndex", "decode_entry"]

log = logging.getLogger("kapellmeister.index")

INDEX: Final = "workflow_index"
# A removed key leaves a purge marker that goes a second later (the least a TTL can
# be): markers match the readers' filters, and a bucket full of them would be read.
_MARKER_TTL_S: Final = 1
# Index writes sent at once, at most (each chunk waits for its acks).
_CHUNK: Final = 2_000
# A removed key: a purge marker that goes by itself.
_REMOVE: Final = {"KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-TTL": str(_MARKER_TTL_S)}
# How long a new workflow's first index write waits for it to end (seconds).
_NEW_HOLD_S: Final = 1.0
# Statuses the sweeper looks at.
_ACTIVE: Final = ("QUEUED", "RUNNING", "PAUSED")


class IndexEntry(WorkflowSummary, frozen=True, omit_defaults=True):
    """An index value: a workflow's summary, and its `unpublished` mark if finished.

    Decodes a saga too (its other fields are ignored), so a check costs one decode."""

    unpublished: str = ""

    def summary(self) -> WorkflowSummary:
        """The summary alone, as `conductor.list` replies (no `unpublished`)."""
        fields = msgspec.structs.asdict(self)
        del fields["unpublished"]
        return WorkflowSummary(**fields)


_encode = msgspec.json.Encoder().encode
decode_entry = msgspec.json.Decoder(IndexEntry).decode


def entry_of(state: Saga) -> IndexEntry:
    return IndexEntry(
        workflow_id=state.workflow_id,
        workflow=state.workflow,
        version=state.version,
        status=state.status,
        tenant=state.tenant,
        created_at=state.created_at,
        updated_at=state.updated_at,
        unpublished=state.unpublished if state.status in TERMINAL else "",
    )


def keys_of(entry: IndexEntry | None) -> frozenset[str]:
    """The keys the index holds for a workflow in this state."""
    if entry is None:
        return frozenset()
    main = f"s.{entry.status}.{entry.workflow}.{entry.workflow_id}"
    if entry.unpublished:
        return frozenset((main, f"u.{entry.workflow_id}"))
    return frozenset((main,))


class _Note(NamedTuple):
    before: frozenset[str]  # keys the index may hold for the workflow now
    after: IndexEntry | None  # what it should hold (None: nothing, the saga is gone)
    due: float = 0.0  # not written before this (loop time)
    again: bool = False  # a failed write: put every key of ``after``, held or not


class WorkflowIndex:
    """The ``workflow_index`` bucket, written a moment after the sagas it follows."""

    def __init__(
        self,
        kv: KeyValue,
        workflows: KeyValue,
        publisher: Publisher,
        *,
        flush_s: float = 0.25,
    ) -> None:
        self.kv = kv
        self._workflows = workflows
        self._publisher = publisher
        self._js: JetStreamContext = kv._js
        self._stream = kv._stream
        self._prefix = f"$KV.{kv._name}."
        self._flush_s = flush_s
        self._notes: dict[str, _Note] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self.entries_read = 0  # index entries delivered to this process, for tests

    # --- writing --------------------------------------------------------------------------------

    def note(self, before: Saga | IndexEntry | None, after: Saga | IndexEntry | None) -> None:
        """A saga went from ``before`` to ``after`` (None: not stored); flushed soon."""
        either = after if after is not None else before
        if either is None:
            return
        workflow_id = either.workflow_id
        old = self._notes.get(workflow_id)
        if old is None:
            was = before if before is None or isinstance(before, IndexEntry) else entry_of(before)
            old_keys = keys_of(was)
        else:
            old_keys = old.before
        now = after if after is None or isinstance(after, IndexEntry) else entry_of(after)
        # A new workflow's first key waits a moment: most end soon, and then one write
        # (its last status) does for both.
        due = old.due if old is not None else 0.0
        if old is None and before is None and now is not None and not now.unpublished:
            due = asyncio.get_running_loop().time() + _NEW_HOLD_S
        again = old is not None and old.again
        self._notes[workflow_id] = _Note(old_keys, now, due, again)

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_forever(), name="index flusher")

    async def stop(self) -> None:
        """Stop the flusher and write what is noted (a crash would leave it to `reconcile`)."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await self.flush(held=False)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            try:
                await self.flush()
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("index not written this time: %r", exc)

    async def flush(self, *, held: bool = True) -> None:
        """Write the notes that are due (``held=False``: all): the keys of the state
        after, and no key of the state before."""
        async with self._flushing:  # one flush at a time: a later one never lands first
            if held:
                now = asyncio.get_running_loop().time()
                notes = {k: n for k, n in self._notes.items() if n.due <= now}
                for workflow_id in notes:
                    del self._notes[workflow_id]
            else:
                notes, self._notes = self._notes, {}
            messages: list[tuple[str, bytes, dict[str, str] | None]] = []
            owners: list[str] = []  # the workflow of each message
            for workflow_id, note in notes.items():
                after = keys_of(note.after)
                if after == note.before and not note.again:
                    continue
                value = _encode(note.after) if note.after is not None else b""
                for key in after if note.again else after - note.before:
                    messages.append((self._prefix + key, value, None))
                    owners.append(workflow_id)
                for key in note.before - after:
                    messages.append((self._prefix + key, b"", _REMOVE))
                    owners.append(workflow_id)
            failed: set[str] = set()
            try:
                for i in range(0, len(messages), _CHUNK):  # a reconcile may mend 100,000
                    chunk = messages[i : i + _CHUNK]
                    outcomes = await self._publisher.publish_all(chunk)
                    failed.update(
                        w
                        for w, o in zip(owners[i : i + _CHUNK], outcomes, strict=True)
                        if isinstance(o, Exception)
                    )
            except BaseException:  # NATS away, stopped, cancelled: none of it is lost
                failed = set(notes)
                raise
            finally:
                self._renote(notes, failed)
            if failed:
                raise nats.errors.Error(f"index writes of {len(failed)} workflows failed")

    def _renote(self, notes: dict[str, _Note], failed: set[str]) -> None:
        """Note again what a flush failed to write: whatever of it may have landed counts
        as held, and a change noted since stays the one to write."""
        for workflow_id in failed:
            note, newer = notes[workflow_id], self._notes.get(workflow_id)
            maybe = note.before | keys_of(note.after)
            if newer is not None:
                maybe |= newer.before
            latest = newer.after if newer is not None else note.after
            self._notes[workflow_id] = _Note(maybe, latest, again=True)

    # --- reading --------------------------------------------------------------------------------

    async def _count(self, filters: Iterable[str]) -> int:
        """How many entries match ``filters`` (purge markers included)."""
        sub = await ephemeral(self._js, self._stream, [self._prefix + f for f in filters])
        try:
            return (await sub.consumer_info()).num_pending or 0
        finally:
            await drop(self._js, self._stream, sub)

    async def _read(
        self, filters: Iterable[str], start: int = 1, end: int | None = None
    ) -> AsyncIterator[tuple[int, str, IndexEntry]]:
        """``(sequence, key, entry)`` of the keys matching ``filters``, in stream order,
        from sequence ``start`` to ``end`` (default: the last now)."""
        subjects = [self._prefix + f for f in filters]
        reading = read_stream(self._js, self._stream, subjects, start_seq=start)
        async with contextlib.aclosing(reading) as messages:
            async for msg in messages:
                seq = msg.metadata.sequence.stream
                if end is not None and seq > end:
                    return
                self.entries_read += 1
                if msg.data and not is_deleted(msg):
                    yield seq, msg.subject.removeprefix(self._prefix), decode_entry(msg.data)

    async def newest(
        self,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[WorkflowSummary]:
        """Up to ``limit`` workflows, newest first, each as its saga says now. What this
        process noted is written first (another replica's notes are ``flush_s`` away).

        The stream is read backwards in windows sized from how many keys match, so a
        window holds about twice ``limit`` of them however rare they are; each row is
        checked against its saga, and only as many as are still needed. ``tenant`` and
        the creation range (``since`` inclusive, ``until`` exclusive, as UTC text) never
        change for a workflow, so they are tested on the index's own row before its saga
        is read; a rare tenant costs more windows, each twice the last."""

        def keeps(entry: IndexEntry) -> bool:
            return (
                (tenant is None or entry.tenant == tenant)
                and (since is None or entry.created_at >= since)
                and (until is None or entry.created_at < until)
            )

        await self.flush(held=False)
        pattern = f"s.{status or '*'}.{'*' if workflow is None else workflow}.*"
        state = (await self._js.stream_info(self._stream)).state
        first, end = state.first_seq, state.last_seq
        matching = await self._count([pattern]) if end >= first and end > 0 else 0
        if matching == 0:
            return []
        window = max(4 * limit, 256, 2 * limit * (end - first + 1) // matching)
        found: list[WorkflowSummary] = []
        seen: set[str] = set()
        while len(found) < limit and end >= first:
            start = max(first, end - window + 1)
            rows = [row async for row in self._read([pattern], start, end)]
            rows.reverse()  # newest first
            candidates = [
                (key, entry)
                for _, key, entry in rows
                if entry.workflow_id not in seen and keeps(entry)
            ]
            seen.update(entry.workflow_id for _, entry in candidates)
            while candidates and len(found) < limit:
                wanted = limit - len(found)
                batch, candidates = candidates[:wanted], candidates[wanted:]
                for entry in await self._checked(batch):
                    if (status is None or entry.status == status) and (
                        workflow is None or entry.workflow == workflow
                    ):
                        found.append(entry.summary())
            end, window = start - 1, window * 2
        return found

    async def _checked(self, rows: list[tuple[str, IndexEntry]]) -> list[IndexEntry]:
        """Each row as its saga says now (gone: dropped); a row that differs is mended."""
        sagas = await asyncio.gather(*(self._saga(entry.workflow_id) for _, entry in rows))
        checked: list[IndexEntry] = []
        for (key, entry), saga in zip(rows, sagas, strict=True):
            if saga is None or key not in keys_of(saga):
                self._mend({entry.workflow_id: frozenset((key,))}, {entry.workflow_id: saga})
            if saga is not None:
                checked.append(saga)
        return checked

    async def _saga(self, workflow_id: str) -> IndexEntry | None:
        try:
            got = await self._workflows.get(workflow_id)
        except KeyNotFoundError:
            return None
        return decode_entry(got.value) if got.value else None

    async def active(self) -> list[IndexEntry]:
        """The workflows the sweeper looks at: running, paused, or finished with commands
        not marked published (as the index says; the sweeper loads each)."""
        await self.flush(held=False)
        filters = [f"s.{status}.>" for status in _ACTIVE] + ["u.>"]
        found: dict[str, IndexEntry] = {}
        async for _, _, entry in self._read(filters):
            found[entry.workflow_id] = entry
        return list(found.values())

    async def finished(self, workflow: str, cutoff: str) -> list[IndexEntry]:
        """Finished workflows of ``workflow`` last written at or before ``cutoff``,
        oldest first: the index is read from its start and no further than the first
        newer one (so a sweep reads what it may expire, and one more)."""
        filters = [f"s.{status}.{workflow}.*" for status in sorted(TERMINAL)]
        found: list[IndexEntry] = []
        async for _, _, entry in self._read(filters):
            if entry.updated_at > cutoff:
                break
            found.append(entry)
        return found

    # --- repair ---------------------------------------------------------------------------------

    async def reconcile(self) -> int:
        """Make the index say what the sagas say; how many workflows it mended."""
        held: dict[str, set[str]] = {}
        async for key, _ in read_bucket(self.kv):
            held.setdefault(key.rpartition(".")[2], set()).add(key)
        wrong: dict[str, frozenset[str]] = {}
        async for workflow_id, value in read_bucket(self._workflows):
            keys = frozenset(held.pop(workflow_id, ()))
            if keys != keys_of(decode_entry(value)):
                wrong[workflow_id] = keys
        # What is left are index keys of sagas no longer stored.
        wrong.update((workflow_id, frozenset(keys)) for workflow_id, keys in held.items())
        ids = list(wrong)
        for i in range(0, len(ids), 256):  # each read again: it may have moved meanwhile
            batch = ids[i : i + 256]
            sagas = await asyncio.gather(*(self._saga(workflow_id) for workflow_id in batch))
            self._mend({w: wrong[w] for w in batch}, dict(zip(batch, sagas, strict=True)))
        if wrong:
            log.info("index: mended %d workflows", len(wrong))
            await self.flush(held=False)
        return len(wrong)

    def _mend(self, held: dict[str, frozenset[str]], sagas: dict[str, IndexEntry | None]) -> None:
        """Note that the index holds ``held`` keys for these workflows, whose sagas are
        ``sagas`` (a change noted since stays the one to write)."""
        for workflow_id, keys in held.items():
            note = self._notes.get(workflow_id)
            before = keys | (note.before if note is not None else frozenset())
            after = note.after if note is not None else sagas[workflow_id]
            self._notes[workflow_id] = _Note(before, after, again=note is not None and note.again)
