"""The ceiling: plan_day as a minimal hand-written JetStream loop, no framework.

``python bench/ceiling.py --role conductor|agenda|weather --nats-url URL`` runs one
process of the comparison that ``bench/plan_day.py`` drives; each role is its own
process, as kapellmeister's services are. Everything lives under its own names (streams
``CEIL_TASKS``, ``CEIL_RESULTS``, ``CEIL_EVENTS``, bucket ``ceil_workflows``, subjects
``ceil.*``) so it never touches kapellmeister's ``TASKS``/``RESULTS``/``workflows``.

The work per workflow is plan_day's, with the same JetStream costs:

* start (a core request ``ceil.start.plan_day``, answered by the conductor):
  ``kv.create`` of the state, publish the ``agenda.activity`` task, reply;
* agenda/weather: pull the task, run the very same handler
  (``services.agenda.handlers.activity``, ``services.weather.handlers.report``),
  publish the result on ``ceil.results.<id>``, ack;
* conductor, per result: load the state (``kv.get``, or the state and revision it wrote
  last when ``--cache``), compare-and-set it (``kv.update(last=revision)``; on a
  conflict re-read and decide again), publish the next task or the
  ``ceil.events.activity.chosen`` event, ack.

So a busy hour costs 2 CAS writes and a free one 3, as in kapellmeister; every publish
carries a deterministic ``Nats-Msg-Id`` on streams with the same dedupe window.

What DESIGN.md advises is applied: many facts in flight (each message is a task,
``--inflight`` at most per consumer), pulls without a round trip per batch (a
credit-based consume loop: pull requests are topped up as messages finish, so messages
keep flowing while earlier ones are processed), msgspec encoders and decoders built
once, uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from services.agenda.handlers import ActivityRequest, activity
from services.weather.handlers import ReportRequest, report

log = logging.getLogger("ceiling")

STREAMS: Final = {
    "CEIL_TASKS": ("ceil.tasks.>", RetentionPolicy.WORK_QUEUE),
    "CEIL_RESULTS": ("ceil.results.>", RetentionPolicy.WORK_QUEUE),
    "CEIL_EVENTS": ("ceil.events.>", RetentionPolicy.LIMITS),
}
BUCKET: Final = "ceil_workflows"
START_SUBJECT: Final = "ceil.start.plan_day"
EVENT_SUBJECT: Final = "ceil.events.activity.chosen"
PING_SUBJECT: Final = "ceil.ping."  # + role
DEDUPE_WINDOW_S: Final = 600.0
ROLES: Final = ("conductor", "agenda", "weather")


# --- the wire --------------------------------------------------------------------------


class StartInput(msgspec.Struct, frozen=True):
    user: str
    datetime: str


class State(msgspec.Struct, frozen=True):
    workflow_id: str
    user: str
    datetime: str
    status: str = "RUNNING"
    step: str = "agenda"
    activity: str | None = None


class TaskMsg(msgspec.Struct, frozen=True):
    workflow_id: str
    ref: str
    input: msgspec.Raw


class ResultMsg(msgspec.Struct, frozen=True):
    workflow_id: str
    ref: str
    output: msgspec.Raw


class Chosen(msgspec.Struct, frozen=True):
    user: str
    activity: str
    workflow_id: str


class ActivityOut(msgspec.Struct, frozen=True):
    activity: str


class ReportOut(msgspec.Struct, frozen=True):
    rain: bool
    snow: bool


_encode = msgspec.json.Encoder().encode
_decode_start = msgspec.json.Decoder(StartInput).decode
_decode_state = msgspec.json.Decoder(State).decode
_decode_task = msgspec.json.Decoder(TaskMsg).decode
_decode_result = msgspec.json.Decoder(ResultMsg).decode
_decode_activity_req = msgspec.json.Decoder(ActivityRequest).decode
_decode_report_req = msgspec.json.Decoder(ReportRequest).decode
_decode_activity = msgspec.json.Decoder(ActivityOut).decode
_decode_report = msgspec.json.Decoder(ReportOut).decode


# --- topology --------------------------------------------------------------------------


async def ensure_topology(js: JetStreamContext) -> KeyValue:
    """The three streams and the bucket, with kapellmeister's settings (file, dedupe)."""
    for name, (subject, retention) in STREAMS.items():
        config = StreamConfig(
            name=name,
            subjects=[subject],
            retention=retention,
            storage=StorageType.FILE,
            num_replicas=1,
            duplicate_window=DEDUPE_WINDOW_S,
            discard=DiscardPolicy.OLD,
        )
        try:
            await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(config)
    try:
        return await js.key_value(BUCKET)
    except Exception:
        return await js.create_key_value(
            KeyValueConfig(bucket=BUCKET, history=5, storage=StorageType.FILE, replicas=1)
        )


