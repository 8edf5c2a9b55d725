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
in a non-terminal workflow updated within the dedupe window.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import uuid
from collections.abc import Mapping
from typing import Final

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service
from opentelemetry.trace import SpanKind

from kapellmeister import tracing
from kapellmeister.config import Settings
from kapellmeister.consumer import PullWorker
from kapellmeister.deadletter import dead_letter
from kapellmeister.decider import Decision, commands_caused_by, decide
from kapellmeister.errors import BadRequest, WorkflowNotFound
from kapellmeister.messages import (
    TERMINAL,
    Command,
    Fact,
    ListRequest,
    PublishEvent,
    RunTask,
    Saga,
    Started,
    StartReply,
    TaskCompleted,
    TaskFailed,
    TaskRequest,
    TaskResult,
    WorkflowSummaries,
    WorkflowSummary,
    utc_text,
)
from kapellmeister.micro import add_endpoint
from kapellmeister.registry import Registry
from kapellmeister.runtime import utc_now
from kapellmeister.store import CasConflict, SagaStore, Versioned
from kapellmeister.topology import (
    DEDUPE_WINDOW_S,
    RESULTS,
    ensure_buckets,
    ensure_consumer,
    ensure_streams,
)

__all__ = ["Conductor", "WORKFLOW_ID_PATTERN"]

log = logging.getLogger("kapellmeister.conductor")

# Ids appear in subjects (conductor.get.<id>) and KV keys: no dots, no spaces.
WORKFLOW_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_=-]{1,128}$")
_encode = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode
_decode_result = msgspec.json.Decoder(TaskResult).decode
_decode_list = msgspec.json.Decoder(ListRequest).decode


