"""Every struct that crosses the wire or lands in the KV store.

Two families with two rules (../STYLE.md, msgspec's schema evolution):

* Messages between services (`TaskRequest`, `TaskResult`, facts, commands, the saga
  state) ignore unknown fields and give new fields defaults, so replicas of different
  versions keep working together.
* What people send by hand (`StartReply` is ours, but `ListRequest` is theirs) rejects
  unknown fields, so a typo is an error rather than a silently ignored key.

Times are RFC 3339 UTC strings with millisecond precision (`utc_text`), produced by the
runtimes and carried into the pure decider on facts.
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Final, Literal

import msgspec

from kapellmeister.expressions import Json

__all__ = [
    "AcquireSlot",
    "Fanout",
    "GatherOutputs",
    "KeptOutput",
    "SlotGranted",
    "Requeued",
    "RerunRequested",
    "ChildTermination",
    "Compensating",
    "ResumeRequested",
    "PauseRequested",
    "WorkflowTimedOut",
    "TaskTimedOut",
    "RetryRequested",
    "RetryDue",
    "Attempt",
    "TerminateRequested",
    "TerminateWorkflow",
    "StartWorkflow",
    "SignalReceived",
    "ScheduleTimer",
    "Refusal",
    "ParentLink",
    "NotifyParent",
    "Command",
    "Failure",
    "Fact",
    "Json",
    "GetRequest",
    "ListRequest",
    "PublishEvent",
    "RunTask",
    "Saga",
    "StartReply",
    "Started",
    "TaskCompleted",
    "TaskFailed",
    "TaskRecord",
    "TaskRequest",
    "TaskResult",
    "TaskStatus",
    "NAME_PATTERN",
    "PAYLOAD_MARKER",
    "WORKFLOW_ID_PATTERN",
    "WorkflowStatus",
    "WorkflowSummary",
    "WorkflowSummaries",
    "TERMINAL",
    "utc_shift",
    "utc_text",
]

# A workflow id: it is a KV key and a subject token (results.<workflow_id>), so no dots.
# Use fullmatch: with match, `$` would let a trailing newline through.
WORKFLOW_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_=-]{1,128}")
# The key that makes a JSON object a claim-check reference (`kapellmeister.payloads`).
PAYLOAD_MARKER: Final = "$payload"
# A definition's name: a subject token (conductor.start.<name>) and a KV key part.
NAME_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"

# QUEUED: started, and waiting for a slot of its definition's `concurrency` limit.
WorkflowStatus = Literal[
    "QUEUED", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"
]
TaskStatus = Literal[
    "SCHEDULED", "IN_PROGRESS", "COMPLETED", "FAILED", "TIMED_OUT", "SKIPPED", "CANCELED"
]
TERMINAL: frozenset[str] = frozenset({"COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"})


def utc_text(moment: datetime.datetime) -> str:
    """RFC 3339 UTC text with milliseconds: ``2026-11-23T10:00:00.123Z``."""
    text = moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def utc_shift(text: str, seconds: float) -> str:
    """The `utc_text` time ``seconds`` after (or, negative, before) ``text``."""
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return utc_text(moment + datetime.timedelta(seconds=seconds))


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """Why a task or workflow failed: a stable slug, a message, the reply code."""

    type: str
    message: str
    code: int = 500
    retryable: bool = False
    task: str | None = None


# --- agent traffic -------------------------------------------------------------------


class TaskRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Published on ``tasks.<task>``: run this task for this workflow, this attempt."""

    workflow_id: str
    workflow: str
    ref: str
    task: str
    attempt: int
    input: msgspec.Raw
    # The task's heartbeat bound: the agent holds a lease in the ``leases`` bucket and
    # renews it every third of this; a conductor fails the attempt if renewals stop.
    response_timeout_s: float | None = None


class TaskResult(msgspec.Struct, frozen=True, kw_only=True):
    """Published by an agent on ``results.<workflow_id>.<task name>`` when a task attempt
    ends (the conductor's own timers and child workflows use ``results.<workflow_id>``)."""

    workflow_id: str
    ref: str
    attempt: int
    status: Literal["COMPLETED", "FAILED"]
    output: Json = None
    error: Failure | None = None
    started_at: str | None = None
    worker: str = ""
    # Set on results JetStream publishes for a timer: its `ScheduleTimer.purpose`.
    timer: str | None = None


# --- the saga ------------------------------------------------------------------------


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """An earlier attempt of a task, kept when it is retried."""

    attempt: int
    status: TaskStatus
    error: Failure | None = None
    started_at: str | None = None
    ended_at: str | None = None
    worker: str = ""


