"""The agent runtime: a plain ``async def handler(req: Req) -> Res`` served over NATS.

Each task is served twice from the same handler:

* a JetStream work-queue consumer on ``tasks.<task>`` (stream TASKS), shared by every
  replica: pull in batches, decode and validate, call, publish the `TaskResult` on
  ``results.<workflow_id>`` with a deterministic ``Nats-Msg-Id``, then ack. While the
  handler runs, in-progress acks keep the message from being redelivered.
* a NATS micro endpoint on ``<task>`` for direct requests (``nats req weather.report``).

What the handler's outcome means (the handler never sees NATS):

==============================  =====================================================
outcome                         JetStream                      result / reply
==============================  =====================================================
returns                         ack after the result is stored COMPLETED / the value
input fails validation,         ack                            FAILED, terminal (400)
``BadRequest``
``TaskError(retryable=False)``  ack                            FAILED, terminal
any other exception             nak with backoff, until the    FAILED, retryable, on the
                                last delivery                  last delivery / 500
==============================  =====================================================

On start the agent registers each task in the ``tasks`` bucket (name, service, JSON
Schema of input and output generated from the structs) so definitions can be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service
from opentelemetry.trace import SpanKind

from kapellmeister import tracing
from kapellmeister.actors import Actors, ActorSpec
from kapellmeister.clock import ServerClock, epoch_s
from kapellmeister.config import Settings
from kapellmeister.consumer import PullWorker
from kapellmeister.deadletter import dead_letter, record_dead_letter
from kapellmeister.definitions import RetryPolicy
from kapellmeister.errors import BadRequest, TaskError
from kapellmeister.lease import LEASES, Lease, lease_key
from kapellmeister.messages import Failure, Json, TaskRequest, TaskResult
from kapellmeister.metrics import metrics
from kapellmeister.micro import add_endpoint, error_detail, stop_service
from kapellmeister.payloads import Payloads
from kapellmeister.publisher import Publisher
from kapellmeister.rates import RATES, Rate, RateLimiter, bucket_key
from kapellmeister.runtime import connect, disconnect, run_service, utc_now, within
from kapellmeister.switches import Switches
from kapellmeister.topology import (
    BUCKETS,
    TASKS,
    consumer_name,
    ensure_buckets,
    ensure_consumer,
    ensure_streams,
)

__all__ = ["Agent", "Handler", "TaskRegistration", "TaskSpec", "run_agent", "task"]

log = logging.getLogger("kapellmeister.agent")

Req = TypeVar("Req")
Res = TypeVar("Res")
Handler = Callable[[Req], Awaitable[Res]]

_encode = msgspec.json.Encoder().encode
_decode_request = msgspec.json.Decoder(TaskRequest).decode
_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# How often an agent with rate limits reads the server's time again (seconds).
_RESYNC_S = 300.0


class TaskRegistration(msgspec.Struct, frozen=True, kw_only=True):
    """A task as agents register it in the ``tasks`` bucket (key: the task name)."""

    name: str
    service: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    registered_at: str
    # Defaults for a definition's SIMPLE task that says nothing of its own (recorded now;
    # the conductor applies them with its retry and timeout handling).
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = None
    # The agent's heartbeat bound: its JetStream ack wait.
    response_timeout_s: float | None = None
    # At most so many runs per window, across the agent's replicas (`kapellmeister.rates`).
    rate: Rate | None = None


class TaskSpec(Generic[Req, Res]):
    """A handler bound to its task name, with its request and result types."""

    def __init__(
        self,
        name: str,
        handler: Handler[Req, Res],
        description: str = "",
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
        rate: Rate | None = None,
    ) -> None:
        hints = typing.get_type_hints(handler)
        params = [p for p in hints if p != "return"]
        if len(params) != 1 or "return" not in hints:
            raise TypeError(f"{name}: the handler must be `async def h(req: Req) -> Res`")
        self.name = name
        self.handler = handler
        self.request_type: type[Req] = hints[params[0]]
        self.result_type: type[Res] = hints["return"]
        self.description = description or (handler.__doc__ or "").strip().split("\n")[0]
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.rate = rate
        fields = getattr(self.request_type, "__struct_fields__", None)
        keyed = rate.key.split(".")[0] if rate is not None and rate.key is not None else None
        if keyed is not None and fields is not None and keyed not in fields:
            raise TypeError(f"{name}: its rate key names {keyed!r}, not a field of its input")
        self._decode = msgspec.json.Decoder(self.request_type).decode

    async def call(self, raw: bytes | msgspec.Raw) -> bytes:
        """Decode and validate ``raw``, run the handler, encode its result."""
        return _encode(await self.handler(self._decode(raw)))

    def registration(self, service: str, ack_wait_s: float | None = None) -> TaskRegistration:
        return TaskRegistration(
            name=self.name,
            service=service,
            description=self.description,
            input_schema=msgspec.json.schema(self.request_type),
            output_schema=msgspec.json.schema(self.result_type),
            registered_at=utc_now(),
            retry=self.retry,
            timeout_s=self.timeout_s,
            response_timeout_s=ack_wait_s,
            rate=self.rate,
        )


def task(
    name: str,
    handler: Handler[Req, Res],
    *,
    description: str = "",
    retry: RetryPolicy | None = None,
    timeout_s: float | None = None,
    rate: Rate | None = None,
) -> TaskSpec[Req, Res]:
    """Bind ``handler`` to the task ``name`` (its micro subject; ``tasks.<name>`` in JetStream).

    ``retry`` and ``timeout_s`` are registered with the task as its defaults, for a
    definition's task that does not set its own (conductor-level retries and task
    timeouts are applied from the reliability milestone on; today they are recorded).
    ``rate`` limits how often the task runs from the work queue, across every replica
    of the agent (`kapellmeister.rates`); direct requests to its endpoint are not limited.
    """
    return TaskSpec(name, handler, description, retry, timeout_s, rate)


def _terminal(exc: BaseException) -> bool:
    if isinstance(exc, TaskError):
        return not exc.retryable
    return isinstance(exc, BadRequest | msgspec.ValidationError | msgspec.DecodeError)


class Agent:
    """Serves a set of tasks for one service name (``weather``, ``agenda``)."""

    def __init__(
        self,
        name: str,
        tasks: Sequence[TaskSpec[Any, Any]],
        settings: Settings,
        *,
        version: str = "0.1.0",
        description: str = "",
    ) -> None:
        self.name = name
        self.tasks = list(tasks)
        self.settings = settings
        self.version = version
        self.description = description or f"kapellmeister agent {name}"
        self._workers: list[PullWorker] = []
        self._working: dict[int, Msg] = {}  # by id(): nats-py's Msg is not hashable
        self._heartbeats: asyncio.Task[None] | None = None
        self._service: Service | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._publisher: Publisher | None = None
        self._leases: KeyValue | None = None
        self._limiter: RateLimiter | None = None
        self._payloads: Payloads | None = None
        self._clock: ServerClock | None = None
        self._stopping = asyncio.Event()
        self._worker_id = ""  # <name>/<micro service id>, once the service is up

    async def start(self, nc: Client) -> None:
        """Create what is missing, register the tasks, start consuming and serving."""
        self._nc, self._js = nc, nc.jetstream()
        self._publisher = Publisher(nc)
        await self._publisher.start()
        settings = self.settings
        await ensure_streams(self._js, settings.replicas)
        # The rates bucket only for a rate-limited task (below): an agent without one
        # does not wait for it.
        needed = [name for name in BUCKETS if name != RATES]
        buckets = await ensure_buckets(self._js, settings.replicas, names=needed)
        self._leases = buckets[LEASES]
        self._payloads = Payloads(self._js, settings.payload_threshold, settings.replicas)
        if any(spec.rate is not None for spec in self.tasks):
            # Slots are counted on the server's clock, which every replica shares.
            clock = self._clock = ServerClock(nc)
            await clock.sync()
            rates = await ensure_buckets(self._js, settings.replicas, names=[RATES])
            self._limiter = RateLimiter(rates[RATES], lambda: epoch_s(clock.now()))
        for spec in self.tasks:
            await buckets["tasks"].put(
                spec.name, _encode(spec.registration(self.name, settings.ack_wait_s))
            )
        # The service and its endpoints back to back, with no round trip between: once
        # `nats micro ping` answers, its endpoints answer too.
        self._service = await add_service(
            nc, name=self.name, version=self.version, description=self.description
        )
        self._worker_id = f"{self.name}/{self._service.id}"
        for spec in self.tasks:
            endpoint = spec.name.rsplit(".", 1)[-1]
            await add_endpoint(
                self._service, endpoint, spec.name, self._direct(spec), settings.concurrency
            )
        for spec in self.tasks:
            subject = f"tasks.{spec.name}"
            durable = await ensure_consumer(
                self._js,
                TASKS,
                subject,
                ack_wait_s=settings.ack_wait_s,
                max_deliver=settings.max_deliver,
            )
            worker = PullWorker(
                spec.name,
                nc,
                TASKS,
                durable,
                functools.partial(self._run, spec),
                settings.concurrency,
            )
            await worker.start()
            self._workers.append(worker)
        self._heartbeats = asyncio.create_task(self._heartbeat())
        log.info("%s: serving %s", self.name, ", ".join(s.name for s in self.tasks))

    async def stop(self) -> None:
        """Stop pulling, let running tasks finish (their results get published), stop serving.
        Tasks waiting for their rate limit go back to the queue at once."""
        self._stopping.set()
        await asyncio.gather(*(w.stop(self.settings.ack_wait_s) for w in self._workers))
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        if self._service is not None:
            await stop_service(self._service)
        if self._publisher is not None:
            await self._publisher.stop()

    @property
    def worker_id(self) -> str:
        return self._worker_id or f"{self.name}/?"

    def _direct(self, spec: TaskSpec[Any, Any]) -> Callable[[Request], Awaitable[bytes]]:
        def attributes() -> dict[str, str | int]:
            return {
                "messaging.system": "nats",
                "messaging.destination.name": spec.name,
                "messaging.operation.type": "process",
            }

        name = f"process {spec.name}"

        async def handle(request: Request) -> bytes:
            with tracing.span(name, SpanKind.SERVER, request.headers, attributes=attributes):
                try:
                    assert self._payloads is not None
                    return await spec.call(await self._payloads.resolve(request.data or b"{}"))
                except Exception as exc:
                    tracing.record_error(exc)
                    raise

        return handle

    async def _heartbeat(self) -> None:
        """Every third of the ack wait, tell JetStream each running task is still alive."""
        loop = asyncio.get_running_loop()
        synced = loop.time()
        while True:
            await asyncio.sleep(self.settings.ack_wait_s / 3)
            for msg in list(self._working.values()):
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()
            if self._clock is not None and loop.time() - synced > _RESYNC_S:
                # The server's time again: a monotonic clock drifts, and stops in a
                # suspended VM; replicas' rate slots are only as close as their clocks.
                with contextlib.suppress(TimeoutError, nats.errors.Error):
                    await self._clock.sync()
                    synced = loop.time()

    async def _run(self, spec: TaskSpec[Any, Any], msg: Msg) -> None:
        try:
            request = _decode_request(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            assert self._js is not None
            await dead_letter(self._js, msg, self.name, f"not a task request: {exc}")
            return
        if spec.rate is not None:
            # Its slot first, then its lease: a wait is queueing, not a silent attempt.
            self._working[id(msg)] = msg  # held and heartbeated while it waits
            try:
                if not await self._rate_gate(spec, request, msg):
                    return
            finally:
                self._working.pop(id(msg), None)
        lease = self._lease(request)
        if lease is not None and not await lease.claim():
            # A conductor gave up on this attempt (its heartbeat stopped) and retried it.
            log.info(
                "%s %s: attempt %d was cancelled; dropped", spec.name, request.ref, request.attempt
            )
            with contextlib.suppress(nats.errors.Error):
                await msg.term()
            return

        def attributes() -> dict[str, str | int]:
            found: dict[str, str | int] = {
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.operation.type": "process",
                "messaging.consumer.group.name": consumer_name(msg.subject),
                "workflow.name": request.workflow,
                "task.attempt": request.attempt,
            }
            if msg.headers and "Nats-Msg-Id" in msg.headers:
                found["messaging.message.id"] = msg.headers["Nats-Msg-Id"]
            return found

        about = {"workflow.id": request.workflow_id, "task.ref": request.ref}
        name = f"process {msg.subject}"
        with tracing.span(name, SpanKind.CONSUMER, msg.headers, about, attributes) as trace:
            started_at = utc_now()
            self._working[id(msg)] = msg
            clock = asyncio.get_running_loop().time
            began, outcome = clock(), "failed"
            try:
                # Raw embeds the handler's encoded result as it is, without a decode.
                encoded = await self._call(spec, request, lease)
                result = TaskResult(
                    workflow_id=request.workflow_id,
                    ref=request.ref,
                    attempt=request.attempt,
                    status="COMPLETED",
                    output=typing.cast(Json, encoded),
                    started_at=started_at,
                    worker=self.worker_id,
                )
                outcome = "completed"
            except _Cancelled:
                outcome = "cancelled"
                log.warning(
                    "%s %s: attempt %d cancelled while running",
                    spec.name,
                    request.ref,
                    request.attempt,
                )
                with contextlib.suppress(nats.errors.Error):
                    await msg.term()
                return
            except Exception as exc:
                tracing.record_error(exc)
                if await self._retry_later(spec, msg, exc):
                    return
                detail = error_detail(exc)
                failure = Failure(
                    type=detail.type,
                    message=detail.message,
                    code=detail.code,
                    retryable=not _terminal(exc),
                    task=spec.name,
                )
                result = TaskResult(
                    workflow_id=request.workflow_id,
                    ref=request.ref,
                    attempt=request.attempt,
                    status="FAILED",
                    error=failure,
                    started_at=started_at,
                    worker=self.worker_id,
                )
            finally:
                self._working.pop(id(msg), None)
                meter = metrics()
                if meter.enabled:  # without a meter the histogram is a no-op
                    meter.handler_duration.record(
                        clock() - began, {"task.name": spec.name, "outcome": outcome}
                    )
            await self._reply(msg, result, trace)
            if lease is not None:
                await lease.release()

    async def _rate_gate(self, spec: TaskSpec[Any, Any], request: TaskRequest, msg: Msg) -> bool:
        """Reserve the run's slot of its rate limit and wait for it. False when the
        message went back instead: the agent is stopping (another replica takes it, with
        no delay), or the rates bucket did not answer four times (a delivery is spent)."""
        assert spec.rate is not None and self._limiter is not None
        data = None
        if spec.rate.key is not None:
            # The key as the handler will see it: a spilled input is fetched for it (one
            # that cannot be is counted in the task's own budget, and fails in its run).
            assert self._payloads is not None
            with contextlib.suppress(BadRequest, TimeoutError, nats.errors.Error):
                resolved = await self._payloads.resolve(bytes(request.input), request.workflow_id)
                data = msgspec.json.decode(resolved)
        key = bucket_key(spec.name, spec.rate, data)
        for attempt in range(4):
            try:
                wait = await self._limiter.reserve(key, spec.rate)
                break
            except (TimeoutError, nats.errors.Error) as exc:
                if attempt == 3:
                    log.warning("%s %s: no rate slot (%s); later", spec.name, request.ref, exc)
                    with contextlib.suppress(nats.errors.Error):
                        await msg.nak(delay=5.0)
                    return False
                await asyncio.sleep(0.5 * 2**attempt)
        if wait > 0 and await within(self._stopping.wait(), wait):
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
            return False
        return True

    def _lease(self, request: TaskRequest) -> Lease | None:
        """The attempt's heartbeat lease, if its task has a response timeout."""
        if not request.response_timeout_s:
            return None
        assert self._leases is not None
        key = lease_key(request.workflow_id, request.ref, request.attempt)
        return Lease(self._leases, key, self.worker_id)

    async def _call(
        self, spec: TaskSpec[Any, Any], request: TaskRequest, lease: Lease | None
    ) -> msgspec.Raw:
        """Run the handler (its input's payload references resolved, its big output
        spilled to references); under a lease, renew it every third of the response
        timeout, fetches and stores of payloads included, and stop the handler if a
        renewal finds the attempt cancelled."""
        payloads = self._payloads
        assert payloads is not None
        spilled = f"{request.workflow_id}/{request.ref}/{request.attempt}/output"

        async def run() -> bytes:
            data = await payloads.resolve(bytes(request.input), request.workflow_id)
            return await payloads.spill(await spec.call(data), spilled)

        if lease is None or not request.response_timeout_s:
            # Raw embeds the handler's encoded result as it is, without a decode.
            return msgspec.Raw(await run())
        call = asyncio.ensure_future(run())
        period = request.response_timeout_s / 3
        while True:
            done, _ = await asyncio.wait({call}, timeout=period)
            if done:
                return msgspec.Raw(call.result())
            try:
                renewed = await lease.renew()
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("lease %s not renewed: %s", lease.key, exc)
                continue
            if not renewed:
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
                raise _Cancelled(lease.key)

    async def _retry_later(self, spec: TaskSpec[Any, Any], msg: Msg, exc: Exception) -> bool:
        """Nak a retryable failure with backoff unless this was the last delivery."""
        deliveries = msg.metadata.num_delivered
        if _terminal(exc) or deliveries >= self.settings.max_deliver:
            if not _terminal(exc):
                # A poison message: keep it, with why, and fail the task instead of hanging.
                assert self._js is not None
                meta = msg.metadata
                await record_dead_letter(
                    self._js,
                    self.name,
                    f"gave up after {deliveries} deliveries: {exc!r}",
                    stream=meta.stream,
                    subject=msg.subject,
                    sequence=meta.sequence.stream,
                    headers=dict(msg.headers or {}),
                    data=msg.data,
                )
            return False
        delay = (
            getattr(exc, "retry_after", None) or _BACKOFF_S[min(deliveries, len(_BACKOFF_S)) - 1]
        )
        log.warning(
            "%s failed (delivery %d), retry in %.0fs: %r", spec.name, deliveries, delay, exc
        )
        await msg.nak(delay=delay)
        return True

    async def _reply(self, msg: Msg, result: TaskResult, trace: dict[str, str]) -> None:
        assert self._js is not None
        msg_id = (msg.headers or {}).get("Nats-Msg-Id") or (
            f"{result.workflow_id}:{result.ref}:{result.attempt}"
        )
        # The task's name in the subject: NATS permissions can let an agent publish the
        # results of its own tasks only, and the conductor checks the name against the ref.
        subject = f"results.{result.workflow_id}.{msg.subject.removeprefix('tasks.')}"

        def attributes() -> dict[str, str | int]:
            return {
                "messaging.message.id": f"{msg_id}:result",
                "workflow.id": result.workflow_id,
                "task.ref": result.ref,
                "task.attempt": result.attempt,
            }

        with tracing.producer("results.{workflow_id}.{task}", subject, trace, attributes) as sent:
            headers = {**sent, "Nats-Msg-Id": f"{msg_id}:result"}
            if not await self._publish_result(msg, msg_id, subject, _encode(result), headers):
                # Not stored, so not acked: the task comes back and its result is
                # published then (the handler runs again: its work is not lost).
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak(delay=1.0)
                return
        await msg.ack()

    async def _publish_result(
        self, msg: Msg, msg_id: str, subject: str, data: bytes, headers: dict[str, str]
    ) -> bool:
        """Publish a result, trying again while the RESULTS stream is away (a leader
        election, a restart), the task message held meanwhile: a short outage costs
        neither a delivery nor a second run of the handler. False after
        `_RESULT_PATIENCE_S`, or at once when the agent stops."""
        assert self._publisher is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _RESULT_PATIENCE_S
        pause = 0.25
        self._working[id(msg)] = msg  # heartbeated while it waits
        try:
            while True:
                try:
                    await self._publisher.publish(subject, data, headers)
                    return True
                except (TimeoutError, nats.errors.Error) as exc:
                    if loop.time() + pause > deadline or self._stopping.is_set():
                        log.warning(
                            "result of %s not published (%s); will be redelivered", msg_id, exc
                        )
                        return False
                    log.info("result of %s not published yet (%s); again", msg_id, exc)
                if await within(self._stopping.wait(), pause):
                    return False
                pause = min(pause * 2, 4.0)
        finally:
            self._working.pop(id(msg), None)


# How long an agent keeps trying to publish a finished task's result before it gives
# the task message back (to run again): a RESULTS leader election takes seconds.
_RESULT_PATIENCE_S: Final = 60.0


class _Cancelled(Exception):
    """The attempt's lease was cancelled by a conductor while the handler ran."""


def run_agent(
    name: str,
    tasks: Sequence[TaskSpec[Any, Any]],
    *,
    version: str = "0.1.0",
    description: str = "",
    actors: Sequence[ActorSpec] = (),
) -> None:
    """The ``__main__`` of an agent service: settings from the environment, run until a
    signal. ``actors`` run in the same process (as the micro service ``<name>-actors``)."""

    async def main(settings: Settings, stop: asyncio.Event) -> None:
        nc = await connect(settings, name)
        agent = Agent(name, tasks, settings, version=version, description=description)
        await agent.start(nc)
        reactors = (
            Actors(f"{name}-actors", actors, settings, Switches.from_env()) if actors else None
        )
        if reactors is not None:
            await reactors.start(nc)
        await stop.wait()
        if reactors is not None:
            await reactors.stop()
        await agent.stop()
        await disconnect(nc)

    run_service(name, main)
