"""Processor actors (the reactive cloud actors seed): one event in, zero or more out.

An actor is a plain ``async def`` that takes one typed event and returns what it emits,
with no NATS code in it::

    class ActivityChosen(msgspec.Struct):
        user: str
        activity: str

    class Tallied(msgspec.Struct):
        user: str
        count: int

    async def tally(event: ActivityChosen) -> list[Tallied]: ...

    actor("ActivityChosen-Tally", "events.activity.chosen", tally,
          emits={Tallied: "events.activity.tallied"})

Its name, ``<EventType>-<Listener>`` (the seed's ``Event-Listener`` subscriptions), is
its durable consumer on the EVENTS stream, shared by every replica and created to
deliver the events stored from then on. The runtime does the rest:

* pull, unwrap (plain JSON or a CloudEvents envelope), validate into the input type;
* call; publish what the handler returned (a struct of a type in ``emits``, an `Emit`
  naming its subject, a list of them, or None) with ids derived from the input event's
  id, ``<event id>:<actor>:<n>``, so a redelivery publishes nothing new; then ack;
* a failure: ``TaskError(retryable=False)``, ``BadRequest`` or input that does not
  validate is a dead letter at once; anything else is retried with backoff (nak) until
  ``KAPELLMEISTER_MAX_DELIVER`` deliveries, then dead-lettered;
* tracing: the actor's span continues the event's ``traceparent``; what it emits carries
  its own.

An actor may listen to compensation events as to any other (``events.payment.failed``):
undoing is one more event in. Scatter-gather, with state shared by many actors, is
`kapellmeister.gather`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import re
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.service import Service
from opentelemetry.trace import SpanKind

from kapellmeister import tracing
from kapellmeister.config import Settings
from kapellmeister.consumer import PullWorker
from kapellmeister.deadletter import dead_letter
from kapellmeister.definitions import TRIGGER_PATTERN
from kapellmeister.errors import BadRequest, TaskError
from kapellmeister.micro import stop_service
from kapellmeister.runtime import connect, disconnect, run_service
from kapellmeister.switches import Switches
from kapellmeister.topology import EVENTS, ensure_buckets, ensure_consumer, ensure_streams
from kapellmeister.triggers import unwrap

__all__ = [
    "ActorContext",
    "ActorSpec",
    "Actors",
    "Emit",
    "UnknownOutput",
    "actor",
    "run_actors",
]

log = logging.getLogger("kapellmeister.actors")

NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9_]+-[A-Za-z0-9_]+$")
_BACKOFF_S: Final = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_encode = msgspec.json.Encoder().encode


class Emit(msgspec.Struct, frozen=True):
    """An event to publish on ``subject`` (``events.…``) with ``data``."""

    subject: str
    data: Any


class UnknownOutput(Exception):
    """A handler returned something its actor has no subject for (a bug: not retried)."""


class ActorContext:
    """What a handler may ask of the runtime, as an optional second parameter: the
    event's id, and KV buckets for the state actors share (created if missing)."""

    def __init__(
        self,
        js: JetStreamContext,
        event_id: str,
        buckets: dict[str, KeyValue],
        replicas: int = 1,
    ) -> None:
        self.event_id = event_id
        self._js = js
        self._buckets = buckets
        self._replicas = replicas

    async def bucket(self, name: str) -> KeyValue:
        if name not in self._buckets:
            try:
                self._buckets[name] = await self._js.key_value(name)
            except BucketNotFoundError:
                self._buckets[name] = await self._js.create_key_value(
                    KeyValueConfig(
                        bucket=name,
                        history=1,
                        storage=StorageType.FILE,
                        replicas=self._replicas,
                    )
                )
        return self._buckets[name]


Out = msgspec.Struct | Emit
Returned = Out | Sequence[Out] | None


class ActorSpec:
    """A handler bound to its name, the subject it listens on and what it emits."""

    def __init__(
        self,
        name: str,
        subject: str,
        handler: Callable[..., Awaitable[Returned]],
        emits: Mapping[type[msgspec.Struct], str] | None = None,
    ) -> None:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"an actor is named <EventType>-<Listener>, not {name!r}")
        if not re.match(TRIGGER_PATTERN, subject):
            raise ValueError(f"an actor listens on events.…, not {subject!r}")
        params = list(inspect.signature(handler).parameters)
        hints = typing.get_type_hints(handler)
        if len(params) not in (1, 2) or params[0] not in hints:
            raise TypeError(
                f"{name}: the handler must be `async def h(event: In[, ctx: ActorContext])`"
            )
        self.wants_context = len(params) == 2
        self.name, self.subject, self.handler = name, subject, handler
        self.input_type: type[Any] = hints[params[0]]
        self.emits = dict(emits or {})

    def outputs(self, returned: Returned) -> list[tuple[str, bytes]]:
        """(subject, encoded data) of each event ``returned`` names, in order."""
        items: Sequence[Out] = (
            [] if returned is None else [returned] if isinstance(returned, Out) else returned
        )
        found = []
        for item in items:
            if isinstance(item, Emit):
                found.append((item.subject, _encode(item.data)))
            elif type(item) in self.emits:
                found.append((self.emits[type(item)], _encode(item)))
            else:
                raise UnknownOutput(f"{self.name}: no subject for a {type(item).__name__}")
        return found


def actor(
    name: str,
    subject: str,
    handler: Callable[..., Awaitable[Returned]],
    *,
    emits: Mapping[type[msgspec.Struct], str] | None = None,
) -> ActorSpec:
    """Declare an actor: ``<EventType>-<Listener>`` on ``subject``, emitting ``emits``."""
    return ActorSpec(name, subject, handler, emits)


