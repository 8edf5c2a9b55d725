"""The conductor's public request API (``conductor.*``), served as NATS micro endpoints.

Each handler validates its request, turns it into a fact or a read, and answers with the
contract's JSON; every error becomes a micro error reply in `kapellmeister.micro`.
Request-driven facts (start, signal, terminate) go through the same load, decide,
compare-and-set, publish steps as task results (`Conductor.apply`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from kapellmeister.errors import (
    BadRequest,
    Conflict,
    NotFound,
    ScheduleNotFound,
    WorkflowNotFound,
)
from kapellmeister.messages import (
    WORKFLOW_ID_PATTERN,
    Fact,
    GetRequest,
    ListRequest,
    PauseRequested,
    RerunRequested,
    ResumeRequested,
    RetryRequested,
    SignalReceived,
    StartReply,
    TerminateRequested,
    WorkflowSummaries,
)
from kapellmeister.micro import add_endpoint
from kapellmeister.schedules import SCHEDULE_NAME, ScheduleSpec

if TYPE_CHECKING:
    from kapellmeister.conductor import Conductor

__all__ = ["serve_api"]

# Ids appear in subjects (conductor.get.<id>) and KV keys: no dots, no spaces.
_encode = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode
_decode_list = msgspec.json.Decoder(ListRequest).decode
_decode_get = msgspec.json.Decoder(GetRequest).decode


class TerminateRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``conductor.terminate.<id>``: an optional reason, kept in the saga's error.

    ``compensate``: run the compensations of the completed tasks before ending.
    """

    reason: str = ""
    compensate: bool = False


_decode_terminate = msgspec.json.Decoder(TerminateRequest).decode


class RerunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``conductor.rerun.<id>``: the task ref to run again from."""

    task: str


_decode_rerun = msgspec.json.Decoder(RerunRequest).decode
_decode_schedule = msgspec.json.Decoder(ScheduleSpec).decode


class Registered(msgspec.Struct, frozen=True):
    """The reply to ``conductor.definitions.register``."""

    name: str
    version: int


async def serve_api(conductor: Conductor, nc: Client) -> Service:
    """Add the ``conductor`` micro service with every endpoint of the public API."""
    service = await add_service(
        nc,
        name="conductor",
        version=conductor.version,
        description="kapellmeister conductor: workflows as sagas in KV",
    )
    api = _Api(conductor)
    endpoints: list[tuple[str, str, Callable[[Request], Awaitable[bytes]]]] = [
        ("start", "conductor.start.*", api.start),
        ("get", "conductor.get.*", api.get),
        ("list", "conductor.list", api.list),
        ("signal", "conductor.signal.*.*", api.signal),
        ("terminate", "conductor.terminate.*", api.terminate),
        ("retry", "conductor.retry.*", api.retry),
        ("pause", "conductor.pause.*", api.pause),
        ("rerun", "conductor.rerun.*", api.rerun),
        ("resume", "conductor.resume.*", api.resume),
        ("definitions-register", "conductor.definitions.register", api.register),
        ("definitions-get", "conductor.definitions.get.*", api.definition),
        ("definitions-list", "conductor.definitions.list", api.definitions),
        ("schedules-create", "conductor.schedules.create", api.schedule_create),
        ("schedules-list", "conductor.schedules.list", api.schedules),
        ("schedules-get", "conductor.schedules.get.*", api.schedule),
        ("schedules-pause", "conductor.schedules.pause.*", api.schedule_pause),
        ("schedules-resume", "conductor.schedules.resume.*", api.schedule_resume),
        ("schedules-delete", "conductor.schedules.delete.*", api.schedule_delete),
    ]
    for name, subject, handler in endpoints:
        await add_endpoint(service, name, subject, handler, conductor.settings.concurrency)
    return service


def _token(request: Request, index: int) -> str:
    return request.subject.split(".")[index]


def _workflow_id(request: Request, index: int = 2) -> str:
    workflow_id = _token(request, index)
    if not WORKFLOW_ID_PATTERN.fullmatch(workflow_id):
        raise WorkflowNotFound(f"no workflow with id {workflow_id!r}")
    return workflow_id


class _Api:
    def __init__(self, conductor: Conductor) -> None:
        self.conductor = conductor

    async def start(self, request: Request) -> bytes:
        name = _token(request, 2)
        headers = request.headers or {}
        version = _int_header(headers, "Workflow-Version")
        definition = await self.conductor.definitions.get(name, version)
        data = _decode_json(request.data or b"{}")
        definition.validate_input(data)
        workflow_id = headers.get("Workflow-Id") or str(uuid.uuid4())
        if not WORKFLOW_ID_PATTERN.fullmatch(workflow_id):
            raise BadRequest(
                "Workflow-Id must be 1-128 of A-Z a-z 0-9 _ = - (it is used in subjects)"
            )
        priority = _int_header(headers, "Priority")
        if priority is not None and not 0 <= priority <= 99:
            raise BadRequest(f"header Priority must be 0-99, got {priority}")
        state = await self.conductor.start_from(
            definition, workflow_id, data, headers, priority=priority
        )
        return _encode(StartReply(workflow_id=state.workflow_id, status=state.status))

    async def get(self, request: Request) -> bytes:
        workflow_id = _workflow_id(request)
        query = _decode_get((request.data or b"").strip() or b"{}")
        try:
            entry = await self.conductor.store.kv.get(workflow_id)
        except KeyNotFoundError:
            raise WorkflowNotFound(f"no workflow with id {workflow_id!r}") from None
        saga = entry.value or b""
        if not query.inline or b'"$payload"' not in saga:
            return saga
        # What the references say they weigh first: a refusal fetches nothing.
        room = self.conductor.nc.max_payload - _REPLY_MARGIN
        named = await self.conductor.payloads.sizes(msgspec.json.decode(saga))
        if len(saga) + named > room:
            raise self._too_big(workflow_id, len(saga) + named)
        inlined = await self.conductor.payloads.resolve(saga, workflow_id)
        if len(inlined) > room:
            raise self._too_big(workflow_id, len(inlined))
        return inlined

    def _too_big(self, workflow_id: str, size: int) -> BadRequest:
        return BadRequest(
            f"workflow {workflow_id} with its payloads inlined is about {size} bytes, more "
            f"than a NATS message may carry ({self.conductor.nc.max_payload}): get it "
            "without inline and fetch each with `nats object get payloads <name>`"
        )

    async def list(self, request: Request) -> bytes:
        query = _decode_list(request.data or b"{}")
        since, until = query.created_range()
        found = await self.conductor.index.newest(
            query.status, query.workflow, query.limit, tenant=query.tenant, since=since, until=until
        )
        return _encode(WorkflowSummaries(workflows=found))

    async def signal(self, request: Request) -> bytes:
        workflow_id, ref = _workflow_id(request), _token(request, 3)
        output = _decode_json(request.data or b"{}")
        return await self._request_fact(
            request,
            SignalReceived(
                workflow_id=workflow_id, ref=ref, output=output, at=self.conductor.clock.now()
            ),
        )

    async def terminate(self, request: Request) -> bytes:
        body = _decode_terminate(request.data or b"{}")
        return await self._request_fact(
            request,
            TerminateRequested(
                workflow_id=_workflow_id(request),
                reason=body.reason,
                compensate=body.compensate,
                at=self.conductor.clock.now(),
            ),
        )

    async def retry(self, request: Request) -> bytes:
        return await self._request_fact(
            request,
            RetryRequested(workflow_id=_workflow_id(request), at=self.conductor.clock.now()),
        )

    async def rerun(self, request: Request) -> bytes:
        body = _decode_rerun(request.data or b"")
        return await self._request_fact(
            request,
            RerunRequested(
                workflow_id=_workflow_id(request), task=body.task, at=self.conductor.clock.now()
            ),
        )

    async def pause(self, request: Request) -> bytes:
        return await self._request_fact(
            request,
            PauseRequested(workflow_id=_workflow_id(request), at=self.conductor.clock.now()),
        )

    async def resume(self, request: Request) -> bytes:
        return await self._request_fact(
            request,
            ResumeRequested(workflow_id=_workflow_id(request), at=self.conductor.clock.now()),
        )

    async def register(self, request: Request) -> bytes:
        definition = await self.conductor.definitions.register(request.data or b"")
        # Its triggers listen from the reply on: an event published right after it starts
        # the workflow.
        await self.conductor.sync_triggers()
        return _encode(Registered(name=definition.name, version=definition.version))

    async def definition(self, request: Request) -> bytes:
        version = _int_header(request.headers or {}, "Workflow-Version")
        return await self.conductor.definitions.raw(_token(request, 3), version)

    async def definitions(self, request: Request) -> bytes:
        return _encode(self.conductor.definitions.summaries())

    async def schedule_create(self, request: Request) -> bytes:
        spec = _decode_schedule(request.data or b"")
        # What it starts must exist and take its input, now; a tick that later cannot
        # (the definition changed) is recorded with the reason, not retried for ever.
        definition = await self.conductor.definitions.get(spec.workflow, spec.version)
        definition.validate_input(spec.input)
        schedule = await self.conductor.scheduler.create(spec, self.conductor.clock.now())
        return _encode(schedule)

    async def schedules(self, request: Request) -> bytes:
        return _encode(await self.conductor.scheduler.list())

    async def schedule(self, request: Request) -> bytes:
        return _encode(await self.conductor.scheduler.get(_schedule_name(request)))

    async def schedule_pause(self, request: Request) -> bytes:
        return _encode(await self.conductor.scheduler.pause(_schedule_name(request)))

    async def schedule_resume(self, request: Request) -> bytes:
        return _encode(await self.conductor.scheduler.resume(_schedule_name(request)))

    async def schedule_delete(self, request: Request) -> bytes:
        name = _schedule_name(request)
        brought = self.conductor.brought_schedules().get(name)
        if brought is not None:
            # It would be stored again at the next registration or conductor start.
            raise Conflict(
                f"schedule {name!r} comes with the definition {brought.workflow}: pause it, "
                f"or register a version of {brought.workflow} without it"
            )
        return _encode(await self.conductor.scheduler.delete(name))

    async def _request_fact(self, request: Request, fact: Fact) -> bytes:
        """Apply a fact a request states; reply with the saga state after it."""
        operation = request.subject.split(".")[1]
        decision = await self.conductor.request(fact, caller=request.headers, operation=operation)
        if decision.state is None:
            raise WorkflowNotFound(f"no workflow with id {fact.workflow_id!r}")
        if decision.refusal is not None:
            error = NotFound if decision.refusal.code == 404 else Conflict
            raise error(decision.refusal.message)
        return _encode(decision.state)


def _schedule_name(request: Request) -> str:
    name = _token(request, 3)
    if not SCHEDULE_NAME.fullmatch(name):
        raise ScheduleNotFound(f"no schedule named {name!r}")
    return name


# Room left in a reply for its headers.
_REPLY_MARGIN: Final = 4096


def _int_header(headers: dict[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"header {name} must be an integer, got {value!r}") from None
