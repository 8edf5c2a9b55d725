"""The conductor runtime: the thin shell around the pure decider.

For every fact (a start request, a task result) it does five steps, in this order:

1. **load** the saga and its KV revision (from this replica's cache when it has one);
2. **decide**: ``decide(definition, state, fact)``, pure;
3. **write** with compare-and-set (``kv.create`` for a new saga, else
   ``kv.update(last=revision)``); on a conflict, reload and go back to 2, never
   dropping the fact;
4. **publish** the decision's commands with deterministic ``Nats-Msg-Id``s;
5. **ack** the fact (or reply to the start request).

A crash between any two steps is safe: before 3 nothing happened; between 3 and 5 the
fact is redelivered, the decider recognises it and gives back the same commands, and
JetStream drops the duplicate publishes. A start request that crashed after 3 is
re-driven by the sweeper, which republishes the dispatch of every task still SCHEDULED
in a non-terminal workflow. Past the 10-minute dedupe window a copy would be stored, so
a replay or a re-drive of an older saga publishes only what `kapellmeister.recovery`
finds missing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Final, NamedTuple

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from nats.micro.service import Service
from opentelemetry.trace import SpanKind

from kapellmeister import tracing, triggers
from kapellmeister.api import serve_api
from kapellmeister.clock import ServerClock, epoch_s
from kapellmeister.config import Settings
from kapellmeister.consumer import PullWorker
from kapellmeister.deadletter import dead_letter, record_dead_letter
from kapellmeister.decider import (
    Decision,
    commands_caused_by,
    decide,
    node_of,
    task_msg_id,
    terminate_child,
)
from kapellmeister.definitions import Definition, TenantConfig
from kapellmeister.errors import KapellmeisterError
from kapellmeister.expressions import Json
from kapellmeister.gather import kv_key
from kapellmeister.index import INDEX, IndexEntry, WorkflowIndex, decode_entry
from kapellmeister.lease import LEASES, Look, cancel_if_silent, lease_key, look
from kapellmeister.limits import Limits
from kapellmeister.locks import KeyedLocks
from kapellmeister.messages import (
    TERMINAL,
    AcquireSlot,
    Command,
    Fact,
    Failure,
    GatherOutputs,
    KeptOutput,
    NotifyParent,
    ParentLink,
    PublishEvent,
    RetryDue,
    RunTask,
    Saga,
    ScheduleTimer,
    Started,
    StartWorkflow,
    TaskCompleted,
    TaskFailed,
    TaskRequest,
    TaskResult,
    TaskTimedOut,
    TerminateRequested,
    TerminateWorkflow,
    WorkflowTimedOut,
    utc_shift,
    utc_text,
)
from kapellmeister.metrics import metrics
from kapellmeister.micro import stop_service
from kapellmeister.payloads import Payloads, ensure_payloads
from kapellmeister.publisher import Publisher
from kapellmeister.recovery import Recovery, is_old
from kapellmeister.registry import DefinitionStore, Registry
from kapellmeister.runtime import within
from kapellmeister.schedules import (
    SCHEDULES,
    Schedule,
    Scheduler,
    ScheduleSpec,
    TickRefused,
    from_definition,
)
from kapellmeister.slots import SLOTS, Slots
from kapellmeister.store import CasConflict, SagaStore, Versioned, read_stream
from kapellmeister.topology import (
    DEADLETTERS,
    EVENTS,
    PURGE_MARKER_TTL_S,
    RESULTS,
    TASKS,
    ensure_buckets,
    ensure_consumer,
    ensure_streams,
)

__all__ = ["Conductor"]


class GatherIncomplete(nats.errors.Error):
    """A streamed FORK's kept outputs are not all there: its last fact is tried again."""


# The workflows whose turn the running task holds (`Conductor._turn`).
_HELD: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "workflow_turns", default=frozenset()
)
# Streamed FORK items' outputs until they are gathered.
FANOUT: Final = "fanout"

log = logging.getLogger("kapellmeister.conductor")

_encode = msgspec.json.Encoder().encode
_decode_result = msgspec.json.Decoder(TaskResult).decode