class Conductor:
    """Serves ``conductor.*`` requests and applies task results to sagas."""

    def __init__(self, settings: Settings, registry: Registry, *, version: str = "0.1.0") -> None:
        self.settings = settings
        self.registry = registry
        self.version = version
        self.conflicts = 0
        self._js: JetStreamContext | None = None
        self._store: SagaStore | None = None
        self._service: Service | None = None
        self._worker: PullWorker | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # What the sweeper re-drove, by workflow: the updated_at it saw. A workflow is
        # re-driven once per state, not at every sweep while a long task runs.
        self._redriven: dict[str, str] = {}

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "start() first"
        return self._js

    @property
    def store(self) -> SagaStore:
        assert self._store is not None, "start() first"
        return self._store

    async def start(self, nc: Client) -> None:
        """Create what is missing, then serve requests, consume results and sweep."""
        settings = self.settings
        self._js = nc.jetstream()
        await ensure_streams(self._js, settings.replicas)
        buckets = await ensure_buckets(self._js, settings.replicas)
        self._store = SagaStore(buckets["workflows"])
        durable = await ensure_consumer(
            self._js, RESULTS, "results.>", ack_wait_s=settings.ack_wait_s, max_deliver=-1
        )
        self._worker = PullWorker(
            "conductor", nc, RESULTS, durable, self._on_result, settings.concurrency
        )
        await self._worker.start()
        service = await add_service(
            nc,
            name="conductor",
            version=self.version,
            description="kapellmeister conductor: workflows as sagas in KV",
        )
        for name, subject, handler in (
            ("start", "conductor.start.*", self._on_start),
            ("get", "conductor.get.*", self._on_get),
            ("list", "conductor.list", self._on_list),
        ):
            await add_endpoint(service, name, subject, handler, settings.concurrency)
        self._service = service
        self._sweeper = asyncio.create_task(self._sweep_forever())
        log.info("conductor: serving %s", ", ".join(self.registry.names()))

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._worker is not None:
            await self._worker.stop(self.settings.ack_wait_s)
        if self._service is not None:
            await self._service.stop()

    # --- the five steps -------------------------------------------------------------------

    async def apply(self, fact: Fact) -> Decision:
        """Load, decide and compare-and-set until the write lands or nothing changes."""
        decision, _ = await self._apply(fact)
        return decision

    async def _apply(self, fact: Fact) -> tuple[Decision, bool]:
        """`apply`, also saying whether this call wrote the saga."""
        fresh = False
        while True:
            if isinstance(fact, Started) and not fresh:
                # A new workflow most likely: try the create straight away, read on conflict.
                loaded = self.store.cached(fact.workflow_id) or Versioned(None, 0)
            else:
                loaded = await self.store.load(fact.workflow_id, fresh=fresh)
            state = loaded.state
            if state is not None:
                definition = self.registry.get(state.workflow, state.version)
            elif isinstance(fact, Started):
                definition = self.registry.get(fact.workflow, fact.version)
            else:
                return Decision(None, ()), False  # a result for a workflow that is not stored
            decision = decide(definition, state, fact)
            if decision.state is state:
                if not fresh and not decision.commands:
                    # A no-op on a cached state may only mean the cache is behind.
                    fresh = True
                    continue
                return decision, False
            assert decision.state is not None
            try:
                await self.store.save(decision.state, loaded.revision)
            except CasConflict:
                self.conflicts += 1
                fresh = True
                continue
            return decision, True

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
            trace = {"traceparent": state.traceparent} if state.traceparent else {}
        await asyncio.gather(*(self._publish_one(c, trace) for c in commands))

    async def _publish_one(self, command: Command, trace: Mapping[str, str]) -> None:
        headers = {**trace, "Nats-Msg-Id": command.msg_id}
        match command:
            case RunTask():
                request = TaskRequest(
                    workflow_id=command.workflow_id,
                    workflow=command.workflow,
                    ref=command.ref,
                    task=command.task,
                    attempt=command.attempt,
                    input=msgspec.Raw(_encode(command.input)),
                )
                await self.js.publish(f"tasks.{command.task}", _encode(request), headers=headers)
            case PublishEvent():
                await self.js.publish(command.subject, _encode(command.data), headers=headers)

    # --- facts from the RESULTS stream --------------------------------------------------------

    async def _on_result(self, msg: Msg) -> None:
        try:
            result = _decode_result(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            await dead_letter(self.js, msg, "conductor", f"not a task result: {exc}")
            return
        # The stream's clock stamps the fact: no comparison of two hosts' clocks.
        at = utc_text(msg.metadata.timestamp) if msg.metadata.timestamp else utc_now()
        attributes: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.destination.name": msg.subject,
            "workflow.id": result.workflow_id,
            "task.ref": result.ref,
            "task.attempt": result.attempt,
        }
        with tracing.step("conductor decide", msg.headers, SpanKind.CONSUMER, attributes) as trace:
            decision = await self.apply(_fact(result, at))
            if decision.state is not None:
                await self.publish(decision.state, decision.commands, trace)
        await msg.ack()

    # --- requests -----------------------------------------------------------------------------

    async def _on_start(self, request: Request) -> bytes:
        name = request.subject.split(".", 2)[2]
        headers = request.headers or {}
        version = _int_header(headers, "Workflow-Version")
        definition = self.registry.get(name, version)
        data = _decode_json(request.data or b"{}")
        definition.validate_input(data)
        workflow_id = headers.get("Workflow-Id") or str(uuid.uuid4())
        if not WORKFLOW_ID_PATTERN.match(workflow_id):
            raise BadRequest(
                "Workflow-Id must be 1-128 of A-Z a-z 0-9 _ = - (it is used in subjects)"
            )
        with tracing.tracer().start_as_current_span(
            f"workflow {name}",
            context=tracing.extract(headers),
            kind=SpanKind.SERVER,
            attributes={
                "messaging.system": "nats",
                "workflow.id": workflow_id,
                "workflow.name": name,
            },
        ):
            fact = Started(
                workflow_id=workflow_id,
                workflow=definition.name,
                version=definition.version,
                input=data,
                at=utc_now(),
                tenant=headers.get("Tenant", ""),
                trace_id=tracing.current_trace_id(),
                traceparent=tracing.inject({}).get("traceparent", ""),
            )
            decision, created = await self._apply(fact)
            assert decision.state is not None
            # A repeated start republishes what the first one did, in case it crashed before
            # publishing; but not for a finished workflow, whose events are long out.
            if created or decision.state.status not in TERMINAL:
                await self.publish(decision.state, decision.commands, tracing.inject({}))
        return _encode(
            StartReply(workflow_id=decision.state.workflow_id, status=decision.state.status)
        )

    async def _on_get(self, request: Request) -> bytes:
        workflow_id = request.subject.split(".", 2)[2]
        if not WORKFLOW_ID_PATTERN.match(workflow_id):
            raise WorkflowNotFound(f"no workflow with id {workflow_id!r}")
        try:
            entry = await self.store.kv.get(workflow_id)
        except KeyNotFoundError:
            raise WorkflowNotFound(f"no workflow with id {workflow_id!r}") from None
        return entry.value or b""

    async def _on_list(self, request: Request) -> bytes:
        query = _decode_list(request.data or b"{}")
        found = [
            summary
            async for summary in self.store.scan(WorkflowSummary)
            if (query.status is None or summary.status == query.status)
            and (query.workflow is None or summary.workflow == query.workflow)
        ]
        found.sort(key=lambda s: s.created_at, reverse=True)
        return _encode(WorkflowSummaries(workflows=found[: query.limit]))

    # --- the sweeper ----------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Republish the dispatch of every SCHEDULED task of recently updated running workflows.

        Only workflows updated within the dedupe window are re-driven: there a republish
        is certainly dropped as a duplicate if the first one went out. Returns how many
        workflows were re-driven.
        """
        now = utc_now()
        oldest = utc_text(_parse(now) - _seconds(DEDUPE_WINDOW_S * 0.8))
        count = 0
        recent = {
            summary.workflow_id: summary.updated_at
            async for summary in self.store.scan(WorkflowSummary)
            if summary.status not in TERMINAL and summary.updated_at >= oldest
        }
        self._redriven = {k: v for k, v in self._redriven.items() if recent.get(k) == v}
        for workflow_id, updated_at in recent.items():
            if self._redriven.get(workflow_id) == updated_at:
                continue
            state = (await self.store.load(workflow_id, fresh=True)).state
            if state is None or state.status in TERMINAL:
                continue
            definition = self.registry.get(state.workflow, state.version)
            causes = {t.cause for t in state.tasks if t.status == "SCHEDULED"}
            commands = tuple(
                c for cause in sorted(causes) for c in commands_caused_by(definition, state, cause)
            )
            if commands:
                await self.publish(state, commands)
                count += 1
            self._redriven[workflow_id] = state.updated_at
        return count

    async def _sweep_forever(self) -> None:
        while True:
            try:
                swept = await self.sweep()
                if swept:
                    log.info("sweeper re-drove %d workflows", swept)
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("sweep failed: %s", exc)
            await asyncio.sleep(self.settings.sweep_interval_s)


def _fact(result: TaskResult, at: str) -> TaskCompleted | TaskFailed:
    """The fact a task result states."""
    if result.status == "FAILED" and result.error is not None:
        return TaskFailed(
            workflow_id=result.workflow_id,
            ref=result.ref,
            attempt=result.attempt,
            error=result.error,
            at=at,
            started_at=result.started_at,
            worker=result.worker,
        )
    return TaskCompleted(
        workflow_id=result.workflow_id,
        ref=result.ref,
        attempt=result.attempt,
        output=result.output,
        at=at,
        started_at=result.started_at,
        worker=result.worker,
    )


def _int_header(headers: dict[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"header {name} must be an integer, got {value!r}") from None


def _parse(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _seconds(n: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=n)
