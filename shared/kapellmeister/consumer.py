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
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kapellmeister.metrics import metrics

__all__ = ["MessageHandler", "PullWorker", "running_workers"]

log = logging.getLogger("kapellmeister.consumer")

MessageHandler = Callable[[Msg], Awaitable[None]]

# The workers started and not stopped in this process: what /readyz checks.
_running: set[PullWorker] = set()


def running_workers() -> list[PullWorker]:
    """The pull workers running in this process, by stream and consumer."""
    return sorted(_running, key=lambda w: (w.stream, w.durable))


class PullWorker:
    """Pull from a durable consumer and run ``handle`` on each message, ``limit`` at a time.

    Flow control by credit: one pull request asks for every free slot (when a quarter of
    them are free, or nothing is outstanding), and the server sends each message as soon
    as it is stored; there is no round trip per batch and no wait for a batch to fill.
    """

    def __init__(
        self,
        name: str,
        nc: Client,
        stream: str,
        durable: str,
        handle: MessageHandler,
        limit: int,
        expires_s: float = 5.0,
    ) -> None:
        self.name = name
        self.durable = durable
        self.stream = stream
        self._nc = nc
        self._stream = stream
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._handle = handle
        self._limit = max(1, limit)
        self._expires_s = expires_s
        self._requested = 0
        self._running: set[asyncio.Task[None]] = set()
        self._delivered = 0
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._metrics = metrics()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        await self._top_up(force=True)
        self._keeper = asyncio.create_task(self._keep_alive(), name=f"pull {self.name}")
        _running.add(self)

    async def stop(self, grace_s: float) -> None:
        """Stop pulling; give handlers in flight ``grace_s`` seconds to finish."""
        _running.discard(self)
        if self._sub is not None:
            # Messages already sent to us but not started are redelivered after the ack wait.
            await self._sub.unsubscribe()
            self._sub = None
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._running:
            await asyncio.wait(self._running, timeout=grace_s)

    async def bound(self, timeout: float) -> str:
        """What /readyz says of this consumer: bound, or what is wrong."""
        if not self._nc.is_connected:
            return "NATS disconnected"
        try:
            await self._nc.jetstream(timeout=timeout).consumer_info(self._stream, self.durable)
        except nats.js.errors.NotFoundError:
            return "consumer missing"
        except (TimeoutError, nats.errors.Error) as exc:
            return f"not answered: {exc!r}"
        return "bound"

    async def _keep_alive(self) -> None:
        # Pull requests lost to a reconnect (a server restart forgets them, and the 408s
        # that would say so never come) must not stall the loop for ever: with nothing
        # delivered for a whole expiry, every request made before it has ended, whatever
        # the handlers still running are doing.
        while True:
            delivered, reconnects = self._delivered, self._nc.stats["reconnects"]
            await asyncio.sleep(self._expires_s * 1.5)
            # A reconnect (a server restart, say) loses every pull request made before it.
            if self._delivered == delivered or self._nc.stats["reconnects"] != reconnects:
                self._requested = 0
            try:
                await self._top_up(force=True)
            except Exception:
                log.exception("%s: pull request failed; trying again", self.name)

    async def _top_up(self, force: bool = False) -> None:
        if self._sub is None:
            return
        free = self._limit - len(self._running) - self._requested
        if free <= 0 or not (force or self._requested == 0 or free * 4 >= self._limit):
            return
        self._requested += free
        request = b'{"batch":%d,"expires":%d}' % (free, int(self._expires_s * 1e9))
        try:
            await self._nc.publish(self._next, request, reply=self._inbox)
        except nats.errors.Error as exc:
            self._requested -= free
            log.warning("%s: pull request failed (%s); retrying", self.name, exc)

    async def _on_msg(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        if status is not None and not msg.data:
            # 408 expired, 409 limits, 404 nothing: the request ended; what it did not
            # deliver is free again.
            pending = int((msg.headers or {}).get("Nats-Pending-Messages", "0") or 0)
            self._requested = max(0, self._requested - pending)
            if status != "408" or pending:
                await self._top_up()
            return
        self._requested = max(0, self._requested - 1)
        self._delivered += 1
        # Parsing the metadata from the reply subject costs; without a meter it counts nothing.
        if self._metrics.enabled and msg.metadata.num_delivered > 1:
            self._metrics.redeliveries.add(1, {"messaging.destination.name": self._stream})
        running = asyncio.create_task(self._run(msg))
        self._running.add(running)
        running.add_done_callback(self._running.discard)

    async def _run(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except Exception:
            log.exception("%s: handler failed on %s; will be redelivered", self.name, msg.subject)
        finally:
            # Free the slot before asking for more (the done callback comes later).
            self._running.discard(asyncio.current_task())
            await self._top_up()