class Conductor:
    """Serves ``conductor.*`` requests and applies task results to sagas."""

    def __init__(self, settings: Settings, registry: Registry, *, version: str = "0.1.0") -> None:
        self.settings = settings
        self.registry = registry
        self.version = version
        self.conflicts = 0
        self._nc: Client | None = None
        self._clock: ServerClock | None = None
        self._js: JetStreamContext | None = None
        self._store: SagaStore | None = None
        self._index: WorkflowIndex | None = None
        self._publisher: Publisher | None = None
        self._definitions: DefinitionStore | None = None
        self._service: Service | None = None
        self._worker: PullWorker | None = None
        self._events: PullWorker | None = None
        self._trigger_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._poison: Subscription | None = None
        self._leases: KeyValue | None = None
        self._tenants: KeyValue | None = None
        self._scheduler: Scheduler | None = None
        self._limits: Limits | None = None
        # One fact at a time per workflow in this replica (`_turn`).
        self._turns = KeyedLocks()
        self._payloads: Payloads | None = None
        self._fanout: KeyValue | None = None
        # What the sweeper re-drove, by workflow: the updated_at it saw, how often, and
        # when next. An unchanged workflow is re-driven again with doubling gaps (a
        # republish that was acknowledged can still be lost to a server crash), not at
        # every sweep while a long task runs.
        self._redriven: dict[str, _Redrive] = {}
        # Set once the index was reconciled and the first sweep ran (tests wait on it).
        self.swept = asyncio.Event()

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "start() first"
        return self._js

    @property
    def clock(self) -> ServerClock:
        """The server's time, for the facts no message stamps (requests)."""
        assert self._clock is not None, "start() first"
        return self._clock

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "start() first"
        return self._nc

    @property
    def tenants(self) -> KeyValue:
        assert self._tenants is not None, "start() first"
        return self._tenants

    @property
    def leases(self) -> KeyValue:
        assert self._leases is not None, "start() first"
        return self._leases

    @property
    def payloads(self) -> Payloads:
        assert self._payloads is not None, "start() first"
        return self._payloads

    @property
    def limits(self) -> Limits:
        assert self._limits is not None, "start() first"
        return self._limits

    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None, "start() first"
        return self._scheduler

    @property
    def definitions(self) -> DefinitionStore:
        assert self._definitions is not None, "start() first"
        return self._definitions

    @property
    def index(self) -> WorkflowIndex:
        assert self._index is not None, "start() first"
        return self._index

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None, "start() first"
        return self._publisher

    @property
    def store(self) -> SagaStore:
        assert self._store is not None, "start() first"
        return self._store

    async def start(self, nc: Client) -> None:
        """Create what is missing, then serve requests, consume results and sweep."""
        settings = self.settings
        self._nc, self._js = nc, nc.jetstream()
        self._publisher = Publisher(nc)
        await self._publisher.start()
        self._clock = ServerClock(nc)
        await ensure_streams(self._js, settings.replicas, owner=True)
        await self._clock.sync()
        buckets = await ensure_buckets(self._js, settings.replicas, owner=True)
        self._store = SagaStore(buckets["workflows"], self._publisher)
        self._index = WorkflowIndex(
            buckets[INDEX], buckets["workflows"], self._publisher, flush_s=settings.index_flush_s
        )
        await self._index.start()
        self._leases = buckets[LEASES]
        self._tenants = buckets["tenants"]
        self._fanout = buckets[FANOUT]
        self._limits = Limits(self, Slots(buckets[SLOTS], self._clock.now, settings.slot_lease_s))
        await ensure_payloads(self._js, settings.replicas)  # the owner creates it
        self._payloads = Payloads(self._js, settings.payload_threshold, settings.replicas)
        self._definitions = DefinitionStore(buckets["definitions"], buckets["tasks"], self.registry)
        await self._definitions.start(shipped=self.registry.all())
        durable = await ensure_consumer(
            self._js, RESULTS, "results.>", ack_wait_s=settings.ack_wait_s, max_deliver=-1
        )
        self._worker = PullWorker(
            "conductor", nc, RESULTS, durable, self._on_result, settings.concurrency
        )
        await self._worker.start()
        # Events that start workflows (definitions' triggers): one consumer for all
        # replicas, on the subjects some trigger listens to, kept in step as
        # definitions are registered.
        await self.sync_triggers()
        # Schedules start workflows on their ticks, whichever replica sees one first.
        self._scheduler = Scheduler(buckets[SCHEDULES], self._start_tick, self._now_s)
        await self._scheduler.run()
        await self.sync_schedules()
        self._definitions.on_change = self._definitions_changed
        self._service = await serve_api(self, nc)
        # JetStream says when a task message ran out of deliveries (its agent kept dying
        # on it); one replica (a queue group) fails the task instead of letting it hang.
        self._poison = await nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{TASKS}.*",
            queue="conductor",
            cb=self._on_max_deliveries,
        )
        self._sweeper = asyncio.create_task(self._sweep_forever())
        log.info("conductor: serving %s", ", ".join(self.registry.names()))

    async def stop(self) -> None:
        """Stop pulling, let what runs finish (within the ack wait), stop serving.

        Each part is bounded and named in the log if it overruns: a stop must end (the
        process is going away; what it had not acked is redelivered)."""
        grace = self.settings.ack_wait_s
        if self._poison is not None:
            await _bounded("poison advisories", self._poison.unsubscribe(), 5.0)
            self._poison = None
        if self._scheduler is not None:
            await _bounded("scheduler", self._scheduler.stop(), 5.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await _bounded("sweeper", asyncio.gather(self._sweeper, return_exceptions=True), 5.0)
        if self._definitions is not None:
            self._definitions.on_change = None  # no new trigger puller while stopping
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._events is not None:
            await _bounded("trigger consumer", self._events.stop(grace), grace + 5.0)
        if self._worker is not None:
            await _bounded("results consumer", self._worker.stop(grace), grace + 5.0)
        if self._service is not None:
            await stop_service(self._service)
        if self._definitions is not None:
            await _bounded("definitions watch", self._definitions.stop(), 5.0)
        if self._index is not None:
            await _bounded("index", self._index.stop(), 5.0)
        if self._publisher is not None:
            await _bounded("publisher", self._publisher.stop(), 5.0)

    def _definitions_changed(self) -> None:
        """A definition was added (here or by another replica): follow its triggers, and
        store its schedules."""
        for task in (
            asyncio.create_task(self.sync_triggers(), name="sync triggers"),
            asyncio.create_task(self.sync_schedules(), name="sync schedules"),
        ):
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def sync_schedules(self) -> None:
        """Store the schedules the latest version of each definition brings, or bring the
        stored ones up to date (every replica may: the same spec is a no-op)."""
        for name, spec in self.brought_schedules().items():
            definition = self.registry.get(spec.workflow)
            try:
                await self.scheduler.ensure(spec, self.clock.now(), definition.version)
            except KapellmeisterError as exc:
                log.warning("schedule %s of %s not stored: %s", name, spec.workflow, exc)

    def brought_schedules(self) -> dict[str, ScheduleSpec]:
        """The schedules the latest version of each definition brings, by name."""
        brought: dict[str, ScheduleSpec] = {}
        for name in self.registry.names():
            for spec in from_definition(self.registry.get(name).spec):
                brought[spec.name] = spec
        return brought

    async def sync_triggers(self) -> None:
        """Consume the events some trigger may start a workflow from, and no others.

        The consumer's filters only grow: a replica that has not seen a new definition
        yet never narrows what another one just widened (which would skip the events in
        between). Without any trigger there is no consumer: plan_day's own events are
        not delivered to the conductor just to be found useless.
        """
        async with self._trigger_lock:
            latest = [self.registry.get(name) for name in self.registry.names()]
            wanted = {trigger.subject for d in latest for trigger, _ in d.triggers}
            # Another replica may widen the filters between our read and our write: write,
            # read back, and go again until what the server has covers both.
            for _ in range(5):
                current = await self._trigger_filters()
                subjects = triggers.filter_subjects(wanted | current)
                if not subjects:
                    return
                if set(subjects) == current:
                    break
                await ensure_consumer(
                    self.js,
                    EVENTS,
                    subjects,
                    ack_wait_s=self.settings.ack_wait_s,
                    max_deliver=self.settings.max_deliver,
                    durable=triggers.DURABLE,
                    new_only=True,
                )
                log.info("trigger consumer on %s", ", ".join(subjects))
            if self._events is None:
                assert self._nc is not None, "start() first"
                self._events = PullWorker(
                    "triggers",
                    self._nc,
                    EVENTS,
                    triggers.DURABLE,
                    functools.partial(triggers.on_event, self),
                    self.settings.concurrency,
                )
                await self._events.start()

    async def _trigger_filters(self) -> set[str]:
        """The trigger consumer's filters as the server has them (none: no consumer)."""
        try:
            config = (await self.js.consumer_info(EVENTS, triggers.DURABLE)).config
        except nats.js.errors.NotFoundError:
            return set()
        return set(config.filter_subjects or [config.filter_subject or triggers.ALL_EVENTS])

    # --- the five steps -------------------------------------------------------------------

    async def apply(self, fact: Fact) -> Decision:
        """Load, decide and compare-and-set until the write lands or nothing changes."""
        decision, _ = await self._apply(fact)
        return decision

    async def _apply(self, fact: Fact) -> tuple[Decision, bool]:
        """`apply`, also saying whether this call wrote the saga.

        Facts of one workflow are applied one at a time in this replica (replicas race
        by CAS, as ever): concurrent ones, such as a wide FORK's results, would otherwise
        mostly lose their compare-and-set to each other and decide again. The slots the
        write frees are given back after, outside that turn."""
        async with self._turn(fact.workflow_id):
            decision, wrote, before, definition = await self._decide_and_write(fact)
        if wrote and decision.state is not None and definition is not None:
            await self.limits.released(before, decision.state, definition)
        return decision, wrote

    async def _decide_and_write(
        self, fact: Fact
    ) -> tuple[Decision, bool, Saga | None, Definition | None]:
        fresh = False
        while True:
            if isinstance(fact, Started) and not fresh:
                # A new workflow most likely: try the create straight away, read on conflict.
                loaded = self.store.cached(fact.workflow_id) or Versioned(None, 0)
            else:
                loaded = await self.store.load(fact.workflow_id, fresh=fresh)
            state = loaded.state
            if state is not None:
                definition = await self.definitions.get(state.workflow, state.version)
            elif isinstance(fact, Started):
                definition = await self.definitions.get(fact.workflow, fact.version)
            else:
                # A result for a workflow that is not stored.
                return Decision(None, ()), False, None, None
            decision = decide(definition, state, fact)
            if decision.state is state:
                if not fresh and not decision.commands:
                    # A no-op on a cached state may only mean the cache is behind.
                    fresh = True
                    continue
                return decision, False, state, definition
            assert decision.state is not None
            if decision.outputs:
                # Streamed FORK items' outputs, before the saga that drops their records.
                await self._keep_outputs(decision.outputs)
            try:
                await self.store.save(decision.state, loaded.revision)
            except CasConflict:
                self.conflicts += 1
                metrics().conflicts.add(1)
                fresh = True
                continue
            self.index.note(state, decision.state)
            metrics().saga_written(state, decision.state)
            return decision, True, state, definition

    @contextlib.asynccontextmanager
    async def _turn(self, workflow_id: str) -> AsyncIterator[None]:
        """This replica's turn at one workflow (a nested call in the same task has it)."""
        held = _HELD.get()
        if workflow_id in held:
            yield
            return
        token = _HELD.set(held | {workflow_id})
        try:
            async with self._turns.hold(workflow_id):
                yield
        finally:
            _HELD.reset(token)

    async def publish(
        self, state: Saga, commands: tuple[Command, ...], trace: Mapping[str, str] | None = None
    ) -> None:
        """Publish commands concurrently; JetStream dedupes each by its ``Nats-Msg-Id``.

        ``trace`` is the trace headers of the step that decided them; without it (the
        sweeper) they continue the workflow's root context kept in the saga.
        """
        if not commands:
            return
        if trace is None:
            trace = _root(state)
        if any(isinstance(c, GatherOutputs) for c in commands):
            # Outputs gathered first: the decision's other commands may pass them on.
            for command in commands:
                if isinstance(command, GatherOutputs):
                    await self._gather(command)
            commands = tuple(c for c in commands if not isinstance(c, GatherOutputs))
            if not commands:
                return
        if len(commands) == 1:  # the usual case: no task to gather one publish
            await self._publish_one(commands[0], trace, state)
            return
        await asyncio.gather(*(self._publish_one(c, trace, state) for c in commands))

    async def _publish_one(self, command: Command, trace: Mapping[str, str], state: Saga) -> None:
        destination = _destination(command)
        if destination is None:  # a step of its own, with its own span
            await self._publish_command(command, trace)
            return

        def attributes() -> dict[str, str | int]:
            return {
                "messaging.message.id": command.msg_id,
                "workflow.id": state.workflow_id,
                "workflow.name": state.workflow,
                **_about(command),
            }

        with tracing.producer(*destination, trace, attributes) as sent:
            await self._publish_command(command, sent)

    async def _publish_command(self, command: Command, trace: Mapping[str, str]) -> None:
        headers = {**trace, "Nats-Msg-Id": command.msg_id}
        match command:
            case RunTask():
                if command.slot and not await self.limits.admit(command):
                    return  # it waits for a slot: dispatched when it gets one
                where = f"{command.workflow_id}/{command.ref}/{command.attempt}/input"
                data = await self.payloads.spill(_encode(command.input), where)
                request = TaskRequest(
                    workflow_id=command.workflow_id,
                    workflow=command.workflow,
                    ref=command.ref,
                    task=command.task,
                    attempt=command.attempt,
                    input=msgspec.Raw(data),
                    response_timeout_s=command.response_timeout_s,
                )
                await self.publisher.publish(f"tasks.{command.task}", _encode(request), headers)
            case PublishEvent():
                await self.publisher.publish(command.subject, _encode(command.data), headers)
            case ScheduleTimer():
                # JetStream fires the timer on its own clock: a completed result for the
                # DELAY lands on results.<workflow_id> at fire_at, even if no conductor runs.
                fired = TaskResult(
                    workflow_id=command.workflow_id,
                    ref=command.ref,
                    attempt=command.attempt,
                    status="COMPLETED",
                    output={"fired_at": command.fire_at, "lease": command.lease}
                    if command.purpose == "response"
                    else {"fired_at": command.fire_at},
                    timer=None if command.purpose == "delay" else command.purpose,
                )
                headers["Nats-Schedule"] = f"@at {command.fire_at}"
                headers["Nats-Schedule-Target"] = f"results.{command.workflow_id}"
                where = f"{command.workflow_id}.{command.ref}.{command.attempt}"
                subject = f"timers.{where}.{command.purpose}"
                await self.publisher.publish(subject, _encode(fired), headers)
            case StartWorkflow():
                await self._start_child(command, trace)
            case NotifyParent(parent=parent):
                failed = command.status != "COMPLETED"
                error = command.error or Failure(
                    type=f"child_{command.status.lower()}",
                    message=f"child workflow {command.child} ended {command.status}",
                )
                result = TaskResult(
                    workflow_id=parent.workflow_id,
                    ref=parent.ref,
                    attempt=parent.attempt,
                    status="FAILED" if failed else "COMPLETED",
                    output=command.output,
                    error=error if failed else None,
                    worker=f"workflow/{command.child}",
                )
                await self._publish_result(result, headers)
            case AcquireSlot():
                await self.limits.acquire(command)
            case TerminateWorkflow():
                # The child's own saga step: its end terminates its children in turn.
                await self.request(
                    TerminateRequested(
                        workflow_id=command.workflow_id,
                        reason=command.reason,
                        compensate=command.compensate,
                        at=self.clock.now(),
                    ),
                    trace,
                )

    async def _keep_outputs(self, outputs: tuple[KeptOutput, ...]) -> None:
        kv = self._fanout
        assert kv is not None, "start() first"
        await asyncio.gather(*(kv.put(o.key, _encode(o.output)) for o in outputs))

    async def _gather(self, command: GatherOutputs) -> None:
        """A streamed FORK's item outputs, in item order, as one object, then the kept
        outputs go (idempotent: a gather again finds the object and stops there).

        Raises:
            GatherIncomplete: an item's output is not in the ``fanout`` bucket (the fact
                is tried again; nothing goes on with a hole in the list).
        """
        if await self.payloads.exists(command.name):
            return
        prefix = f"$KV.{FANOUT}.{command.workflow_id}.{command.ref}.{command.attempt}."
        outputs: list[msgspec.Raw | None] = [None] * command.items
        async for msg in read_stream(
            self.js, f"KV_{FANOUT}", [prefix + ">"], deliver=DeliverPolicy.LAST_PER_SUBJECT
        ):
            index = msg.subject.removeprefix(prefix)
            if index.isdigit() and int(index) < command.items and msg.data:
                outputs[int(index)] = msgspec.Raw(msg.data)
        missing = [i for i, output in enumerate(outputs) if output is None]
        if missing:
            raise GatherIncomplete(
                f"{command.workflow_id}: FORK {command.ref!r} lacks the outputs of "
                f"{len(missing)} items (first: {missing[:5]}) in the {FANOUT} bucket"
            )
        await self.payloads.put_once(command.name, _encode(outputs))
        await self.js.purge_stream(f"KV_{FANOUT}", subject=prefix + ">")

    async def _publish_result(self, result: TaskResult, headers: Mapping[str, str]) -> None:
        """A result the conductor states itself (a child's end, a refusal, a poison task)."""
        await self.publisher.publish(f"results.{result.workflow_id}", _encode(result), headers)

    async def start_from(
        self,
        definition: Definition,
        workflow_id: str,
        data: Json,
        headers: Mapping[str, str],
        *,
        priority: int | None = None,
    ) -> Saga:
        """Start ``definition`` as a request or an event asked (``Tenant``, ``traceparent``
        and ``tracestate`` from its ``headers``; ``priority`` from a checked ``Priority``
        header), in a trace of its own that continues the caller's. The root context is
        chosen now and kept in the saga; the root span with its ids is recorded once the
        start is decided, and only if it created the workflow."""
        started_ns = time.time_ns()
        traceparent = tracing.root_traceparent(f"workflow {definition.name}", headers)
        with tracing.about({"workflow.id": workflow_id}, traceparent):
            fact = Started(
                workflow_id=workflow_id,
                workflow=definition.name,
                version=definition.version,
                input=data,
                at=self.clock.now(),
                tenant=headers.get("Tenant", ""),
                trace_id=tracing.trace_id_of(traceparent),
                traceparent=traceparent,
                tracestate=headers.get("tracestate", ""),
                priority=priority,
            )
            return await self.start_workflow(fact, headers, started_ns)

    async def start_workflow(
        self, fact: Started, caller: Mapping[str, str] | None = None, started_ns: int = 0
    ) -> Saga:
        """Create a workflow (or find it: the id makes a start idempotent) and publish.

        A repeated start republishes what the first one did, in case it crashed before
        publishing, in the workflow's own trace; but not for a finished workflow, whose
        events are long out. Only the start that created the workflow records its root
        span (``fact.traceparent``'s ids, the ``caller``'s child).
        """
        if fact.tenant and not fact.switched_off:
            switched = await self.switched_off(fact.workflow, fact.version, fact.tenant)
            fact = msgspec.structs.replace(fact, switched_off=switched)
        decision, created = await self._apply(fact)
        state = decision.state
        assert state is not None
        if created or state.status not in TERMINAL:
            await self.publish_request(state, decision.commands, _root(state), replay=not created)
            if state.status == "QUEUED" and (now := self.store.cached(state.workflow_id)):
                # A free slot started it while its request for one was sent: say so.
                state = now.state or state
        if created:
            tracing.record_root(
                f"workflow {state.workflow}",
                state.traceparent,
                caller,
                {
                    "messaging.system": "nats",
                    "messaging.operation.type": "process",
                    "workflow.id": state.workflow_id,
                    "workflow.name": state.workflow,
                },
                started_ns or time.time_ns(),
            )
        return state

    def _now_s(self) -> int:
        """The server's time now, in whole Unix seconds (a schedule's ticks)."""
        return int(epoch_s(self.clock.now()))

    async def _start_tick(self, schedule: Schedule, workflow_id: str) -> str:
        """Start one tick's workflow (idempotent by its id); its status, or why not."""
        headers = {"Tenant": schedule.tenant} if schedule.tenant else {}
        try:
            definition = await self.definitions.get(schedule.workflow, schedule.version)
            definition.validate_input(schedule.input)
        except KapellmeisterError as exc:
            # Not retried at every pass: the tick is recorded, the schedule says why.
            raise TickRefused(exc.message) from exc
        state = await self.start_from(definition, workflow_id, schedule.input, headers)
        return state.status

    async def switched_off(self, workflow: str, version: int, tenant: str) -> list[str]:
        """The tasks of ``workflow`` switched off for ``tenant``: the definition's
        ``tenants`` and the ``tenants`` bucket's ``<tenant>.<workflow>`` entry
        (``{"skip": [ref, …]}``, set by operators with ``nats kv put``)."""
        definition = await self.definitions.get(workflow, version)
        config = definition.spec.tenants.get(tenant)
        off = set(config.skip) if config else set()
        try:
            entry = await self.tenants.get(f"{kv_key(tenant)}.{kv_key(workflow)}")
            off |= set(_decode_tenant(entry.value or b"{}").skip)
        except KeyNotFoundError:
            pass
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning('tenants %s.%s is not {"skip": [...]}: %s', tenant, workflow, exc)
        unknown = off - set(definition.nodes)
        if unknown:
            log.warning("tenant %s switches off unknown tasks of %s: %s", tenant, workflow, unknown)
        return sorted(off & set(definition.nodes))

    async def request(
        self,
        fact: Fact,
        trace: Mapping[str, str] | None = None,
        *,
        caller: Mapping[str, str] | None = None,
        operation: str = "terminate",
    ) -> Decision:
        """Apply a fact a request states (a signal, a terminate, …) and publish its commands.

        Its span is a child of ``trace`` or else of the workflow's root context (from the
        saga), linked to the ``caller``'s context. A refused fact (its ``refusal`` set) or
        one for a workflow that does not exist changes and publishes nothing; the caller
        decides what that means.
        """
        if trace is None:
            known = (await self.store.load(fact.workflow_id)).state
            if known is None:  # no workflow: a 404, in nobody's trace
                return Decision(None, ())
            trace = _root(known)

        def attributes() -> dict[str, str | int]:
            return {"messaging.system": "nats", "messaging.operation.type": "process"}

        about = {"workflow.id": fact.workflow_id}
        name = f"{operation} workflow"
        with tracing.span(name, SpanKind.SERVER, trace, about, attributes, caller) as sent:
            decision, wrote = await self._apply(fact)
            if decision.state is not None:
                tracing.set_attributes({"workflow.name": decision.state.workflow})
                if wrote and decision.state.status in _FAILED:
                    error = decision.state.error
                    tracing.set_error(error.message if error else decision.state.status)
                if decision.refusal is None:
                    await self.publish_request(
                        decision.state, decision.commands, sent, replay=not wrote
                    )
        return decision

    async def publish_request(
        self,
        state: Saga,
        commands: tuple[Command, ...],
        trace: Mapping[str, str] | None = None,
        *,
        replay: bool = False,
    ) -> None:
        """Publish what a request-driven fact decided, then clear its `unpublished` mark."""
        await self.publish_decided(state, commands, trace, replay=replay)
        if state.unpublished:
            await self.mark_published(state)

    async def publish_decided(
        self,
        state: Saga,
        commands: tuple[Command, ...],
        trace: Mapping[str, str] | None = None,
        *,
        replay: bool,
        applying: int | None = None,
    ) -> None:
        """Publish a decision's commands; for a ``replay`` (a fact already applied, whose
        commands went out once already, most likely) past the dedupe window, only those
        `kapellmeister.recovery` finds missing. ``applying``: the fact's RESULTS sequence."""
        if replay and commands and is_old(state, self.clock.now()):
            commands = await self._missing(state, commands, Recovery(self.js), applying)
        await self.publish(state, commands, trace)

    async def _missing(
        self,
        state: Saga,
        commands: tuple[Command, ...],
        recovery: Recovery,
        applying: int | None = None,
    ) -> tuple[Command, ...]:
        """The recovery's three steps: stored? a result waiting? the saga moved meanwhile?"""
        before = await self.store.load(state.workflow_id, fresh=True)
        if before.state is None or before.state.updated_at != state.updated_at:
            return ()  # it moved on already: whoever moved it published what it decided
        missing = await recovery.missing(state, commands, applying)
        if missing and (await self.store.load(state.workflow_id, fresh=True)).revision != (
            before.revision
        ):
            return ()
        if missing:
            log.warning(
                "%s: republishing %d commands lost past the dedupe window",
                state.workflow_id,
                len(missing),
            )
        return tuple(missing)

    async def mark_published(self, state: Saga) -> None:
        """Clear ``unpublished`` once its commands are stored (CAS; later facts keep theirs)."""
        cause, fresh = state.unpublished, False
        while True:
            loaded = await self.store.load(state.workflow_id, fresh=fresh)
            current = loaded.state
            if current is None or current.unpublished != cause:
                return
            published = msgspec.structs.replace(current, unpublished="")
            try:
                await self.store.save(published, loaded.revision)
                self.index.note(current, published)
                return
            except CasConflict:
                fresh = True

    async def _start_child(self, command: StartWorkflow, trace: Mapping[str, str]) -> None:
        parent = command.parent
        try:
            definition = await self.definitions.get(command.workflow, command.version)
            definition.validate_input(command.input)
        except KapellmeisterError as exc:
            if parent is None:  # a failure workflow: nobody waits for it
                log.error("failure workflow %s not started: %s", command.workflow, exc.message)
                return
            # The child cannot start: fail the SUB_WORKFLOW task rather than hang it.
            failure = Failure(type=exc.code, message=exc.message, code=exc.status)
            result = TaskResult(
                workflow_id=parent.workflow_id,
                ref=parent.ref,
                attempt=parent.attempt,
                status="FAILED",
                error=failure,
            )
            await self._publish_result(
                result, {**trace, "Nats-Msg-Id": f"{command.msg_id}:refused"}
            )
            return
        # The child's root: a child of the parent's step that starts it, in its trace.
        started_ns = time.time_ns()
        traceparent = tracing.root_traceparent(f"workflow {definition.name}", trace)
        fact = Started(
            workflow_id=command.workflow_id,
            workflow=definition.name,
            version=definition.version,
            input=command.input,
            at=self.clock.now(),
            tenant=command.tenant,
            trace_id=tracing.trace_id_of(traceparent),
            traceparent=traceparent,
            tracestate=trace.get("tracestate", ""),
            parent=parent,
            priority=command.priority,
        )
        child = await self.start_workflow(fact, trace, started_ns)
        if parent is not None and child.status not in TERMINAL:
            await self._end_if_abandoned(parent, trace)

    async def _end_if_abandoned(self, parent: ParentLink, trace: Mapping[str, str]) -> None:
        """Terminate a child just started if its parent canceled the task meanwhile.

        The parent's end may have looked for the child just before another replica
        created it. Reading the parent after the create closes that race: whichever
        comes second, the parent's end or this read, sees the other.
        """
        state = (await self.store.load(parent.workflow_id, fresh=True)).state
        if state is None:
            return
        record = next((t for t in state.tasks if t.ref == parent.ref), None)
        if record is None or record.attempt != parent.attempt:
            return
        command = terminate_child(record)
        if command is not None:
            await self.publish(state, (command,), trace)

    # --- facts from the RESULTS stream --------------------------------------------------------

    async def _on_result(self, msg: Msg) -> None:
        try:
            result = _decode_result(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            await dead_letter(self.js, msg, "conductor", f"not a task result: {exc}")
            return
        # results.<workflow_id> is the conductor's own (timers, child workflows);
        # results.<workflow_id>.<task> an agent's, which may only end an attempt of
        # that task in that workflow (what NATS permissions let the agent publish).
        _, workflow_id, task = [*msg.subject.split(".", 2), ""][:3]
        if task and (workflow_id != result.workflow_id or result.timer is not None):
            reason = f"a result on {msg.subject} may only end a task {task} of {workflow_id}"
            await dead_letter(self.js, msg, "conductor", reason)
            return
        # The stream's clock stamps the fact: no comparison of two hosts' clocks.
        at = utc_text(msg.metadata.timestamp) if msg.metadata.timestamp else self.clock.now()
        if result.timer == "response":
            await self._check_heartbeat(result, at, msg.metadata.sequence.stream)
            await msg.ack()
            return

        def attributes() -> dict[str, str | int]:
            found: dict[str, str | int] = {
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.destination.template": "results.{workflow_id}",
                "messaging.operation.type": "process",
                "messaging.consumer.group.name": self._worker.durable if self._worker else "",
                "task.attempt": result.attempt,
            }
            if msg.headers and "Nats-Msg-Id" in msg.headers:
                found["messaging.message.id"] = msg.headers["Nats-Msg-Id"]
            return found

        about = {"workflow.id": result.workflow_id, "task.ref": result.ref}
        name = "process results.{workflow_id}"
        with tracing.span(name, SpanKind.CONSUMER, msg.headers, about, attributes) as trace:
            decision, wrote = await self._apply(_fact(result, at, task))
            if decision.state is not None:
                tracing.set_attributes({"workflow.name": decision.state.workflow})
            if wrote and decision.state is not None and decision.state.status in _FAILED:
                error = decision.state.error
                tracing.set_error(error.message if error else decision.state.status)
            if decision.state is not None:
                await self.publish_decided(
                    decision.state,
                    decision.commands,
                    trace,
                    replay=not wrote,
                    applying=msg.metadata.sequence.stream,
                )
        await msg.ack()

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """A task message no agent could finish: dead-letter it and fail its task."""
        try:
            advisory = _decode_max_deliveries(msg.data)
            stored = await self.js.get_msg(TASKS, seq=advisory.stream_seq)
            request = _decode_task_request(stored.data or b"")
        except (nats.errors.Error, msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("max-deliveries advisory not handled: %s", exc)
            return
        reason = f"no agent finished it in {advisory.deliveries} deliveries (poison message?)"
        await record_dead_letter(
            self.js,
            "conductor",
            reason,
            stream=TASKS,
            subject=stored.subject or "",
            sequence=advisory.stream_seq,
            headers=dict(stored.headers or {}),
            data=stored.data or b"",
        )
        failure = Failure(type="poison", message=reason, retryable=False, task=request.task)
        result = TaskResult(
            workflow_id=request.workflow_id,
            ref=request.ref,
            attempt=request.attempt,
            status="FAILED",
            error=failure,
        )
        msg_id = f"{request.workflow_id}:{request.ref}:{request.attempt}:poison"
        await self._publish_result(result, {"Nats-Msg-Id": msg_id})
        with contextlib.suppress(nats.errors.Error):
            await self.js.delete_msg(TASKS, advisory.stream_seq)

    async def _check_heartbeat(self, timer: TaskResult, at: str, firing: int) -> None:
        """An attempt's ``response`` timer fired: look at its lease (`kapellmeister.lease`).

        Alive or not yet taken: look again one response timeout from now. Silent for a
        whole timeout: cancel the lease and fail the attempt as ``response_timeout``
        (retryable, so the task's ``retry`` runs it again, elsewhere).
        """
        state = (await self.store.load(timer.workflow_id, fresh=True)).state
        record = next((t for t in state.tasks if t.ref == timer.ref), None) if state else None
        if (
            state is None
            or state.status in TERMINAL
            or record is None
            or record.attempt != timer.attempt
            or record.status not in {"SCHEDULED", "IN_PROGRESS"}
        ):
            return  # the attempt is over: nothing to watch
        definition = await self.definitions.get(state.workflow, state.version)
        node = node_of(definition, timer.ref)
        seconds = getattr(node.task, "response_timeout_s", None) if node else None
        if not seconds:
            return
        key = lease_key(timer.workflow_id, timer.ref, timer.attempt)
        seen = timer.output.get("lease") if isinstance(timer.output, dict) else None
        found, revision = await look(self.leases, key, seen if isinstance(seen, int) else 0)
        if found is Look.CANCELLED:
            return  # this firing was handled before (a redelivery)
        if found is Look.SILENT and await cancel_if_silent(self.leases, key, revision):
            failure = Failure(
                type="response_timeout",
                message=f"no heartbeat from the agent for {seconds} s (response_timeout_s)",
                retryable=True,
                task=record.name,
            )
            result = TaskResult(
                workflow_id=timer.workflow_id,
                ref=timer.ref,
                attempt=timer.attempt,
                status="FAILED",
                error=failure,
                worker=record.worker,
            )
            msg_id = f"{task_msg_id(timer.workflow_id, timer.ref, timer.attempt)}:response_timeout"
            await self._publish_result(result, {"Nats-Msg-Id": msg_id})
            return
        again = ScheduleTimer(
            msg_id=f"{task_msg_id(timer.workflow_id, timer.ref, timer.attempt)}:response@{firing}",
            workflow_id=timer.workflow_id,
            ref=timer.ref,
            attempt=timer.attempt,
            fire_at=utc_shift(at, seconds),
            purpose="response",
            lease=revision,
        )
        await self.publish(state, (again,))

    # --- the sweeper ----------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Republish what a crash between a KV write and its publish may have lost.

        A fact from a stream is redelivered after such a crash; a request (a start, a
        signal, a terminate) is not, and a server crash can lose a stored publish. So
        for every running workflow (and every finished one still marked `unpublished`)
        the sweeper republishes the dispatch of each task still waiting and the commands
        of its last fact if a request caused it. Within the dedupe window a republish is
        dropped as a duplicate if the first one went out; past it, only what
        `kapellmeister.recovery` finds missing is republished. Each workflow is looked at
        again with doubling gaps while it does not change. Returns how many workflows
        were re-driven.
        """
        now = await self.clock.sync()
        # Leave alone what was written in the last few seconds: its writer is most likely
        # publishing right now, and a republish would only be a duplicate to drop.
        newest = utc_shift(now, -self.settings.sweep_grace_s)
        active, expired = await self._to_sweep(now)
        await self._expire(expired, now)
        count = 0
        recovery = Recovery(self.js)  # one scan per subject for the whole sweep
        # Backoff is forgotten for what is no longer active; a change resets it on load.
        self._redriven = {k: v for k, v in self._redriven.items() if k in active}
        clock = asyncio.get_running_loop().time()
        semaphores = await self.limits.semaphores()  # one read, for the skip and the audit
        waiting = {id for semaphore in semaphores.values() for id in semaphore.members()}
        for workflow_id in active:
            if active[workflow_id].status == "QUEUED" and workflow_id in waiting:
                continue  # it holds or waits for its slot, in order: nothing to re-drive
            last = self._redriven.get(workflow_id)
            if last is not None and clock < last.next_at:
                continue
            state = (await self.store.load(workflow_id, fresh=True)).state
            if state is None or state.updated_at > newest:
                continue  # gone, or just written: its writer is most likely publishing
            if state.status in TERMINAL and not state.unpublished:
                self.index.note(active[workflow_id], state)  # the index was behind
                continue
            definition = await self.definitions.get(state.workflow, state.version)
            causes = {t.cause for t in state.tasks if t.status in {"SCHEDULED", "IN_PROGRESS"}}
            if state.status == "QUEUED":
                causes.add(state.last_fact)  # its request for a slot
            if state.unpublished:
                causes.add(state.unpublished)
            commands = tuple(
                c for cause in sorted(causes) for c in commands_caused_by(definition, state, cause)
            )
            if commands and is_old(state, now):
                commands = await self._missing(state, commands, recovery)
            if commands:
                try:
                    await self.publish(state, commands)
                except GatherIncomplete as exc:
                    log.error("%s", exc)  # this one waits; the others are swept
                    continue
                count += 1
            if state.unpublished:
                await self.mark_published(state)
            times = (
                last.times + 1 if last is not None and last.updated_at == state.updated_at else 1
            )
            gap = self.settings.sweep_interval_s * min(2**times, _MAX_GAP)
            self._redriven[workflow_id] = _Redrive(state.updated_at, times, clock + gap)
        # Slots whose release a crash lost go to the next in line.
        count += await self.limits.audit(semaphores)
        await self._count_deadletters()  # a figure for a gauge, after the work that matters
        return count

    async def _to_sweep(self, now: str) -> tuple[dict[str, IndexEntry], list[IndexEntry]]:
        """The workflows to look at, as the index has them: running, paused or
        `unpublished`; and the finished ones past their retention. Counts the running
        ones by name for the gauge."""
        found: dict[str, IndexEntry] = {}
        running: collections.Counter[str] = collections.Counter()
        for entry in await self.index.active():
            if entry.status not in TERMINAL and entry.status != "QUEUED":
                running[entry.workflow] += 1
            found[entry.workflow_id] = entry
        gauges = metrics()
        # Every name seen, and every one served, reports (0 is a value, absence is not).
        names = {*gauges.running, *running, *self.registry.names()}
        gauges.running = {name: running[name] for name in names}
        return found, await self._past_retentions(now)

    async def _past_retentions(self, now: str) -> list[IndexEntry]:
        """Finished workflows past their retention, oldest first, by name: the index is
        read only as far as the shortest retention of the name's versions reaches."""
        expired: list[IndexEntry] = []
        for name in self.registry.names():
            retentions = [
                self.registry.get(name, version).spec.retention_s or self.settings.retention_s
                for version in self.registry.versions(name)
            ]
            shortest = min((r for r in retentions if r is not None), default=None)
            if shortest is None:
                continue
            for entry in await self.index.finished(name, utc_shift(now, -shortest)):
                if self._past_retention(entry, now):
                    expired.append(entry)
        return expired

    def _past_retention(self, head: IndexEntry, now: str) -> bool:
        """Whether a finished workflow's retention (its definition's ``retention_s``,
        else the setting) has run out since it was last written."""
        try:
            retention = self.registry.get(head.workflow, head.version).spec.retention_s
        except KapellmeisterError:  # a definition this conductor does not know
            retention = None
        retention = retention or self.settings.retention_s
        return retention is not None and head.updated_at <= utc_shift(now, -retention)

    async def _expire(self, expired: list[IndexEntry], now: str) -> None:
        """Remove finished workflows past their retention from KV, 64 at a time."""
        for i in range(0, len(expired), 64):
            await asyncio.gather(*(self._expire_one(e, now) for e in expired[i : i + 64]))

    async def _expire_one(self, indexed: IndexEntry, now: str) -> None:
        """A purge (every revision) that only happens if the saga is still the one the
        sweep saw finished (a retry may just have made it run again), leaving a marker
        that goes in a day."""
        kv = self.store.kv
        workflow_id = indexed.workflow_id
        try:
            entry = await kv.get(workflow_id)
            head = decode_entry(entry.value or b"{}")
            # Read again: a retry may have run it again, and even finished it anew.
            if head.status not in TERMINAL or head.unpublished:
                self.index.note(indexed, head)  # the index was behind: mend its keys
                return
            if not self._past_retention(head, now):
                return
            await self.js.publish(
                self.store.subject(workflow_id),
                headers={
                    "KV-Operation": "PURGE",
                    "Nats-Rollup": "sub",
                    "Nats-Expected-Last-Subject-Sequence": str(entry.revision),
                },
                msg_ttl=PURGE_MARKER_TTL_S,
            )
        except KeyNotFoundError:
            self.index.note(indexed, None)  # gone already: so goes its index entry
            return
        except (TimeoutError, nats.errors.Error) as exc:  # changed under us, or NATS away
            log.info("%s not expired this sweep: %r", workflow_id, exc)
            return
        self.index.note(indexed, None)
        self.store.forget(workflow_id)
        await self._delete_payloads(workflow_id, entry.value or b"{}")
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            # Outputs kept for a FORK that never gathered them (the workflow failed).
            await self.js.purge_stream(f"KV_{FANOUT}", subject=f"$KV.{FANOUT}.{workflow_id}.>")
        metrics().expired.add(1, {"workflow.name": head.workflow})
        log.info("%s expired: finished, past its retention", workflow_id)

    async def _delete_payloads(self, workflow_id: str, saga: bytes) -> None:
        """Delete the payload objects an expired saga refers to and its workflow wrote
        (best effort: what is left, `collect_payloads` finds)."""
        if b'"$payload"' not in saga:
            return
        try:
            await self.payloads.delete_owned(workflow_id, msgspec.json.decode(saga))
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("payloads of %s not deleted: %r", workflow_id, exc)

    async def collect_payloads(self) -> int:
        """Delete the payload objects of workflows that no longer exist, written more
        than a sweep's grace ago; how many."""
        now = await self.clock.sync()
        before = utc_shift(now, -max(self.settings.sweep_grace_s, 1.0))
        return await self.payloads.collect(self._exists, before)

    async def _exists(self, workflow_id: str) -> bool:
        return (await self.store.load(workflow_id, fresh=True)).state is not None

    async def _count_deadletters(self) -> None:
        gauges = metrics()
        if not gauges.enabled:
            return
        try:
            gauges.deadletters = (await self.js.stream_info(DEADLETTERS)).state.messages
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("dead letters not counted: %s", exc)

    async def _sweep_forever(self) -> None:
        """Sweep every ``sweep_interval_s``; first, and every ``index_reconcile_s``,
        rebuild the index from the sagas (what a crashed process left unwritten, or a
        bucket from before the index), so a sweep after a restart sees every workflow."""
        loop = asyncio.get_running_loop()
        reconciled = collected = -math.inf
        while True:
            if loop.time() - reconciled >= self.settings.index_reconcile_s:
                try:
                    await self.index.reconcile()
                    reconciled = loop.time()
                except (TimeoutError, nats.errors.Error) as exc:
                    log.warning("index not reconciled: %r", exc)
            try:
                swept = await self.sweep()
                if swept:
                    log.info("sweeper re-drove %d workflows", swept)
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("sweep failed: %s", exc)
            if loop.time() - collected >= self.settings.payload_collect_s:
                try:
                    if removed := await self.collect_payloads():
                        log.info("removed %d payload objects of workflows gone", removed)
                    collected = loop.time()
                except (TimeoutError, nats.errors.Error) as exc:
                    log.warning("payloads not collected: %r", exc)
            self.swept.set()
            await asyncio.sleep(self.settings.sweep_interval_s)


_FAILED: Final = frozenset({"FAILED", "TIMED_OUT"})


async def _bounded(what: str, step: Awaitable[object], seconds: float) -> None:
    """Await ``step`` for at most ``seconds``; past that, log it and go on."""
    if not await within(step, seconds):
        log.warning("conductor stop: %s did not end within %.0f s; left behind", what, seconds)


_decode_tenant = msgspec.json.Decoder(TenantConfig).decode


def _destination(command: Command) -> tuple[str, str] | None:
    """The subject ``command`` is sent to: its template (the span's name), and itself."""
    match command:
        case RunTask():
            return f"tasks.{command.task}", f"tasks.{command.task}"
        case PublishEvent():
            return command.subject, command.subject
        case ScheduleTimer():
            where = f"{command.workflow_id}.{command.ref}.{command.attempt}"
            return "timers.{workflow_id}", f"timers.{where}.{command.purpose}"
        case NotifyParent():
            return "results.{workflow_id}", f"results.{command.parent.workflow_id}"
    return None


def _root(state: Saga) -> dict[str, str]:
    """The trace headers of the workflow's root context, as the saga keeps them."""
    headers = {"traceparent": state.traceparent} if state.traceparent else {}
    if state.tracestate:
        headers["tracestate"] = state.tracestate
    return headers


def _about(command: Command) -> dict[str, str | int]:
    """The task attributes of ``command``'s span."""
    match command:
        case RunTask() | ScheduleTimer():
            return {"task.ref": command.ref, "task.attempt": command.attempt}
    return {}


# The sweeper's gap between two looks at an unchanged workflow grows to this many
# intervals at most (a workflow waiting days on an approval is looked at twice an hour).
_MAX_GAP: Final = 64


class _MaxDeliveries(msgspec.Struct, frozen=True):
    """The part of JetStream's max-deliveries advisory we read."""

    stream_seq: int
    deliveries: int = 0


_decode_max_deliveries = msgspec.json.Decoder(_MaxDeliveries).decode
_decode_task_request = msgspec.json.Decoder(TaskRequest).decode


class _Redrive(NamedTuple):
    updated_at: str
    times: int
    next_at: float


def _fact(result: TaskResult, at: str, task: str = "") -> Fact:
    """The fact a task result (or a timer firing on the results stream) states; ``task``
    is the task name the result was published under (empty for the conductor's own)."""
    if result.timer == "retry":
        return RetryDue(
            workflow_id=result.workflow_id, ref=result.ref, attempt=result.attempt, at=at
        )
    if result.timer == "timeout":
        return TaskTimedOut(
            workflow_id=result.workflow_id, ref=result.ref, attempt=result.attempt, at=at
        )
    if result.timer == "workflow_timeout":
        return WorkflowTimedOut(workflow_id=result.workflow_id, at=at)
    if result.status == "FAILED" and result.error is not None:
        return TaskFailed(
            workflow_id=result.workflow_id,
            ref=result.ref,
            attempt=result.attempt,
            error=result.error,
            at=at,
            started_at=result.started_at,
            worker=result.worker,
            task=task,
        )
    return TaskCompleted(
        workflow_id=result.workflow_id,
        ref=result.ref,
        attempt=result.attempt,
        output=result.output,
        at=at,
        started_at=result.started_at,
        worker=result.worker,
        task=task,
    )