class Actors:
    """Runs a service's actors: one durable consumer and pull loop each."""

    def __init__(
        self,
        name: str,
        specs: Sequence[ActorSpec],
        settings: Settings,
        switches: Switches | None = None,
    ) -> None:
        self.name, self.settings = name, settings
        switches = switches or Switches()
        # <EventType>-<Listener>: switched off by its event, its listener or the pair.
        self.specs = [s for s in specs if switches.on(*s.name.split("-", 1))]
        self.switched_off = [s.name for s in specs if s not in self.specs]
        self._js: JetStreamContext | None = None
        self._workers: list[PullWorker] = []
        self._service: Service | None = None
        self._buckets: dict[str, KeyValue] = {}

    async def start(self, nc: Client) -> None:
        self._js = nc.jetstream()
        await ensure_streams(self._js, self.settings.replicas)
        await ensure_buckets(self._js, self.settings.replicas)
        for spec in self.specs:
            durable = await ensure_consumer(
                self._js,
                EVENTS,
                spec.subject,
                ack_wait_s=self.settings.ack_wait_s,
                max_deliver=self.settings.max_deliver,
                durable=spec.name,
                new_only=True,
            )
            worker = PullWorker(
                spec.name,
                nc,
                EVENTS,
                durable,
                functools.partial(self._run, spec),
                self.settings.concurrency,
            )
            await worker.start()
            self._workers.append(worker)
        # A NATS micro service of its own: `nats micro ping <name>` finds the process.
        self._service = await add_service(
            nc, name=self.name, version="0.1.0", description="kapellmeister actors"
        )
        log.info("%s: actors %s", self.name, ", ".join(s.name for s in self.specs) or "none")
        if self.switched_off:
            log.info("%s: switched off: %s", self.name, ", ".join(self.switched_off))

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop(self.settings.ack_wait_s) for w in self._workers))
        if self._service is not None:
            await stop_service(self._service)

    async def _run(self, spec: ActorSpec, msg: Msg) -> None:
        assert self._js is not None
        try:
            event = unwrap(msg.subject, msg.headers, msg.data, msg.metadata.sequence.stream)
            typed = msgspec.convert(event.data, spec.input_type)
        except (ValueError, msgspec.ValidationError) as exc:
            await dead_letter(self._js, msg, spec.name, f"not a {spec.input_type.__name__}: {exc}")
            return

        def attributes() -> dict[str, str | int]:
            return {
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.operation.type": "process",
                "messaging.consumer.group.name": spec.name,
                "messaging.message.id": event.id,
            }

        # An event a workflow published names it: the actor's step joins its logs.
        workflow_id = event.data.get("workflow_id") if isinstance(event.data, dict) else None
        about = {"workflow.id": workflow_id} if isinstance(workflow_id, str) else {}
        name = f"process {spec.subject}"
        with tracing.span(name, SpanKind.CONSUMER, msg.headers, about, attributes) as trace:
            try:
                context = ActorContext(self._js, event.id, self._buckets, self.settings.replicas)
                call = spec.handler(typed, context) if spec.wants_context else spec.handler(typed)
                outputs = spec.outputs(await self._heartbeating(call, msg))
                # Ids from the input's (a digest once long, so a chain's ids stay short):
                # a redelivery publishes the same ids again, and JetStream drops them.
                base = event.id if len(event.id) <= 64 else _digest(event.id)
                for n, (subject, data) in enumerate(outputs):
                    msg_id = f"{base}:{spec.name}:{n}"
                    with tracing.producer(subject, subject, trace, lambda: about) as sent:
                        await self._js.publish(
                            subject, data, headers={**sent, "Nats-Msg-Id": msg_id}
                        )
            except Exception as exc:  # the handler's, or a publish that did not land
                tracing.record_error(exc)
                await self._failed(spec, msg, exc)
                return
        await msg.ack()

    async def _heartbeating(self, call: Awaitable[Returned], msg: Msg) -> Returned:
        """Await the handler, telling JetStream it is alive every third of the ack wait
        (else a long handler is redelivered and runs twice at once)."""
        running = asyncio.ensure_future(call)
        while True:
            done, _ = await asyncio.wait({running}, timeout=self.settings.ack_wait_s / 3)
            if done:
                return running.result()
            try:
                await msg.in_progress()
            except nats.errors.Error as exc:
                log.warning("in-progress ack not sent: %s", exc)

    async def _failed(self, spec: ActorSpec, msg: Msg, exc: Exception) -> None:
        assert self._js is not None
        deliveries = msg.metadata.num_delivered
        terminal = isinstance(exc, BadRequest | UnknownOutput) or (
            isinstance(exc, TaskError) and not exc.retryable
        )
        if terminal or deliveries >= self.settings.max_deliver:
            reason = f"gave up after {deliveries} deliveries: {exc!r}"
            await dead_letter(self._js, msg, spec.name, reason)
            return
        delay = _BACKOFF_S[min(deliveries, len(_BACKOFF_S)) - 1]
        log.warning(
            "%s failed (delivery %d), retry in %.0fs: %r", spec.name, deliveries, delay, exc
        )
        await msg.nak(delay=delay)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def run_actors(name: str, specs: Sequence[ActorSpec]) -> None:
    """The ``__main__`` of an actor service: run ``specs`` until a signal."""

    async def main(settings: Settings, stop: asyncio.Event) -> None:
        nc = await connect(settings, name)
        actors = Actors(name, specs, settings, Switches.from_env())
        await actors.start(nc)
        await stop.wait()
        await actors.stop()
        await disconnect(nc)

    run_service(name, main)