async def delete_topology(js: JetStreamContext) -> None:
    """Remove what `ensure_topology` made (for a server the benchmark did not start)."""
    for name in STREAMS:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)
    with contextlib.suppress(Exception):
        await js.delete_key_value(BUCKET)


# --- a credit-based pull consumer ----------------------------------------------------------


class Consume:
    """Keep up to ``inflight`` messages requested or running; top up as they finish.

    One pull request asks for every free slot (when a quarter of them are free, or
    nothing is outstanding), so there is no round trip per batch and no wait for a batch
    to fill up: the server sends each message as soon as it is stored.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        handle: Callable[[Msg], Awaitable[None]],
        inflight: int,
        expires_s: float = 5.0,
    ) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._handle = handle
        self._inflight = inflight
        self._expires_ns = int(expires_s * 1e9)
        self._requested = 0
        self._running = 0
        self._delivered = 0
        self._inbox = nc.new_inbox()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresh: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._nc.subscribe(self._inbox, cb=self._on_msg)
        await self._top_up(force=True)
        self._refresh = asyncio.create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        # A lost pull request (a reconnect) must not stall the loop for ever.
        while True:
            delivered = self._delivered
            await asyncio.sleep(self._expires_ns / 1e9)
            if self._delivered == delivered and self._running == 0:
                # Idle for a whole expiry: every earlier pull request has ended.
                self._requested = 0
            await self._top_up(force=True)

    async def _top_up(self, force: bool = False) -> None:
        free = self._inflight - self._running - self._requested
        if free <= 0 or not (force or self._requested == 0 or free * 4 >= self._inflight):
            return
        self._requested += free
        request = _encode({"batch": free, "expires": self._expires_ns})
        await self._nc.publish(self._next, request, reply=self._inbox)

    async def _on_msg(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        if status is not None:
            if status in ("408", "409", "404"):
                # The pull request ended; what it did not deliver is free again.
                pending = int((msg.headers or {}).get("Nats-Pending-Messages", "0") or 0)
                self._requested = max(0, self._requested - pending)
                if status != "408" or pending:
                    await self._top_up()
            return
        self._requested = max(0, self._requested - 1)
        self._running += 1
        self._delivered += 1
        task = asyncio.create_task(self._run(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except Exception:
            log.exception("handler failed on %s", msg.subject)
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
        finally:
            self._running -= 1
            await self._top_up()


async def ensure_consumer(js: JetStreamContext, stream: str, subject: str) -> str:
    durable = subject.replace(".", "_").replace(">", "all")
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            max_deliver=-1,
            max_ack_pending=10_000,
        ),
    )
    return durable


# --- the roles ---------------------------------------------------------------------------


class Conductor:
    def __init__(self, nc: Client, kv: KeyValue, *, cache: bool) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.kv = kv
        self.cache: dict[str, tuple[State, int]] | None = {} if cache else None
        self.conflicts = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_start(self, msg: Msg) -> None:
        # Core subscriptions run callbacks one at a time: decide in a task of its own.
        task = asyncio.create_task(self._start(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, msg: Msg) -> None:
        try:
            await self._started(msg)
        except Exception as exc:  # a bench: say what went wrong, keep serving
            log.exception("start failed")
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(
                    msg.reply, b"", headers={"Nats-Service-Error": repr(exc) or "error"}
                )

    async def _started(self, msg: Msg) -> None:
        data = _decode_start(msg.data)
        workflow_id = (msg.headers or {}).get("Workflow-Id", "")
        state = State(workflow_id=workflow_id, user=data.user, datetime=data.datetime)
        revision = await self.kv.create(workflow_id, _encode(state))
        if self.cache is not None:
            self.cache[workflow_id] = (state, revision)
        task = TaskMsg(workflow_id, "agenda", msgspec.Raw(_encode({"datetime": data.datetime})))
        await self.js.publish(
            "ceil.tasks.agenda.activity",
            _encode(task),
            headers={"Nats-Msg-Id": f"{workflow_id}:agenda:1"},
        )
        await msg.respond(_encode({"workflow_id": workflow_id, "status": "RUNNING"}))

    async def _load(self, workflow_id: str, fresh: bool) -> tuple[State, int]:
        if not fresh and self.cache is not None and (hit := self.cache.get(workflow_id)):
            return hit
        entry = await self.kv.get(workflow_id)
        return _decode_state(entry.value or b""), entry.revision or 0

    async def on_result(self, msg: Msg) -> None:
        result = _decode_result(msg.data)
        workflow_id = result.workflow_id
        fresh = False
        while True:
            state, revision = await self._load(workflow_id, fresh)
            if state.step != result.ref or state.status != "RUNNING":
                break  # a redelivery of a fact already applied
            if result.ref == "agenda":
                chosen = _decode_activity(result.output).activity
                if chosen == "free":
                    new = msgspec.structs.replace(state, step="weather")
                else:
                    new = msgspec.structs.replace(state, status="COMPLETED", activity=chosen)
            else:
                weather = _decode_report(result.output)
                chosen = "code_for_fun" if weather.rain or weather.snow else "run"
                new = msgspec.structs.replace(state, status="COMPLETED", activity=chosen)
            try:
                new_revision = await self.kv.update(workflow_id, _encode(new), last=revision)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                fresh = True
                continue
            if self.cache is not None:
                if new.status == "RUNNING":
                    self.cache[workflow_id] = (new, new_revision)
                else:
                    self.cache.pop(workflow_id, None)
            if new.status == "RUNNING":
                task = TaskMsg(workflow_id, "weather", msgspec.Raw(_encode({"date": new.datetime})))
                await self.js.publish(
                    "ceil.tasks.weather.report",
                    _encode(task),
                    headers={"Nats-Msg-Id": f"{workflow_id}:weather:1"},
                )
            else:
                event = Chosen(user=new.user, activity=chosen, workflow_id=workflow_id)
                await self.js.publish(
                    EVENT_SUBJECT,
                    _encode(event),
                    headers={"Nats-Msg-Id": f"{workflow_id}:notify:1"},
                )
            break
        await msg.ack()


async def _agenda(raw: msgspec.Raw) -> bytes:
    return _encode(await activity(_decode_activity_req(raw)))


async def _weather(raw: msgspec.Raw) -> bytes:
    return _encode(await report(_decode_report_req(raw)))


def agent_handler(
    js: JetStreamContext, compute: Callable[[msgspec.Raw], Awaitable[bytes]]
) -> Callable[[Msg], Awaitable[None]]:
    async def handle(msg: Msg) -> None:
        task = _decode_task(msg.data)
        output = await compute(task.input)
        result = ResultMsg(task.workflow_id, task.ref, msgspec.Raw(output))
        await js.publish(
            f"ceil.results.{task.workflow_id}",
            _encode(result),
            headers={"Nats-Msg-Id": f"{task.workflow_id}:{task.ref}:1:result"},
        )
        await msg.ack()

    return handle


async def serve(role: str, url: str, inflight: int, cache: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(servers=[url], name=f"ceiling-{role}", connect_timeout=5)
    js = nc.jetstream()
    kv = await ensure_topology(js)
    if role == "conductor":
        conductor = Conductor(nc, kv, cache=cache)
        await nc.subscribe(START_SUBJECT, cb=conductor.on_start)
        durable = await ensure_consumer(js, "CEIL_RESULTS", "ceil.results.>")
        await Consume(nc, "CEIL_RESULTS", durable, conductor.on_result, inflight).start()
    else:
        task = "agenda.activity" if role == "agenda" else "weather.report"
        durable = await ensure_consumer(js, "CEIL_TASKS", f"ceil.tasks.{task}")
        handle = agent_handler(js, _agenda if role == "agenda" else _weather)
        await Consume(nc, "CEIL_TASKS", durable, handle, inflight).start()

    async def pong(msg: Msg) -> None:
        await msg.respond(b"pong")

    await nc.subscribe(PING_SUBJECT + role, cb=pong)
    log.info("ceiling %s ready on %s", role, url)
    await stop.wait()
    await nc.drain()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--role", choices=ROLES, required=True)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--inflight", type=int, default=256, help="messages in flight")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="conductor: kv.get before every CAS instead of trying its last write",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s ceiling-{args.role} %(levelname)s %(message)s"
    )
    runner = serve(args.role, args.nats_url, args.inflight, not args.no_cache)
    try:
        import uvloop

        uvloop.run(runner)
    except ImportError:  # pragma: no cover
        asyncio.run(runner)
    sys.exit(0)


if __name__ == "__main__":
    main()
