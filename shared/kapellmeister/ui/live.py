"""The web UI's live updates: Server-Sent Events fed by NATS.

- A workflow page follows its saga by a KV watch on its key in the ``workflows`` bucket:
  every write, in revision order, becomes one ``saga`` event at once, unless it comes
  within `COALESCE_S` of the last one sent: then the writes of that burst become one,
  with the newest state.
- The list pages share one subscription to the ``workflow_index`` bucket's subjects
  (`Changes`), and each distinct filter one `Feed`: when the index changes it asks
  ``conductor.list`` again, at most every `LIST_EVERY_S`, and sends the rows to every page
  showing that filter. So N open pages cost one subscription and one query per filter,
  not N of each.

Every event's data is JSON (no line breaks for a forged event to hide in), and every
stream ends when the UI stops (`Streams.stop`), so a shutdown does not wait on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

__all__ = ["COALESCE_S", "LIST_EVERY_S", "Changes", "Feed", "Streams", "sse"]

# The list is redrawn at most this often while the index changes (seconds).
LIST_EVERY_S = 0.5
# Saga writes closer together than this reach a page as one update.
COALESCE_S = 0.1
# A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0
# A page's KV watch consumer is removed by the server this long after the page is gone,
# should the UI not get to delete it (the client user may not delete consumers).
WATCH_INACTIVE_S = 30.0

_encode = msgspec.json.Encoder().encode
log = logging.getLogger(__name__)


def sse(event: str, data: Any) -> str:
    """One event, its data as JSON: a single line, whatever the text inside."""
    return f"event: {event}\ndata: {_encode(data).decode()}\n\n"


class Changes:
    """A count of messages on ``subject``, subscribed while someone waits on it."""

    def __init__(self, nc: Callable[[], Client], subject: str) -> None:
        self._nc = nc
        self.subject = subject
        self.generation = 0
        self._changed = asyncio.Event()
        self._users = 0
        self._subscription: Subscription | None = None

    async def _note(self, msg: Msg) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def subscribed(self) -> bool:
        return self._subscription is not None

    async def acquire(self) -> None:
        self._users += 1
        if self._subscription is None:
            self._subscription = await self._nc().subscribe(self.subject, cb=self._note)

    async def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    async def after(self, seen: int) -> int:
        """The generation, once it is past ``seen``."""
        while self.generation <= seen:
            await self._changed.wait()
        return self.generation


class Feed:
    """One filter's rows, asked again when `Changes` moves and sent to every listener."""

    def __init__(self, changes: Changes, produce: Callable[[], Awaitable[str]]) -> None:
        self.changes = changes
        self.produce = produce
        self.listeners: set[asyncio.Queue[str]] = set()
        self._task: asyncio.Task[None] | None = None

    async def add(self) -> asyncio.Queue[str]:
        listener: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        self.listeners.add(listener)
        if self._task is None:
            await self.changes.acquire()
            self._task = asyncio.create_task(self._run())
        return listener

    async def remove(self, listener: asyncio.Queue[str]) -> bool:
        """Drop ``listener``; whether the feed has none left (and has stopped)."""
        self.listeners.discard(listener)
        if self.listeners or self._task is None:
            return not self.listeners
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.changes.release()
        return True

    async def _run(self) -> None:
        seen = self.changes.generation
        while True:
            await self.changes.after(seen)
            await asyncio.sleep(LIST_EVERY_S)
            seen = self.changes.generation
            try:
                event = await self.produce()
            except Exception as exc:  # the feed must outlive one bad query
                log.exception("the list's rows failed")
                event = sse("failure", f"the list could not be read: {exc}")
            for listener in self.listeners:
                # Only the newest rows matter to a page that has not read the last ones.
                if listener.full():
                    listener.get_nowait()
                listener.put_nowait(event)


class Streams:
    """Every open stream of one UI process: the shared feeds and the stop signal."""

    def __init__(self, nc: Callable[[], Client], index_subject: str) -> None:
        self._nc = nc
        self.changes = Changes(nc, index_subject)
        self.feeds: dict[str, Feed] = {}
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        """End every stream (a shutdown need not wait on open pages)."""
        self.stopping.set()

    async def _until_stopped(self, awaitable: Awaitable[Any], timeout: float) -> Any:
        """What ``awaitable`` gives, or None on a stop; TimeoutError after ``timeout``."""
        waiting = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {waiting, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for pending in (waiting, stopped):
                pending.cancel()
        if waiting in done:
            return waiting.result()
        if stopped in done:
            return None
        raise TimeoutError

    async def rows(
        self, key: str, produce: Callable[[], Awaitable[str]]
    ) -> AsyncGenerator[str, None]:
        """The list events of one filter (``key``), until the page goes or the UI stops."""
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = Feed(self.changes, produce)
        listener = await feed.add()
        try:
            yield ": live\n\n"
            while not self.stopping.is_set():
                try:
                    event = await self._until_stopped(listener.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if event is not None:
                    yield event
        finally:
            if await feed.remove(listener) and self.feeds.get(key) is feed:
                del self.feeds[key]

    async def saga(
        self, workflow_id: str, bucket: str, render: Callable[[bytes], Awaitable[str]]
    ) -> AsyncGenerator[str, None]:
        """A workflow page's events: each write of its saga, rendered by ``render``."""
        try:
            kv = await self._nc().jetstream().key_value(bucket)
        except BucketNotFoundError:
            yield sse("failure", f"no {bucket} bucket")
            return
        watcher = await kv.watch(workflow_id, inactive_threshold=WATCH_INACTIVE_S)
        loop = asyncio.get_running_loop()
        sent = 0.0
        try:
            yield ": live\n\n"
            while not self.stopping.is_set():
                try:
                    entry = await self._until_stopped(watcher.updates(KEEPALIVE_S), KEEPALIVE_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    yield ": keepalive\n\n"
                    continue
                if entry is None:
                    continue  # the end of the initial value (or a stop): what follows is news
                if loop.time() - sent < COALESCE_S:  # a burst: its newest state only
                    entry = await _newest(watcher, entry)
                if not entry.value:
                    yield sse("failure", f"workflow {workflow_id} was removed")
                    continue
                yield await render(entry.value)
                sent = loop.time()
        finally:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await watcher.stop()


async def _newest(watcher: KeyValue.KeyWatcher, entry: KeyValue.Entry) -> KeyValue.Entry:
    """``entry``, or a later one that came within `COALESCE_S` of the one before (for
    at most ten of them, so a saga written without pause still reaches the page)."""
    for _ in range(10):
        try:
            later = await watcher.updates(COALESCE_S)
        except nats.errors.TimeoutError:
            break
        if later is not None:
            entry = later
    return entry
