"""A pull loop over a durable JetStream consumer with a bound on messages in flight.

Agents and the conductor both pull in batches (one request per batch, not per message)
and handle each message in its own task, so one slow message never holds up the rest,
while at most ``limit`` are in flight per process. The handler owns ack/nak/term.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

__all__ = ["MessageHandler", "PullWorker"]

log = logging.getLogger("kapellmeister.consumer")

MessageHandler = Callable[[Msg], Awaitable[None]]


class PullWorker:
    """Fetch from ``sub`` and run ``handle`` on each message, ``limit`` at a time at most."""

    def __init__(
        self, name: str, sub: JetStreamContext.PullSubscription, handle: MessageHandler, limit: int
    ) -> None:
        self.name = name
        self._sub = sub
        self._handle = handle
        self._limit = max(1, limit)
        self._free = asyncio.Semaphore(self._limit)
        self._running: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._pull(), name=f"pull {self.name}")

    async def stop(self, grace_s: float) -> None:
        """Stop fetching; give handlers in flight ``grace_s`` seconds to finish."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        if self._running:
            await asyncio.wait(self._running, timeout=grace_s)
        # Messages a cancelled fetch left in the inbox are never handled; unsubscribing
        # lets a later drain finish (they are redelivered after the ack wait).
        await self._sub.unsubscribe()

    async def _pull(self) -> None:
        while True:
            await self._free.acquire()
            # One slot is ours; take every other free one too and ask for that many.
            batch = 1
            while batch < self._limit and not self._free.locked():
                await self._free.acquire()
                batch += 1
            try:
                messages = await self._sub.fetch(batch, timeout=5.0)
            except (TimeoutError, nats.errors.TimeoutError):
                messages = []
            except nats.errors.Error as exc:
                log.warning("%s: fetch failed (%s); retrying", self.name, exc)
                messages = []
                await asyncio.sleep(1.0)
            for _ in range(batch - len(messages)):
                self._free.release()
            for msg in messages:
                running = asyncio.create_task(self._run(msg))
                self._running.add(running)
                running.add_done_callback(self._running.discard)

    async def _run(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except Exception:
            log.exception("%s: handler failed on %s; will be redelivered", self.name, msg.subject)
        finally:
            self._free.release()
