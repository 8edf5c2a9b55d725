"""Application events (the seed's business events, inside one service).

::

    events = AppEvents.from_env("shop")
    events.listen("order.placed", send_mail)               # in-process
    events.listen("order.placed", bill, durable=True)      # on EVENTS: survives a crash
    await events.start(nc)                                 # for the durable ones
    events.emit("order.placed", {"order": 7})              # returns at once

* ``emit`` never waits and never fails because of a listener: each local listener runs
  in a task of its own, so one that raises or is slow affects neither the emitter nor
  the other listeners (its error is logged with the event's name).
* Durable listeners are backed by the EVENTS stream: once started, ``emit`` also
  publishes the event on ``events.app.<event>`` (from a task; with a fresh
  ``Nats-Msg-Id``), and each durable listener is an actor (`kapellmeister.actors`) on it
  with its own durable consumer ``<event>-<service>_<listener>``: retried with backoff,
  dead-lettered after ``KAPELLMEISTER_MAX_DELIVER``, and what a crash interrupted is
  redelivered.
* Switches, read at each emit (and, for durable listeners, at each delivery): an event,
  a listener (everywhere), or an event-listener pair can each be turned off, by the
  environment (``KAPELLMEISTER_EVENTS_OFF="order.placed"``,
  ``KAPELLMEISTER_LISTENERS_OFF="send_mail"``,
  ``KAPELLMEISTER_EVENT_LISTENERS_OFF="order.placed:bill"``, comma-separated) or a YAML /
  JSON file named by ``KAPELLMEISTER_EVENTS_CONFIG`` (``{"events": {"order.placed":
  false}, "listeners": {…}, "pairs": {"order.placed:bill": false}}``).
* An event emitted with no listener (none registered, or all switched off) is logged
  once as a warning, not at every emit. Registering the same listener twice for an
  event raises `DuplicateListener` at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from kapellmeister.actors import Actors, actor
from kapellmeister.config import Settings
from kapellmeister.switches import Switches

__all__ = ["AppEvents", "DuplicateListener", "Listener", "Switches"]

log = logging.getLogger("kapellmeister.appevents")

Listener = Callable[[Any], Awaitable[None]]
_encode = msgspec.json.Encoder().encode


class DuplicateListener(ValueError):
    """The same listener registered twice for one event."""


class _Registered(msgspec.Struct, frozen=True):
    name: str
    listener: Listener
    durable: bool


class AppEvents:
    """A service's application events: its listeners, switches, and durable log."""

    def __init__(self, service: str, switches: Switches | None = None) -> None:
        self.service = service
        self.switches = switches or Switches()
        self._listeners: dict[str, list[_Registered]] = {}
        self._warned: set[str] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._js: JetStreamContext | None = None
        self._actors: Actors | None = None

    @classmethod
    def from_env(cls, service: str, environ: Mapping[str, str] | None = None) -> AppEvents:
        return cls(service, Switches.from_env(environ))

    def listen(
        self, event: str, listener: Listener, *, name: str = "", durable: bool = False
    ) -> None:
        """Register ``listener`` (named ``name``, default its ``__name__``) for ``event``.

        Raises:
            DuplicateListener: that name already listens to ``event``.
        """
        name = name or getattr(listener, "__name__", repr(listener))
        registered = self._listeners.setdefault(event, [])
        if any(r.name == name for r in registered):
            raise DuplicateListener(f"listener {name!r} is already registered for {event!r}")
        if durable:
            if self._actors is not None:
                raise RuntimeError(f"{name!r}: a durable listener is registered before start()")
            consumer = self._consumer(event, name)
            taken = {
                self._consumer(e, r.name): (e, r.name)
                for e, rs in self._listeners.items()
                for r in rs
                if r.durable
            }
            if consumer in taken:
                other = taken[consumer]
                raise DuplicateListener(f"{event!r}/{name!r} and {other} share {consumer!r}")
        registered.append(_Registered(name, listener, durable))

    def emit(self, event: str, payload: Any) -> None:
        """Hand ``payload`` to ``event``'s listeners and return at once."""
        if not self.switches.on(event):
            return
        listeners = [r for r in self._listeners.get(event, []) if self.switches.on(event, r.name)]
        if not listeners and event not in self._warned:
            self._warned.add(event)
            log.warning("%s: event %r emitted with no listener", self.service, event)
        loop = asyncio.get_running_loop()
        for registered in listeners:
            if not registered.durable:
                self._track(loop.create_task(self._call(event, registered, payload)))
        if self._js is not None:
            # Encoded now: a payload that cannot be is the emitter's bug, raised here.
            self._track(loop.create_task(self._publish(event, _encode(payload))))
        elif any(r.durable for r in listeners) and f"{event}:unstarted" not in self._warned:
            self._warned.add(f"{event}:unstarted")
            log.warning(
                "%s: event %r emitted before start(): its durable listeners miss it",
                self.service,
                event,
            )

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for the listeners and publishes running now."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)

    async def start(self, nc: Client, settings: Settings | None = None) -> None:
        """Publish emitted events on EVENTS and run the durable listeners from now on."""
        settings = settings or Settings.from_env()
        self._js = nc.jetstream()
        specs = [
            actor(
                self._consumer(event, r.name),
                f"events.app.{event}",
                self._durable_handler(event, r),
            )
            for event, registered in self._listeners.items()
            for r in registered
            if r.durable
        ]
        self._actors = Actors(f"{self.service}-events", specs, settings)
        await self._actors.start(nc)

    async def stop(self) -> None:
        await self.drain()
        if self._actors is not None:
            await self._actors.stop()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _call(self, event: str, registered: _Registered, payload: Any) -> None:
        try:
            await registered.listener(payload)
        except Exception:
            log.exception("%s: listener %r failed on %r", self.service, registered.name, event)

    def _consumer(self, event: str, listener: str) -> str:
        """A durable listener's consumer: ``<event>-<service>_<listener>``, so two
        services' listeners of one name stay apart."""
        return f"{_token(event)}-{_token(self.service)}_{_token(listener)}"

    async def _publish(self, event: str, data: bytes) -> None:
        assert self._js is not None
        try:
            await self._js.publish(
                f"events.app.{event}", data, headers={"Nats-Msg-Id": str(uuid.uuid4())}
            )
        except Exception as exc:  # a task of its own: nothing above it to catch
            log.error(
                "%s: event %r not stored for its durable listeners: %s", self.service, event, exc
            )

    def _durable_handler(
        self, event: str, registered: _Registered
    ) -> Callable[[Any], Awaitable[None]]:
        async def handle(payload: Any) -> None:
            if self.switches.on(event, registered.name):
                await registered.listener(payload)

        return handle


def _token(name: str) -> str:
    """A name as a consumer-name token: ``order.placed`` → ``order_placed``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)