class ChildTermination(msgspec.Struct, frozen=True, kw_only=True):
    """A SUB_WORKFLOW attempt its parent stopped waiting for: its child is terminated too.

    ``by`` is the parent's fact that canceled the attempt; that fact's commands carry the
    termination (`TerminateWorkflow`). ``compensate`` when the parent undoes its own
    completed tasks, so the child undoes its own as well.
    """

    by: str
    reason: str
    compensate: bool = False


class Fanout(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A streamed dynamic FORK's progress: its items' records leave the saga as they
    end (their outputs are kept in the ``fanout`` bucket), so the saga stays bounded
    however many items there are."""

    # At most this many items run at once.
    parallel: int
    # Items dispatched so far: the next one's index.
    started: int = 0
    # Items ended, and which: bit i of the hex bitmap for item i.
    finished: int = 0
    done: str = ""
    # The fact that ended the last item: its commands gather the outputs.
    completed_by: str = ""
    # Item attempts of earlier runs of the FORK are at most ``floor``, so this run's
    # message and child ids are new; ``top`` is the highest this run gave.
    floor: int = 0
    top: int = 0
    # A digest of the ``over`` list, read again as items go: it must not change.
    items: str = ""


class KeptOutput(msgspec.Struct, frozen=True):
    """An ended item's output, kept in the ``fanout`` bucket under ``key`` before the
    saga that drops its record is written."""

    key: str
    output: Json


class TaskRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One task of a workflow as it ran: readable in ``nats kv get workflows <id>``.

    ``cause`` names the fact that scheduled this attempt, so a redelivered fact can give
    back exactly the commands it produced the first time.

    The contract's fields (DESIGN.md) have no default, so they are always written, null
    or not; the bookkeeping below them is written only when it differs from its default
    (a plan_day saga is about a third smaller, and every write of it cheaper).
    """

    ref: str
    name: str
    type: str
    status: TaskStatus
    attempt: int
    input: Json
    output: Json
    error: Failure | None
    scheduled_at: str | None
    started_at: str | None
    ended_at: str | None
    cause: str = ""
    worker: str = ""
    # A SUB_WORKFLOW's child workflow id.
    child: str | None = None
    # Set when the parent canceled this attempt while its child still ran.
    child_terminated: ChildTermination | None = None
    # A FORK's finished branches (static) or items (dynamic), by index.
    branches_done: list[int] | None = None
    # When this attempt is a retry waiting for its backoff, when that ends.
    retry_at: str | None = None
    # Its backoff timer fired while the workflow was PAUSED: it is dispatched at resume.
    retry_fired: bool = False
    # When this attempt times out (the task's timeout_s from its dispatch).
    timeout_at: str | None = None
    # Its timeout fired while the workflow was PAUSED: the policy applies at resume.
    timeout_fired: bool = False
    # The attempts before this one, oldest first.
    history: list[Attempt] = []
    # Why a task did not run (SKIPPED: its `when` was false).
    reason: str = ""
    # The semaphore (`slots` bucket key) of a task with a `concurrency` limit: each
    # attempt is dispatched only once it holds a slot of it.
    slot: str = ""
    # A streamed dynamic FORK's progress.
    fanout: Fanout | None = None


class ParentLink(msgspec.Struct, frozen=True, kw_only=True):
    """The SUB_WORKFLOW task a child workflow reports to when it ends."""

    workflow_id: str
    ref: str
    attempt: int


class Compensating(msgspec.Struct, frozen=True, kw_only=True):
    """A failing workflow undoing its completed tasks, last completed first."""

    status: WorkflowStatus
    error: Failure | None
    # The compensation task refs still to run, in order.
    pending: list[str]


class Requeued(msgspec.Struct, frozen=True, kw_only=True):
    """A rerun or retry of a finished workflow with a concurrency limit: it is applied
    when the workflow gets a slot again, to the workflow as it had ``ended``."""

    ended: WorkflowStatus
    fact: RerunRequested | RetryRequested


class Saga(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A workflow's whole state: the value of its key in the ``workflows`` bucket.

    As in `TaskRecord`: the contract's fields are always written, the rest only when
    they are not at their default."""

    workflow_id: str
    workflow: str
    version: int
    status: WorkflowStatus
    input: Json
    output: Json
    tenant: str
    created_at: str
    updated_at: str
    trace_id: str
    traceparent: str = ""
    tracestate: str = ""
    error: Failure | None
    variables: dict[str, Json] = {}
    tasks: tuple[TaskRecord, ...]
    parent: ParentLink | None = None
    # Tasks switched off for this workflow's tenant (fixed at start).
    switched_off: list[str] = []
    # When the workflow times out (its definition's timeout_s from its start).
    timeout_at: str | None = None
    # Tasks that finished while the workflow was PAUSED: where to go on from at resume.
    deferred: list[str] = []
    # Set while compensations run: how the workflow ends once they have.
    compensating: Compensating | None = None
    # The id of the last fact applied, and of the fact that ended the workflow.
    last_fact: str = ""
    ended_by: str = ""
    # A request (start, signal, terminate) whose events, timers or child starts may not
    # be published yet: requests are not redelivered, so the conductor clears this after
    # publishing and the sweeper republishes while it is set.
    unpublished: str = ""
    # 0-99, higher first: the order in which work waiting for a concurrency slot gets one.
    priority: int = 0
    # The semaphore of the definition's `concurrency` limit this workflow holds (or, while
    # QUEUED, waits for).
    slot: str = ""
    # A rerun or retry of a finished workflow that waits, QUEUED, for a slot.
    requeued: Requeued | None = None


# --- facts: what happened, the decider's input -----------------------------------------


class Started(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    workflow_id: str
    workflow: str
    version: int
    input: Json
    at: str
    tenant: str = ""
    trace_id: str = ""
    traceparent: str = ""
    tracestate: str = ""
    parent: ParentLink | None = None
    # Tasks switched off for the workflow's tenant (the definition's and the `tenants`
    # bucket's), fixed at start: a later change of the configuration affects new ones.
    switched_off: list[str] = []
    # The `Priority` header of the start (0-99); None: the definition's `priority`.
    priority: int | None = None


class TaskCompleted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    workflow_id: str
    ref: str
    attempt: int
    output: Json
    at: str
    started_at: str | None = None
    worker: str = ""
    # The task name the result was published under (empty: the conductor's own): a
    # result is only taken for a task of that name.
    task: str = ""


class TaskFailed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    workflow_id: str
    ref: str
    attempt: int
    error: Failure
    at: str
    started_at: str | None = None
    worker: str = ""
    task: str = ""  # as in TaskCompleted


class SignalReceived(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``conductor.signal.<workflow_id>.<ref>``: completes a waiting WAIT task."""

    workflow_id: str
    ref: str
    output: Json
    at: str


class RetryDue(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A retry's backoff is over: dispatch attempt ``attempt`` of ``ref``."""

    workflow_id: str
    ref: str
    attempt: int
    at: str


class TaskTimedOut(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Attempt ``attempt`` of ``ref`` ran past its ``timeout_s`` (a timer fired)."""

    workflow_id: str
    ref: str
    attempt: int
    at: str


class WorkflowTimedOut(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The workflow ran past its definition's ``timeout_s`` (a timer fired)."""

    workflow_id: str
    at: str


class PauseRequested(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``conductor.pause.<workflow_id>``: dispatch nothing new; record what arrives."""

    workflow_id: str
    at: str


class ResumeRequested(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``conductor.resume.<workflow_id>``: go on from where the results got to."""

    workflow_id: str
    at: str


class RerunRequested(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``conductor.rerun.<workflow_id>`` ``{"task": ref}``: run again from ``task``.

    The task and everything downstream of it are invalidated (their earlier runs kept in
    each task's history); what ran before it keeps its outputs.
    """

    workflow_id: str
    task: str
    at: str


class RetryRequested(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``conductor.retry.<workflow_id>``: run the failed task again, keeping its history."""

    workflow_id: str
    at: str


class TerminateRequested(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``conductor.terminate.<workflow_id>``: end the workflow TERMINATED now."""

    workflow_id: str
    reason: str
    at: str
    # Run the compensations of the completed tasks before ending TERMINATED.
    compensate: bool = False


class SlotGranted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A QUEUED workflow got a slot of its definition's concurrency limit: it runs now."""

    workflow_id: str
    at: str


Fact = (
    Started
    | TaskCompleted
    | TaskFailed
    | SignalReceived
    | TerminateRequested
    | RetryDue
    | RetryRequested
    | TaskTimedOut
    | WorkflowTimedOut
    | PauseRequested
    | ResumeRequested
    | RerunRequested
    | SlotGranted
)


# --- commands: what to do, the decider's output ----------------------------------------


class RunTask(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Publish a `TaskRequest` on ``tasks.<task>`` with ``Nats-Msg-Id: msg_id``."""

    msg_id: str
    workflow_id: str
    workflow: str
    ref: str
    task: str
    attempt: int
    input: Json
    response_timeout_s: float | None = None
    # Dispatched only once it holds a slot of semaphore ``slot`` (at most ``limit``
    # holders; waiters are served by ``priority``, then in order of arrival).
    slot: str = ""
    limit: int = 0
    priority: int = 0


class GatherOutputs(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Gather a streamed FORK's item outputs (kept in the ``fanout`` bucket) into the
    list its output names: object ``name`` of the ``payloads`` bucket. Carried out before
    the other commands of its decision, which may pass that output on."""

    msg_id: str
    workflow_id: str
    ref: str
    attempt: int
    items: int
    name: str


class AcquireSlot(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Take a slot of semaphore ``slot`` for a QUEUED workflow, or wait in its queue; the
    grant is applied as the workflow's `SlotGranted`."""

    msg_id: str
    workflow_id: str
    slot: str
    limit: int
    priority: int = 0


class PublishEvent(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Publish ``data`` on an ``events.…`` subject with ``Nats-Msg-Id: msg_id``."""

    msg_id: str
    subject: str
    data: Json


class ScheduleTimer(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Have JetStream deliver a result for ``ref`` at ``fire_at``.

    ``purpose`` "delay": a completed result (a DELAY is over); "retry": a `RetryDue`;
    "timeout" / "workflow_timeout": a task's or the workflow's ``timeout_s`` is over;
    "response": time to check the attempt's heartbeat lease (``lease`` is the lease
    revision the previous check saw, 0 for none).
    """

    msg_id: str
    workflow_id: str
    ref: str
    attempt: int
    fire_at: str
    purpose: Literal["delay", "retry", "timeout", "workflow_timeout", "response"] = "delay"
    lease: int = 0


class StartWorkflow(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Start a child workflow (a SUB_WORKFLOW task); idempotent by ``workflow_id``."""

    msg_id: str
    workflow_id: str
    workflow: str
    version: int | None
    input: Json
    tenant: str
    # None for a failure workflow: it reports to nobody.
    parent: ParentLink | None
    # The parent's priority (None: the child definition's).
    priority: int | None = None


class NotifyParent(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Report a finished child workflow to its parent as the result of its SUB_WORKFLOW."""

    msg_id: str
    parent: ParentLink
    child: str
    status: WorkflowStatus
    output: Json
    error: Failure | None = None


class TerminateWorkflow(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Terminate a child workflow whose parent ended (or stopped waiting for it).

    Not a message: the runtime applies it as the child's `TerminateRequested`, the way
    ``conductor.terminate.<workflow_id>`` does. ``msg_id`` is as deterministic as every
    command's, but a repeat is made harmless by the child's state: once it has ended, it
    refuses the request.
    """

    msg_id: str
    workflow_id: str
    reason: str
    compensate: bool = False


Command = (
    RunTask
    | PublishEvent
    | ScheduleTimer
    | StartWorkflow
    | NotifyParent
    | TerminateWorkflow
    | AcquireSlot
    | GatherOutputs
)


class Refusal(msgspec.Struct, frozen=True):
    """Why a request-driven fact was not applied: a micro error code and message."""

    code: int
    message: str


# --- the public request/reply payloads -------------------------------------------------


class StartReply(msgspec.Struct, frozen=True):
    workflow_id: str
    status: WorkflowStatus


class GetRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``conductor.get.<id>``'s optional body: ``inline`` the payloads it refers to."""

    inline: bool = False


class ListRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``conductor.list``: filters, all optional; newest first."""

    status: WorkflowStatus | None = None
    # It goes into the index's subject filter: a definition's name, no wildcard.
    workflow: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    tenant: str | None = None
    # Created at or after ``since`` and before ``until`` (RFC 3339; no offset means UTC).
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None

    def created_range(self) -> tuple[str | None, str | None]:
        """``since`` and ``until`` as the saga's UTC text, comparable with ``created_at``."""
        return _utc_or_none(self.since), _utc_or_none(self.until)


def _utc_or_none(moment: datetime.datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return utc_text(moment)


class WorkflowSummary(msgspec.Struct, frozen=True):
    workflow_id: str
    workflow: str
    version: int
    status: WorkflowStatus
    tenant: str
    created_at: str
    updated_at: str


class WorkflowSummaries(msgspec.Struct, frozen=True):
    workflows: list[WorkflowSummary]
