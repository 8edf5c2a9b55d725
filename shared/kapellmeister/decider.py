"""The conductor's pure saga logic: ``decide(definition, state, fact) -> Decision``.

No I/O, no clock, no randomness: time and ids come in on the fact. Given the same
definition, state and fact it always returns the same decision, which is what lets any
number of conductor replicas race on a workflow with compare-and-set as the only lock.

Redelivery is the normal case, not an edge case. Each task record remembers the fact
that scheduled it (``cause``), the saga remembers the fact that ended it (``ended_by``),
and the commands of a decision are derived from the new state as "everything this fact
caused" (`commands_caused_by`). So a fact applied a second time, after a crash between
the KV write and the publish, gives back the same state and the same commands, and
message-id dedupe drops the copies downstream.

A workflow that ends, or stops waiting (its compensations begin), cancels what still
waits. A canceled SUB_WORKFLOW attempt keeps ``child_terminated``: the canceling fact's
commands then include a `TerminateWorkflow` for its child, which the runtime applies as
the child's own terminate, so the ending runs down the tree.

The walk: `_run` starts a task; tasks that finish inside the decision (SWITCH, EVENT,
SET_VARIABLE, JOIN, TERMINATE) go straight on with `_finish_task`, which follows the
task's `After`: the next task, the end of a FORK branch (the FORK completes once every
branch has), or the end of the workflow. SIMPLE, WAIT, DELAY and SUB_WORKFLOW stop the
walk until their result comes back as a fact.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final, Literal

import msgspec

from kapellmeister.definitions import (
    Concurrency,
    Definition,
    DelayTask,
    EventTask,
    ForkTask,
    GraphPlan,
    GraphTask,
    JoinTask,
    Node,
    RetryPolicy,
    SetVariableTask,
    SimpleTask,
    SubWorkflowTask,
    SwitchTask,
    TaskDef,
    TerminateTask,
    WaitTask,
    slot_name,
)
from kapellmeister.expressions import Json, switch_key
from kapellmeister.messages import (
    PAYLOAD_MARKER,
    TERMINAL,
    AcquireSlot,
    Attempt,
    ChildTermination,
    Command,
    Compensating,
    Fact,
    Failure,
    Fanout,
    GatherOutputs,
    KeptOutput,
    NotifyParent,
    ParentLink,
    PauseRequested,
    PublishEvent,
    Refusal,
    Requeued,
    RerunRequested,
    ResumeRequested,
    RetryDue,
    RetryRequested,
    RunTask,
    Saga,
    ScheduleTimer,
    SignalReceived,
    SlotGranted,
    Started,
    StartWorkflow,
    TaskCompleted,
    TaskFailed,
    TaskRecord,
    TaskStatus,
    TaskTimedOut,
    TerminateRequested,
    TerminateWorkflow,
    WorkflowStatus,
    WorkflowTimedOut,
    utc_shift,
)

__all__ = [
    "Decision",
    "by_request",
    "child_workflow_id",
    "commands_caused_by",
    "decide",
    "fact_id",
    "node_of",
    "output_key",
    "task_msg_id",
    "terminate_child",
]

START: Final = "start"
# A dynamic FORK over more items than this is streamed even without `max_parallel`,
# with this many at once.
STREAM_OVER: Final = 1000
STREAM_PARALLEL: Final = 250
# The fact id of a QUEUED workflow's slot grant (see `_slot_granted`).
SLOT: Final = "slot"
_WAITING: Final = frozenset({"SCHEDULED", "IN_PROGRESS"})
_INSTANCE: Final = re.compile(r"^(?P<ref>[A-Za-z_][A-Za-z0-9_]*)\[(?P<index>\d+)\]$")


class Decision(msgspec.Struct, frozen=True):
    """The new state (the same object when nothing changed) and the commands to emit.

    ``refusal`` is set when a request-driven fact (a signal, a terminate) does not apply
    to the workflow as it is: the runtime replies with its code and changes nothing.
    """

    state: Saga | None
    commands: tuple[Command, ...]
    refusal: Refusal | None = None
    # Outputs of streamed FORK items whose records this decision drops: the runtime
    # keeps them (`output_key`) before it writes the state.
    outputs: tuple[KeptOutput, ...] = ()


def fact_id(fact: Fact) -> str:
    """The id of a fact within its workflow: what records name as their cause."""
    match fact:
        case Started():
            return START
        case TaskCompleted(ref=ref, attempt=attempt) | TaskFailed(ref=ref, attempt=attempt):
            return f"{ref}#{attempt}"
        case SignalReceived(ref=ref):
            return f"signal:{ref}"
        case RetryDue(ref=ref, attempt=attempt):
            return f"{ref}#{attempt}:due"
        case TaskTimedOut(ref=ref, attempt=attempt):
            return f"{ref}#{attempt}:timeout"
        case WorkflowTimedOut():
            return "workflow:timeout"
        case SlotGranted():
            return SLOT
    return _operator_fact_id(fact)


def _operator_fact_id(fact: Fact) -> str:
    """The ids of the operator's facts: terminate, retry, pause, resume, rerun."""
    match fact:
        case TerminateRequested():
            return "terminate"
        case RetryRequested(at=at):
            return f"retry@{at}"
        case PauseRequested(at=at):
            return f"pause@{at}"
        case RerunRequested(task=task, at=at):
            return f"rerun:{task}@{at}"
        case ResumeRequested(at=at):
            return f"resume@{at}"
    raise TypeError(f"not a fact: {fact!r}")  # pragma: no cover - every fact is matched


def task_msg_id(workflow_id: str, ref: str, attempt: int) -> str:
    """The ``Nats-Msg-Id`` of a task attempt's request; its result and events derive from it."""
    return f"{workflow_id}:{ref}:{attempt}"


def child_workflow_id(workflow_id: str, ref: str, attempt: int) -> str:
    """The id of the child a SUB_WORKFLOW task starts: the same on every redelivery."""
    return f"{workflow_id}-{ref.replace('[', '-').replace(']', '')}-{attempt}"


def output_key(workflow_id: str, fork: str, attempt: int, index: int) -> str:
    """The ``fanout`` bucket key of item ``index`` of a streamed FORK attempt."""
    return f"{workflow_id}.{fork}.{attempt}.{index}"


def fork_output_name(workflow_id: str, fork: str, attempt: int) -> str:
    """The ``payloads`` object a streamed FORK attempt's output (the list) is stored as."""
    return f"{workflow_id}/{fork}/{attempt}/output/items"


def node_of(definition: Definition, ref: str) -> Node | None:
    """The definition node of a record's ref (``report[3]`` is an item of ``report``)."""
    node = definition.nodes.get(ref)
    if node is None and (match := _INSTANCE.match(ref)):
        node = definition.nodes.get(match["ref"])
    return node


def decide(definition: Definition, state: Saga | None, fact: Fact) -> Decision:
    """Apply one fact to a saga. See the module docstring for the redelivery rule."""
    match fact:
        case Started():
            if state is not None:
                return Decision(state, commands_caused_by(definition, state, START))
            return _start(definition, fact)
    if state is None:
        return Decision(None, ())
    return _on_fact(definition, state, fact)


def _on_fact(definition: Definition, state: Saga, fact: Fact) -> Decision:
    match fact:
        case TaskCompleted() | TaskFailed():
            return _task_ended(definition, state, fact)
        case SignalReceived():
            return _signal(definition, state, fact)
        case RetryDue():
            return _retry_due(definition, state, fact)
        case TaskTimedOut():
            return _task_timed_out(definition, state, fact)
        case WorkflowTimedOut():
            return _workflow_timed_out(definition, state, fact)
        case SlotGranted():
            return _slot_granted(definition, state, fact)
    return _on_request(definition, state, fact)


def _on_request(definition: Definition, state: Saga, fact: Fact) -> Decision:
    """The operator's facts: terminate, retry, pause, resume."""
    match fact:
        case TerminateRequested():
            return _terminate(definition, state, fact)
        case RetryRequested():
            return _retry_requested(definition, state, fact)
        case PauseRequested():
            return _pause(definition, state, fact)
        case ResumeRequested():
            return _resume(definition, state, fact)
        case RerunRequested():
            return _rerun(definition, state, fact)
    return Decision(state, ())  # pragma: no cover - every fact type is matched


def commands_caused_by(definition: Definition, state: Saga, cause: str) -> tuple[Command, ...]:
    """Every command the fact ``cause`` produced, derived from the state it left."""
    commands: list[Command] = []
    for record in state.tasks:
        commands.extend(_record_commands(definition, state, record, cause))
    commands.extend(_workflow_commands(definition, state, cause))
    return tuple(commands)


def _record_commands(
    definition: Definition, state: Saga, record: TaskRecord, cause: str
) -> list[Command]:
    """The commands of one task record that ``cause`` produced."""
    commands: list[Command] = []
    fanout = record.fanout
    if fanout is not None and fanout.completed_by == cause and record.status == "COMPLETED":
        commands.append(_gather(state, record, fanout))
    # The fact that canceled an attempt terminates its child; so does the one that
    # started it, whose redelivery may be the first to find the child in existence.
    ending = record.child_terminated
    if (
        ending is not None
        and cause in {ending.by, record.cause}
        and (terminate := terminate_child(record)) is not None
    ):
        commands.append(terminate)
    if record.cause != cause:
        return commands
    node = node_of(definition, record.ref)
    if node is None:
        return commands
    command = _command(state, record, node.task)
    if command is not None:
        commands.append(command)
    if record.timeout_at is not None and record.status in _WAITING and record.retry_at is None:
        commands.append(_timer(state, record.ref, record.attempt, record.timeout_at, "timeout"))
    if isinstance(command, RunTask) and command.response_timeout_s and record.scheduled_at:
        # The first look at the attempt's heartbeat lease; the runtime sets the next.
        fire_at = utc_shift(record.scheduled_at, command.response_timeout_s)
        commands.append(_timer(state, record.ref, record.attempt, fire_at, "response"))
    return commands


def _workflow_commands(definition: Definition, state: Saga, cause: str) -> list[Command]:
    """The commands of the workflow itself that ``cause`` produced: its timeout timer,
    its request for a slot, its failure workflow, its report to its parent."""
    commands: list[Command] = []
    if cause == START and state.timeout_at is not None:
        commands.append(_timer(state, "workflow", 1, state.timeout_at, "workflow_timeout"))
    concurrency = definition.spec.concurrency
    if state.status == "QUEUED" and cause == state.last_fact and concurrency is not None:
        commands.append(
            AcquireSlot(
                msg_id=f"{state.workflow_id}:slot:{cause}",
                workflow_id=state.workflow_id,
                slot=state.slot,
                limit=concurrency.limit,
                priority=state.priority,
            )
        )
    failure = definition.spec.failure
    if failure and state.ended_by == cause and state.status in {"FAILED", "TIMED_OUT"}:
        commands.append(
            StartWorkflow(
                msg_id=f"{state.workflow_id}:failure",
                workflow_id=f"{state.workflow_id}-failure",
                workflow=failure,
                version=None,
                input={
                    "workflow_id": state.workflow_id,
                    "workflow": state.workflow,
                    "status": state.status,
                    "error": msgspec.to_builtins(state.error),
                    "input": state.input,
                },
                tenant=state.tenant,
                parent=None,
                priority=state.priority,
            )
        )
    if state.parent is not None and state.ended_by == cause and state.status in TERMINAL:
        commands.append(
            NotifyParent(
                msg_id=f"{state.workflow_id}:ended",
                parent=state.parent,
                child=state.workflow_id,
                status=state.status,
                output=state.output,
                error=state.error,
            )
        )
    return commands


def _gather(state: Saga, record: TaskRecord, fanout: Fanout) -> GatherOutputs:
    return GatherOutputs(
        msg_id=f"{task_msg_id(state.workflow_id, record.ref, record.attempt)}:gather",
        workflow_id=state.workflow_id,
        ref=record.ref,
        attempt=record.attempt,
        items=fanout.finished,
        name=fork_output_name(state.workflow_id, record.ref, record.attempt),
    )


def terminate_child(record: TaskRecord) -> TerminateWorkflow | None:
    """The command that ends the child of a SUB_WORKFLOW attempt its parent canceled."""
    ending = record.child_terminated
    if ending is None or record.child is None:
        return None
    return TerminateWorkflow(
        msg_id=f"{record.child}:terminated-by-parent",
        workflow_id=record.child,
        reason=ending.reason,
        compensate=ending.compensate,
    )


def _timer(
    state: Saga,
    ref: str,
    attempt: int,
    fire_at: str,
    purpose: Literal["timeout", "workflow_timeout", "response"],
) -> ScheduleTimer:
    return ScheduleTimer(
        msg_id=f"{task_msg_id(state.workflow_id, ref, attempt)}:{purpose}",
        workflow_id=state.workflow_id,
        ref=ref,
        attempt=attempt,
        fire_at=fire_at,
        purpose=purpose,
    )


def _command(state: Saga, record: TaskRecord, task: TaskDef) -> Command | None:
    msg_id = task_msg_id(state.workflow_id, record.ref, record.attempt)
    match task:
        case SimpleTask() if record.status == "SCHEDULED" and record.retry_at is not None:
            return ScheduleTimer(
                msg_id=f"{msg_id}:retry",
                workflow_id=state.workflow_id,
                ref=record.ref,
                attempt=record.attempt,
                fire_at=record.retry_at,
                purpose="retry",
            )
        case SimpleTask(task=name, concurrency=concurrency) if record.status == "SCHEDULED":
            return RunTask(
                msg_id=msg_id,
                workflow_id=state.workflow_id,
                workflow=state.workflow,
                ref=record.ref,
                task=name,
                attempt=record.attempt,
                input=record.input,
                response_timeout_s=task.response_timeout_s,
                slot=record.slot if concurrency is not None else "",
                limit=concurrency.limit if concurrency is not None else 0,
                priority=state.priority if task.priority is None else task.priority,
            )
        case EventTask(subject=subject) if record.status == "COMPLETED":
            return PublishEvent(msg_id=msg_id, subject=subject, data=record.input)
        case DelayTask() if record.status == "SCHEDULED" and isinstance(record.input, dict):
            return ScheduleTimer(
                msg_id=msg_id,
                workflow_id=state.workflow_id,
                ref=record.ref,
                attempt=record.attempt,
                fire_at=str(record.input.get("fire_at", "")),
            )
        case SubWorkflowTask(workflow=name, version=version) if record.status in _WAITING:
            return StartWorkflow(
                msg_id=msg_id,
                workflow_id=record.child or "",
                workflow=name,
                version=version,
                input=record.input,
                tenant=state.tenant,
                parent=ParentLink(
                    workflow_id=state.workflow_id, ref=record.ref, attempt=record.attempt
                ),
                priority=state.priority,
            )
    return None


class _Draft:
    """The saga being changed by one decision; frozen back into a `Saga` at the end."""

    def __init__(self, definition: Definition, state: Saga, at: str, cause: str) -> None:
        self.definition = definition
        self.state = state
        self.at = at
        self.cause = cause
        self.tasks = {t.ref: t for t in state.tasks}
        self.variables = dict(state.variables)
        self.status: WorkflowStatus = state.status
        self.output: Json = state.output
        self.error = state.error
        self.ended_by = state.ended_by
        self.deferred = list(state.deferred)
        self.compensating = state.compensating
        self.kept: list[KeptOutput] = []
        self._context: dict[str, Json] | None = None

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"

    def context(self, **extra: Json) -> dict[str, Json]:
        """What expressions see: ``workflow`` and one root per task ref (plus ``extra``).

        Built once per decision and kept current by `put` and `set_variables`, so walking
        several SWITCH/EVENT steps does not rebuild it at each one.
        """
        if self._context is None:
            state = self.state
            roots: dict[str, Json] = {ref: _root(t) for ref, t in self.tasks.items()}
            roots["workflow"] = {
                "id": state.workflow_id,
                "name": state.workflow,
                "version": state.version,
                "tenant": state.tenant,
                "input": state.input,
                "variables": dict(self.variables),
            }
            self._context = roots
        return {**self._context, **extra} if extra else self._context

    def put(self, record: TaskRecord) -> None:
        self.tasks[record.ref] = record
        if self._context is not None:
            self._context[record.ref] = _root(record)

    def remove(self, ref: str) -> None:
        """Drop a record (a streamed FORK's ended item)."""
        self.tasks.pop(ref, None)
        if self._context is not None:
            self._context.pop(ref, None)

    def set_variables(self, values: dict[str, Json]) -> None:
        self.variables.update(values)
        self._context = None

    def record(
        self, ref: str, task: TaskDef, *, status: TaskStatus = "COMPLETED", **fields: Json
    ) -> TaskRecord:
        previous = self.tasks.get(ref)
        attempt = previous.attempt + 1 if previous is not None else 1
        done = status not in _WAITING
        record = TaskRecord(
            ref=ref,
            name=_task_name(task),
            type=type(task).__struct_config__.tag or "",  # type: ignore[arg-type]
            status=status,
            attempt=attempt,
            input=None,
            output=None,
            error=None,
            scheduled_at=self.at,
            started_at=self.at if status != "SCHEDULED" else None,
            ended_at=self.at if done else None,
            cause=self.cause,
            # A task run again (a rerun) keeps the history of its earlier runs.
            history=previous.history if previous is not None else [],
        )
        record = msgspec.structs.replace(record, **fields)
        self.put(record)
        return record

    def finish(self, status: WorkflowStatus, output: Json, error: Failure | None = None) -> None:
        """End the workflow; whatever was still waiting is CANCELED, children terminated."""
        self.status, self.output, self.error, self.ended_by = status, output, error, self.cause
        self.cancel_waiting(status, error, compensate=False)

    def cancel_waiting(
        self, status: WorkflowStatus, error: Failure | None, *, compensate: bool
    ) -> None:
        """Cancel what still waits, the workflow being on its way to end ``status``.

        A SUB_WORKFLOW's child still running is terminated with it, and undoes its own
        completed tasks when this workflow undoes its own (``compensate``).
        """
        why = f"{status}: {error.message}" if error is not None else status
        reason = f"terminated with its parent workflow {self.state.workflow_id} ({why})"
        for record in list(self.tasks.values()):
            if record.status not in _WAITING:
                continue
            ending = None
            if record.child is not None:
                ending = ChildTermination(by=self.cause, reason=reason, compensate=compensate)
            self.put(
                msgspec.structs.replace(
                    record, status="CANCELED", ended_at=self.at, child_terminated=ending
                )
            )

    def freeze(self) -> Saga:
        return msgspec.structs.replace(
            self.state,
            status=self.status,
            output=self.output,
            error=self.error,
            variables=self.variables,
            tasks=tuple(self.tasks.values()),
            # Facts are stamped by different clocks (the conductor's, the stream's): never
            # let a late-stamped fact move the saga's clock backwards.
            updated_at=max(self.state.updated_at, self.at),
            last_fact=self.cause,
            ended_by=self.ended_by,
            deferred=self.deferred,
            compensating=self.compensating,
        )


def _task_name(task: TaskDef) -> str:
    match task:
        case SimpleTask(task=name):
            return name
        case SubWorkflowTask(workflow=name):
            return name
    return ""


def _root(record: TaskRecord) -> Json:
    return {
        "input": record.input,
        "output": record.output,
        "status": record.status,
        "attempt": record.attempt,
    }


def by_request(fact: str) -> bool:
    """Facts from requests (start, signal, terminate) are not redelivered; results are."""
    return bool(fact) and "#" not in fact


def _refused(state: Saga, code: int, message: str) -> Decision:
    """A request that does not fit the workflow as it is: nothing changes."""
    return Decision(state, (), Refusal(code, message))


def _decided(definition: Definition, draft: _Draft) -> Decision:
    new = draft.freeze()
    commands = commands_caused_by(definition, new, draft.cause)
    if by_request(draft.cause) and any(not isinstance(c, RunTask) for c in commands):
        # A waiting task's dispatch is re-driven from its SCHEDULED record; anything else
        # a request caused is marked until it is known to be published.
        new = msgspec.structs.replace(new, unpublished=draft.cause)
    return Decision(new, commands, outputs=tuple(draft.kept))


def _start(definition: Definition, fact: Started) -> Decision:
    state = Saga(
        workflow_id=fact.workflow_id,
        workflow=definition.name,
        version=definition.version,
        status="RUNNING",
        input=fact.input,
        output=None,
        tenant=fact.tenant,
        created_at=fact.at,
        updated_at=fact.at,
        trace_id=fact.trace_id,
        error=None,
        tasks=(),
        traceparent=fact.traceparent,
        tracestate=fact.tracestate,
        parent=fact.parent,
        switched_off=fact.switched_off,
        timeout_at=_deadline(fact.at, definition.spec.timeout_s),
        priority=definition.spec.priority if fact.priority is None else fact.priority,
    )
    draft = _Draft(definition, state, fact.at, START)
    concurrency = definition.spec.concurrency
    if concurrency is None:
        _run(draft, definition.first)
    else:
        key = definition.concurrency_key
        value = key.evaluate(draft.context()) if key is not None else None
        draft.state = msgspec.structs.replace(
            state, slot=slot_name("wf", definition.name, concurrency.key, value)
        )
        draft.status = "QUEUED"
    return _decided(definition, draft)


def _slot_granted(definition: Definition, state: Saga, fact: SlotGranted) -> Decision:
    """A QUEUED workflow got its slot: it starts, or its waiting rerun or retry runs."""
    if state.status != "QUEUED":
        # Ended while it waited, or a redelivery: the grant gives back what it gave.
        return Decision(state, commands_caused_by(definition, state, SLOT))
    requeued = state.requeued
    if requeued is not None:
        ended = msgspec.structs.replace(state, status=requeued.ended, requeued=None)
        match requeued.fact:
            case RerunRequested() as rerun:
                return _rerun(definition, ended, rerun, queue=False)
            case RetryRequested() as retry:
                return _retry_requested(definition, ended, retry, queue=False)
    draft = _Draft(definition, state, fact.at, SLOT)
    draft.status = "RUNNING"
    _run(draft, definition.first)
    return _decided(definition, draft)


def _requeue(
    definition: Definition, state: Saga, fact: RerunRequested | RetryRequested
) -> Decision:
    """A rerun or retry of a workflow with a concurrency limit waits for a slot first."""
    draft = _Draft(definition, state, fact.at, fact_id(fact))
    draft.state = msgspec.structs.replace(state, requeued=Requeued(ended=state.status, fact=fact))
    draft.status = "QUEUED"
    return _decided(definition, draft)


def _task_ended(definition: Definition, state: Saga, fact: TaskCompleted | TaskFailed) -> Decision:
    cause = fact_id(fact)
    record = next((t for t in state.tasks if t.ref == fact.ref), None)
    if record is None and _streamed_item_ended(definition, state, fact.ref):
        return Decision(state, commands_caused_by(definition, state, cause))  # redelivery
    if record is None or record.attempt != fact.attempt:
        return Decision(state, ())  # a stale attempt or a ref this saga never scheduled
    if fact.task and fact.task != record.name:
        return Decision(state, ())  # published for another task (a wrong or forged result)
    if record.status not in _WAITING:
        return Decision(state, commands_caused_by(definition, state, cause))  # redelivery
    if state.status in TERMINAL:
        return Decision(state, ())
    node = node_of(definition, fact.ref)
    if node is None:
        return Decision(state, ())
    draft = _Draft(definition, state, fact.at, cause)
    match fact:
        case TaskCompleted(output=output):
            draft.put(_ended(record, "COMPLETED", fact, output=output))
            _finish_task(draft, fact.ref)
        case TaskFailed(error=error):
            failed = _ended(record, "FAILED", fact, error=error)
            task = node.task
            if (
                isinstance(task, SimpleTask)
                and error.retryable
                and record.attempt <= task.retry.count
            ):
                delay = _backoff_s(task.retry, record.attempt)
                draft.put(_next_attempt(failed, draft, delay, task.timeout_s))
            elif getattr(node.task, "optional", False):
                draft.put(failed)
                _finish_task(draft, fact.ref)
            elif node.after.kind == "compensation":
                draft.put(failed)
                _compensation_failed(draft, fact.ref, error)
            else:
                draft.put(failed)
                message = f"task {fact.ref!r} failed: {error.message}"
                _fail_workflow(
                    draft, "FAILED", Failure(type="task_failed", message=message, task=fact.ref)
                )
    return _decided(definition, draft)


def _backoff_s(policy: RetryPolicy, attempt: int) -> float:
    """Seconds before retry number ``attempt`` (1 for the first retry)."""
    match policy.logic:
        case "FIXED":
            return policy.delay_s
        case "LINEAR":
            return policy.delay_s * attempt
        case "EXPONENTIAL":
            return policy.delay_s * float(2 ** (attempt - 1))
    return policy.delay_s  # pragma: no cover - the logic is a Literal


def _as_attempt(record: TaskRecord) -> Attempt:
    """A task's current attempt, as its history keeps it."""
    return Attempt(
        attempt=record.attempt,
        status=record.status,
        error=record.error,
        started_at=record.started_at,
        ended_at=record.ended_at,
        worker=record.worker,
    )


def _next_attempt(
    failed: TaskRecord, draft: _Draft, delay_s: float, timeout_s: float | None = None
) -> TaskRecord:
    """The next attempt of a failed task: SCHEDULED now, or once its backoff is over."""
    earlier = _as_attempt(failed)
    retry_at = _deadline(draft.at, delay_s) if delay_s else None
    return msgspec.structs.replace(
        failed,
        status="SCHEDULED",
        attempt=failed.attempt + 1,
        output=None,
        error=None,
        scheduled_at=draft.at,
        started_at=None,
        ended_at=None,
        worker="",
        cause=draft.cause,
        retry_at=retry_at,
        timeout_at=None if retry_at else _deadline(draft.at, timeout_s),
        retry_fired=False,
        timeout_fired=False,
        child_terminated=None,
        history=[*failed.history, earlier],
    )


def _retry_due(definition: Definition, state: Saga, fact: RetryDue) -> Decision:
    """A retry's backoff timer fired: dispatch the attempt.

    While the workflow is PAUSED the firing is only noted on the attempt and `_resume`
    dispatches it: the resume's time cannot be trusted to be past ``retry_at`` (a
    conductor's clock against the server's), the firing itself can.
    """
    cause = fact_id(fact)
    record = next((t for t in state.tasks if t.ref == fact.ref), None)
    if record is None or record.attempt != fact.attempt or record.status != "SCHEDULED":
        return Decision(state, ())  # a timer for an attempt that is gone
    if record.retry_at is None:
        return Decision(state, commands_caused_by(definition, state, cause))  # redelivery
    draft = _Draft(definition, state, fact.at, cause)
    if state.status == "RUNNING":
        _dispatch_retry(draft, record)
    elif state.status == "PAUSED" and not record.retry_fired:
        # The attempt keeps its ``cause``, so the note (and its redelivery) has no commands.
        draft.put(msgspec.structs.replace(record, retry_fired=True))
    else:
        return Decision(state, ())  # noted already, or the workflow is over
    return _decided(definition, draft)


def _dispatch_retry(draft: _Draft, record: TaskRecord) -> None:
    """A retry's backoff is over: dispatch it now, its timeout running from now."""
    node = node_of(draft.definition, record.ref)
    timeout_s = node.task.timeout_s if node and isinstance(node.task, SimpleTask) else None
    draft.put(
        msgspec.structs.replace(
            record,
            retry_at=None,
            retry_fired=False,
            cause=draft.cause,
            scheduled_at=draft.at,
            timeout_at=_deadline(draft.at, timeout_s),
        )
    )


def _task_timed_out(definition: Definition, state: Saga, fact: TaskTimedOut) -> Decision:
    """An attempt ran past ``timeout_s``: its ``timeout_policy`` says what happens.

    While the workflow is PAUSED the firing is only noted on the attempt and `_resume`
    applies the policy: the resume's time cannot be trusted to be past ``timeout_at``
    (a conductor's clock against the server's), the firing itself can.
    """
    cause = fact_id(fact)
    record = next((t for t in state.tasks if t.ref == fact.ref), None)
    node = node_of(definition, fact.ref)
    if record is None or record.attempt != fact.attempt or node is None:
        return Decision(state, ())
    if not _may_time_out(record) or record.timeout_fired or state.status in TERMINAL:
        return Decision(state, commands_caused_by(definition, state, cause))
    if not isinstance(node.task, SimpleTask):
        return Decision(state, ())
    draft = _Draft(definition, state, fact.at, cause)
    if state.status == "PAUSED":
        draft.put(msgspec.structs.replace(record, timeout_fired=True))
    else:
        _time_out(draft, record, node.task)
    return _decided(definition, draft)


def _may_time_out(record: TaskRecord) -> bool:
    """The attempt is dispatched and waiting, and no timeout policy has acted on it yet.

    A retry in its backoff has no timeout yet; an ALERT_ONLY alert is kept as the
    attempt's ``error``, which a waiting attempt otherwise never has.
    """
    return record.status in _WAITING and record.retry_at is None and record.error is None


def _time_out(draft: _Draft, record: TaskRecord, task: SimpleTask) -> None:
    """Apply ``task.timeout_policy`` to ``record``, an attempt past its ``timeout_s``."""
    message = (
        f"task {record.ref!r} attempt {record.attempt} ran past its timeout_s ({task.timeout_s} s)"
    )
    error = Failure(type="timed_out", message=message, retryable=True, task=record.ref)
    if task.timeout_policy == "ALERT_ONLY":
        # Keep waiting; the saga shows the alert until the result comes.
        draft.put(msgspec.structs.replace(record, error=error, timeout_fired=False))
        return
    timed_out = msgspec.structs.replace(
        record, status="TIMED_OUT", error=error, ended_at=draft.at, timeout_fired=False
    )
    if task.timeout_policy == "RETRY" and record.attempt <= task.retry.count:
        draft.put(
            _next_attempt(timed_out, draft, _backoff_s(task.retry, record.attempt), task.timeout_s)
        )
    else:
        draft.put(timed_out)
        _fail_workflow(draft, "TIMED_OUT", error)


def _workflow_timed_out(definition: Definition, state: Saga, fact: WorkflowTimedOut) -> Decision:
    if state.status in TERMINAL:
        return Decision(state, ())
    draft = _Draft(definition, state, fact.at, fact_id(fact))
    seconds = definition.spec.timeout_s
    error = Failure(type="timed_out", message=f"workflow ran past its timeout_s ({seconds} s)")
    if state.compensating is not None:
        draft.finish(state.compensating.status, None, error)  # out of time even to undo
    else:
        _fail_workflow(draft, "TIMED_OUT", error)
    return _decided(definition, draft)


def _pause(definition: Definition, state: Saga, fact: PauseRequested) -> Decision:
    if state.status != "RUNNING":
        return _refused(
            state,
            409,
            f"workflow {state.workflow_id} is {state.status}: only a running one can be paused",
        )
    draft = _Draft(definition, state, fact.at, fact_id(fact))
    draft.status = "PAUSED"
    return _decided(definition, draft)


def _resume(definition: Definition, state: Saga, fact: ResumeRequested) -> Decision:
    """Go on from where the paused workflow got to.

    First what fell due while it was paused: retries whose backoff timer fired (or
    whose time has passed) are dispatched, timeouts that fired (or whose time has
    passed) get their policy, as they would have had it running. Then on from every
    task that finished meanwhile. A firing is trusted over the resume's time, which
    comes from a conductor's clock that may run behind the server's.
    """
    if state.status != "PAUSED":
        return _refused(
            state,
            409,
            f"workflow {state.workflow_id} is {state.status}: only a paused one can be resumed",
        )
    draft = _Draft(definition, state, fact.at, fact_id(fact))
    draft.status = "RUNNING"
    for record in state.tasks:
        if record.retry_at is not None and (record.retry_fired or record.retry_at <= fact.at):
            _dispatch_retry(draft, record)
    for record in state.tasks:
        due = record.timeout_fired or (
            record.timeout_at is not None and record.timeout_at <= fact.at
        )
        node = node_of(definition, record.ref)
        if (
            due
            and _may_time_out(record)
            and draft.running
            # Not already canceled by an earlier timeout's end of the workflow.
            and draft.tasks[record.ref] is record
            and node is not None
            and isinstance(node.task, SimpleTask)
        ):
            _time_out(draft, record, node.task)
    deferred, draft.deferred = draft.deferred, []
    for ref in deferred:
        _finish_task(draft, ref)
    return _decided(definition, draft)


def _rerun(
    definition: Definition, state: Saga, fact: RerunRequested, *, queue: bool = True
) -> Decision:
    """Invalidate ``fact.task`` and all downstream of it, then run again from it (once it
    has a slot, if the definition has a concurrency limit: ``queue``)."""
    if fact.task not in definition.nodes:
        return _refused(state, 404, f"{state.workflow} has no task {fact.task!r}")
    if state.status not in TERMINAL:
        return _refused(
            state,
            409,
            f"workflow {state.workflow_id} is {state.status}: only a finished one can be rerun",
        )
    if not any(t.ref == fact.task for t in state.tasks):
        return _refused(state, 409, f"task {fact.task!r} never ran: nothing to rerun")
    if queue and definition.spec.concurrency is not None:
        return _requeue(definition, state, fact)
    draft = _Draft(definition, state, fact.at, fact_id(fact))
    draft.status, draft.error, draft.output, draft.ended_by = "RUNNING", None, None, ""
    draft.compensating = None
    invalid = definition.downstream(fact.task)
    for record in list(draft.tasks.values()):
        node = node_of(definition, record.ref)
        if node is not None and node.task.ref in invalid:
            # Keep the run in its history and the attempt number, so the next run's
            # message ids are new; drop the output so nothing downstream reads it.
            earlier = _as_attempt(record)
            draft.put(
                msgspec.structs.replace(
                    record,
                    status="CANCELED",
                    output=None,
                    error=None,
                    ended_at=fact.at,
                    history=[*record.history, earlier],
                    branches_done=None,
                    retry_at=None,
                    retry_fired=False,
                    timeout_at=None,
                    child_terminated=None,
                )
            )
    after = definition.nodes[fact.task].after
    if after.kind == "graph" and after.ref is not None:
        # A member again: its GRAPH reopens, keeping the artefacts of what did not depend
        # on it; the member and its dependants run again as their inputs come.
        graph = draft.tasks[after.ref]
        draft.put(
            msgspec.structs.replace(graph, status="IN_PROGRESS", output=graph.input, ended_at=None)
        )
    _run(draft, fact.task)
    return _decided(definition, draft)


def _retry_requested(
    definition: Definition, state: Saga, fact: RetryRequested, *, queue: bool = True
) -> Decision:
    """Run the failed task again (and what its failure canceled); history is kept. With a
    concurrency limit, once the workflow has a slot again (``queue``)."""
    if state.status not in {"FAILED", "TIMED_OUT", "TERMINATED"}:
        return _refused(
            state,
            409,
            f"workflow {state.workflow_id} is {state.status}: "
            "only a finished, failed one can be retried",
        )
    again = [
        t
        for t in state.tasks
        if t.status in {"FAILED", "TIMED_OUT", "CANCELED"}
        and t.type in {"SIMPLE", "WAIT", "SUB_WORKFLOW", "DELAY"}
    ]
    if not again:
        return _refused(state, 409, "no failed task to retry")
    if queue and definition.spec.concurrency is not None:
        return _requeue(definition, state, fact)
    draft = _Draft(definition, state, fact.at, fact_id(fact))
    draft.status, draft.error, draft.output, draft.ended_by = "RUNNING", None, None, ""
    for record in again:
        node = node_of(definition, record.ref)
        timeout_s = node.task.timeout_s if node and isinstance(node.task, SimpleTask) else None
        retried = _next_attempt(record, draft, 0, timeout_s)
        if record.type == "WAIT":
            retried = msgspec.structs.replace(retried, status="IN_PROGRESS", started_at=fact.at)
        elif record.type == "SUB_WORKFLOW":
            retried = msgspec.structs.replace(
                retried, child=child_workflow_id(state.workflow_id, record.ref, retried.attempt)
            )
        elif record.type == "DELAY" and isinstance(record.input, dict):
            retried = msgspec.structs.replace(retried, input={**record.input, "fire_at": fact.at})
        draft.put(retried)
    # FORKs the failure canceled are running again.
    for record in list(draft.tasks.values()):
        if record.type == "FORK" and record.status == "CANCELED":
            draft.put(msgspec.structs.replace(record, status="IN_PROGRESS", ended_at=None))
    return _decided(definition, draft)


def _signal(definition: Definition, state: Saga, fact: SignalReceived) -> Decision:
    node = node_of(definition, fact.ref)
    if node is None:
        return _refused(state, 404, f"{state.workflow} has no task {fact.ref!r}")
    if state.status in TERMINAL:
        return _refused(state, 409, f"workflow {state.workflow_id} is {state.status}")
    record = next((t for t in state.tasks if t.ref == fact.ref), None)
    if not isinstance(node.task, WaitTask) or record is None or record.status not in _WAITING:
        shown = "not reached yet" if record is None else record.status
        return _refused(state, 409, f"task {fact.ref!r} is not waiting for a signal ({shown})")
    draft = _Draft(definition, state, fact.at, fact_id(fact))
    draft.put(
        msgspec.structs.replace(record, status="COMPLETED", output=fact.output, ended_at=fact.at)
    )
    _finish_task(draft, fact.ref)
    return _decided(definition, draft)


def _terminate(definition: Definition, state: Saga, fact: TerminateRequested) -> Decision:
    if state.status in TERMINAL:
        return _refused(state, 409, f"workflow {state.workflow_id} is {state.status}")
    if state.requeued is not None:
        # A rerun or retry waiting for its slot: it is called off, and the workflow is
        # back as it had ended (nothing of it ran again, so nothing is undone).
        draft = _Draft(definition, state, fact.at, fact_id(fact))
        draft.state = msgspec.structs.replace(state, requeued=None)
        draft.status = state.requeued.ended
        return _decided(definition, draft)
    if fact.compensate and state.compensating is not None:
        # Already undoing what it did; cutting that short is what compensate=false is for.
        return _refused(
            state,
            409,
            f"workflow {state.workflow_id} is already compensating, to end "
            f"{state.compensating.status}; terminate without compensate to stop it now",
        )
    draft = _Draft(definition, state, fact.at, fact_id(fact))
    error = Failure(type="terminated", message=fact.reason or "terminated")
    if fact.compensate:
        _fail_workflow(draft, "TERMINATED", error)
    else:
        draft.finish("TERMINATED", None, error)
    return _decided(definition, draft)


def _ended(
    record: TaskRecord,
    status: TaskStatus,
    fact: TaskCompleted | TaskFailed,
    **fields: Json | Failure,
) -> TaskRecord:
    return msgspec.structs.replace(
        record,
        status=status,
        started_at=fact.started_at or record.started_at or record.scheduled_at,
        ended_at=fact.at,
        worker=fact.worker,
        **fields,
    )


def _run(draft: _Draft, ref: str, **extra: Json) -> None:
    """Start task ``ref``; run on through every task that finishes inside the decision."""
    if not draft.running:
        return
    node = draft.definition.nodes[ref]
    if node.after.kind == "graph":  # a GRAPH's member runs when its artefacts exist
        _graph_step(draft, node.after.ref or "")
        return
    skipped = _switched_off(draft, ref)
    condition = node.condition
    if skipped is None and condition is not None and not condition.holds(draft.context(**extra)):
        skipped = "its `when` is false"
    if skipped is not None:
        draft.record(ref, node.task, status="SKIPPED", reason=skipped)
        _finish_task(draft, ref)
        return
    _begin(draft, ref, node, extra)


def _begin(draft: _Draft, ref: str, node: Node, extra: dict[str, Json]) -> None:
    """Start task ``ref`` as its type says."""
    templates = node.templates
    match node.task:
        case SimpleTask() | WaitTask() | SubWorkflowTask() as task:
            data = templates["input"].evaluate(draft.context(**extra))
            _schedule(draft, ref, task, data, extra)
        case DelayTask() as task:
            _delay(draft, ref, task, templates["duration_s"].evaluate(draft.context()))
        case SwitchTask() as task:
            _switch(draft, ref, task, templates["expression"].evaluate(draft.context()))
        case EventTask() as task:
            draft.record(ref, task, input=templates["input"].evaluate(draft.context()))
            _finish_task(draft, ref)
        case SetVariableTask() as task:
            values = templates["input"].evaluate(draft.context())
            if isinstance(values, dict):
                draft.set_variables(values)
            draft.record(ref, task, input=values)
            _finish_task(draft, ref)
        case JoinTask(join_on=join_on) as task:
            outputs = {r: t.output for r in join_on if (t := draft.tasks.get(r)) is not None}
            draft.record(ref, task, output=outputs)
            _finish_task(draft, ref)
        case TerminateTask(status=status) as task:
            output = templates["output"].evaluate(draft.context())
            reason = templates["reason"].evaluate(draft.context())
            draft.record(ref, task, output=output)
            message = str(reason) if reason else f"terminated by task {ref!r}"
            error = Failure(type="terminated", message=message, task=ref)
            draft.finish(status, output, error if status == "FAILED" else None)
        case ForkTask() as task:
            _fork(draft, ref, task)
        case GraphTask() as task:
            seeds = templates["input"].evaluate(draft.context())
            draft.record(ref, task, status="IN_PROGRESS", input=seeds, output=seeds)
            _graph_step(draft, ref)


def _graph_step(draft: _Draft, graph_ref: str) -> None:
    """Run every member of GRAPH ``graph_ref`` whose artefacts all exist; skip those whose
    ``when`` is false or whose hard requirement can no longer come; complete the GRAPH
    when nothing more can run. One pass in producer-first order settles a decision."""
    graph = draft.tasks[graph_ref]
    if graph.status not in _WAITING or not draft.running:
        return
    plan = draft.definition.graphs[graph_ref]
    artefacts: dict[str, Json] = dict(graph.input) if isinstance(graph.input, dict) else {}
    gone: set[str] = set()  # artefacts that will never come
    busy = False
    for ref in plan.order:
        record = draft.tasks.get(ref)
        if record is not None and record.status != "CANCELED":
            if record.status == "COMPLETED":
                made = _artefacts_of(draft, plan, ref, record.output)
                if made is None:
                    return  # it failed the workflow
                artefacts.update(made)
            elif record.status in _WAITING:
                busy = True
            else:  # SKIPPED, or FAILED and optional
                gone.update(plan.produces[ref])
            continue
        requires = plan.requires[ref]
        lost = [name for name, optional in requires if name in gone and not optional]
        if lost:
            reason = f"requires {', '.join(lost)}, which will not come"
            _skip(draft, ref, reason, gone, plan.produces[ref])
            continue
        if any(name not in artefacts and name not in gone for name, _ in requires):
            busy = True  # waits for a producer still to run
            continue
        node = draft.definition.nodes[ref]
        given = {name: artefacts.get(name) for name, _ in requires}
        context = draft.context(artefacts=given)
        why = _switched_off(draft, ref)
        if why is None and node.condition is not None and not node.condition.holds(context):
            why = "its `when` is false"
        if why is not None:
            _skip(draft, ref, why, gone, plan.produces[ref])
            continue
        assert isinstance(node.task, SimpleTask | WaitTask | SubWorkflowTask)
        data = node.templates["input"].evaluate(context)
        data = {**given, **(data if isinstance(data, dict) else {})}
        _schedule(draft, ref, node.task, data, {"artefacts": given})
        busy = True
    if not busy:
        output = {**artefacts, **dict.fromkeys(gone - artefacts.keys())}
        draft.put(
            msgspec.structs.replace(graph, status="COMPLETED", output=output, ended_at=draft.at)
        )
        _finish_task(draft, graph_ref)


def _artefacts_of(draft: _Draft, plan: GraphPlan, ref: str, output: Json) -> dict[str, Json] | None:
    """The artefacts member ``ref`` produced; None (the workflow failed) if one is missing
    or not of its declared type."""
    found = output if isinstance(output, dict) else {}
    missing = [a for a in plan.produces[ref] if a not in found]
    if missing:
        _fail(draft, ref, f"task {ref!r} did not produce {', '.join(missing)}")
        return None
    made = {a: found[a] for a in plan.produces[ref]}
    wrong = plan.invalid(made)
    if wrong is not None:
        _fail(draft, ref, f"task {ref!r} produced a bad artefact: {wrong}")
        return None
    return made


def _switched_off(draft: _Draft, ref: str) -> str | None:
    """Why ``ref`` is switched off for the workflow's tenant, if it is."""
    if ref in draft.state.switched_off:
        return f"switched off for tenant {draft.state.tenant!r}"
    return None


def _skip(draft: _Draft, ref: str, reason: str, gone: set[str], produces: tuple[str, ...]) -> None:
    draft.record(ref, draft.definition.nodes[ref].task, status="SKIPPED", reason=reason)
    gone.update(produces)


def _delay(draft: _Draft, ref: str, task: DelayTask, seconds: Json) -> None:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        _fail(draft, ref, f"DELAY {ref!r}: duration_s is {seconds!r}, not seconds")
        return
    fire_at = utc_shift(draft.at, seconds)
    draft.record(ref, task, status="SCHEDULED", input={"duration_s": seconds, "fire_at": fire_at})


def _switch(draft: _Draft, ref: str, task: SwitchTask, value: Json) -> None:
    key = switch_key(value)
    branch = task.cases.get(key, task.default or [])
    case_name = key if key in task.cases else "default"
    draft.record(ref, task, input={"value": value}, output={"case": case_name})
    if branch:
        _run(draft, branch[0].ref)
    else:
        _finish_task(draft, ref)


def _schedule(
    draft: _Draft,
    ref: str,
    task: SimpleTask | WaitTask | SubWorkflowTask,
    data: Json,
    extra: dict[str, Json],
    *,
    attempt: int | None = None,
) -> None:
    if isinstance(task, WaitTask):
        draft.record(ref, task, status="IN_PROGRESS", input=data)
        return
    slot = ""
    if isinstance(task, SimpleTask) and task.concurrency is not None:
        slot = _task_slot(draft, ref, task.task, task.concurrency, extra)
    record = draft.record(
        ref,
        task,
        status="SCHEDULED",
        input=data,
        timeout_at=_deadline(draft.at, getattr(task, "timeout_s", None)),
        slot=slot,
        **({"attempt": attempt} if attempt is not None else {}),
    )
    if isinstance(task, SubWorkflowTask):
        child = child_workflow_id(draft.state.workflow_id, ref, record.attempt)
        draft.put(msgspec.structs.replace(record, child=child))


def _task_slot(
    draft: _Draft, ref: str, name: str, concurrency: Concurrency, extra: dict[str, Json]
) -> str:
    """The semaphore a task's attempts take a slot of: its name's, per key value."""
    node = node_of(draft.definition, ref)
    key = node.templates.get("concurrency_key") if node is not None else None
    value = key.evaluate(draft.context(**extra)) if key is not None else None
    return slot_name("task", name, concurrency.key, value)


def _deadline(at: str, seconds: float | None) -> str | None:
    """``at`` plus ``seconds``, or None when there is no timeout."""
    if seconds is None:
        return None
    return utc_shift(at, seconds)


def _fork(draft: _Draft, ref: str, task: ForkTask) -> None:
    if task.each is None:
        draft.record(ref, task, status="IN_PROGRESS", branches_done=[])
        for b, branch in enumerate(task.branches):
            if branch:
                _run(draft, branch[0].ref)
            else:
                _branch_done(draft, ref, b)
        return
    items = draft.definition.nodes[ref].templates["over"].evaluate(draft.context())
    if isinstance(items, dict) and PAYLOAD_MARKER in items:
        _fail(
            draft,
            ref,
            f"FORK {ref!r}: `over` names a value stored as a payload reference (a task output "
            "over KAPELLMEISTER_PAYLOAD_THRESHOLD); pass the list in the workflow input, or "
            "raise the threshold",
        )
        return
    if not isinstance(items, list):
        _fail(draft, ref, f"FORK {ref!r}: `over` is {type(items).__name__}, not a list")
        return
    if task.max_parallel is not None or len(items) > STREAM_OVER:
        parallel = task.max_parallel or STREAM_PARALLEL
        fanout = Fanout(
            parallel=parallel,
            done=_bitmap(len(items)),
            floor=_earlier_item_attempts(draft, ref, task),
            items=_digest(items),
        )
        input: Json = {"items": len(items), "max_parallel": parallel}
        record = draft.record(ref, task, status="IN_PROGRESS", input=input)
        draft.put(msgspec.structs.replace(record, fanout=fanout))
        _stream_items(draft, ref, task, items)
        return
    draft.record(ref, task, status="IN_PROGRESS", input={"items": len(items)}, branches_done=[])
    if not items:
        _complete_fork(draft, ref)
        return
    each = task.each
    for index, item in enumerate(items):
        instance = f"{each.ref}[{index}]"
        data = (
            draft.definition.nodes[each.ref]
            .templates["input"]
            .evaluate(draft.context(item=item, index=index))
        )
        assert isinstance(each, SimpleTask | SubWorkflowTask)
        _schedule(draft, instance, each, data, {"item": item, "index": index})


def _fail(draft: _Draft, ref: str, message: str) -> None:
    _fail_workflow(draft, "FAILED", Failure(type="task_failed", message=message, task=ref))


def _fail_workflow(draft: _Draft, status: WorkflowStatus, error: Failure) -> None:
    """End the workflow ``status``, after compensating its completed tasks if any can be.

    Compensations run one at a time, the last completed task's first (the saga). While
    they run the workflow stays RUNNING with ``compensating`` set; nothing else advances.
    """
    pending = [
        node.task.compensate.ref
        for record in sorted(draft.tasks.values(), key=lambda t: t.ended_at or "", reverse=True)
        if record.status == "COMPLETED"
        and (node := node_of(draft.definition, record.ref)) is not None
        and isinstance(node.task, SimpleTask)
        and node.task.compensate is not None
        and node.task.compensate.ref not in draft.tasks
    ]
    draft.cancel_waiting(status, error, compensate=True)
    if not pending:
        draft.finish(status, None, error)
        return
    draft.compensating = Compensating(status=status, error=error, pending=pending[1:])
    _run_compensation(draft, pending[0])


def _run_compensation(draft: _Draft, ref: str) -> None:
    node = draft.definition.nodes[ref]
    assert isinstance(node.task, SimpleTask)
    _schedule(draft, ref, node.task, node.templates["input"].evaluate(draft.context()), {})


def _next_compensation(draft: _Draft) -> None:
    ending = draft.compensating
    assert ending is not None
    if ending.pending:
        draft.compensating = msgspec.structs.replace(ending, pending=ending.pending[1:])
        _run_compensation(draft, ending.pending[0])
    else:
        draft.compensating = None
        draft.finish(ending.status, None, ending.error)


def _compensation_failed(draft: _Draft, ref: str, error: Failure) -> None:
    ending = draft.compensating
    original = ending.error.message if ending and ending.error else "the workflow failed"
    draft.compensating = None
    draft.finish(
        "FAILED",
        None,
        Failure(
            type="compensation_failed",
            task=ref,
            message=f"compensation {ref!r} failed: {error.message} (after: {original})",
        ),
    )


def _finish_task(draft: _Draft, ref: str) -> None:
    """Task ``ref`` is done: go where its `After` says (at resume, if paused)."""
    if draft.status == "PAUSED":
        draft.deferred.append(ref)
        return
    if not draft.running:
        return
    if draft.compensating is not None and draft.definition.nodes[ref].after.kind != "compensation":
        return  # a late result of a task that was running when the failure came
    if match := _INSTANCE.match(ref):
        node = draft.definition.nodes[match["ref"]]
        assert node.after.ref is not None
        _branch_done(draft, node.after.ref, int(match["index"]))
        return
    after = draft.definition.nodes[ref].after
    match after.kind:
        case "next":
            assert after.ref is not None
            _run(draft, after.ref)
        case "branch":
            assert after.ref is not None
            _branch_done(draft, after.ref, after.branch)
        case "end":
            draft.finish("COMPLETED", draft.definition.output.evaluate(draft.context()))
        case "compensation":
            _next_compensation(draft)
        case "graph":
            assert after.ref is not None
            _graph_step(draft, after.ref)


def _branch_done(draft: _Draft, fork_ref: str, branch: int) -> None:
    record = draft.tasks[fork_ref]
    if record.fanout is not None:
        _item_done(draft, fork_ref, record, record.fanout, branch)
        return
    done = sorted({*(record.branches_done or []), branch})
    draft.put(msgspec.structs.replace(record, branches_done=done))
    task = draft.definition.nodes[fork_ref].task
    assert isinstance(task, ForkTask)
    expected = len(task.branches) if task.each is None else _items(record)
    if len(done) >= expected:
        _complete_fork(draft, fork_ref)


def _stream_items(
    draft: _Draft, fork_ref: str, task: ForkTask, items: list[Json] | None = None
) -> None:
    """Dispatch a streamed FORK's next items while fewer than its ``parallel`` run; end
    it when every item has."""
    record = draft.tasks[fork_ref]
    fanout = record.fanout
    assert fanout is not None and task.each is not None
    count = _items(record)
    if fanout.finished >= count:
        output: Json = (
            {PAYLOAD_MARKER: fork_output_name(draft.state.workflow_id, fork_ref, record.attempt)}
            if count
            else []
        )
        done = msgspec.structs.replace(fanout, completed_by=draft.cause)
        draft.put(
            msgspec.structs.replace(
                record, status="COMPLETED", output=output, ended_at=draft.at, fanout=done
            )
        )
        _finish_task(draft, fork_ref)
        return
    if fanout.started >= count or fanout.started - fanout.finished >= fanout.parallel:
        return  # nothing more to dispatch now: the list is not read
    if items is None:
        over = draft.definition.nodes[fork_ref].templates["over"].evaluate(draft.context())
        items = over if isinstance(over, list) else []
        if _digest(items) != fanout.items:
            _fail(draft, fork_ref, f"FORK {fork_ref!r}: its `over` list changed while it ran")
            return
    started, top = fanout.started, fanout.top
    each = draft.definition.nodes[task.each.ref]
    while started < count and started - fanout.finished < fanout.parallel:
        item = items[started] if started < len(items) else None
        data = each.templates["input"].evaluate(draft.context(item=item, index=started))
        assert isinstance(each.task, SimpleTask | SubWorkflowTask)
        item_ref = f"{task.each.ref}[{started}]"
        # Above every attempt an earlier run of the FORK gave: new message and child ids.
        before = draft.tasks.get(item_ref)
        attempt = max(before.attempt if before is not None else 0, fanout.floor) + 1
        extra: dict[str, Json] = {"item": item, "index": started}
        _schedule(draft, item_ref, each.task, data, extra, attempt=attempt)
        top = max(top, attempt)
        started += 1
    if started != fanout.started:
        counted = msgspec.structs.replace(fanout, started=started, top=top)
        draft.put(msgspec.structs.replace(draft.tasks[fork_ref], fanout=counted))


def _item_done(
    draft: _Draft, fork_ref: str, record: TaskRecord, fanout: Fanout, index: int
) -> None:
    """Item ``index`` of a streamed FORK ended: its output is kept outside the saga, its
    record dropped; the next items go, or the FORK ends."""
    if _bit(fanout.done, index):
        return  # counted already
    task = draft.definition.nodes[fork_ref].task
    assert isinstance(task, ForkTask) and task.each is not None
    item_ref = f"{task.each.ref}[{index}]"
    item = draft.tasks.get(item_ref)
    key = output_key(draft.state.workflow_id, fork_ref, record.attempt, index)
    draft.kept.append(KeptOutput(key, item.output if item is not None else None))
    draft.remove(item_ref)
    counted = msgspec.structs.replace(
        fanout,
        finished=fanout.finished + 1,
        done=_with_bit(fanout.done, index),
        top=max(fanout.top, item.attempt if item is not None else 0),
    )
    draft.put(msgspec.structs.replace(record, fanout=counted))
    _stream_items(draft, fork_ref, task)


def _streamed_item_ended(definition: Definition, state: Saga, ref: str) -> bool:
    """Whether ``ref`` is an item of a streamed FORK that has ended (its record gone)."""
    match = _INSTANCE.match(ref)
    node = node_of(definition, ref)
    if match is None or node is None or node.after.kind != "instance":
        return False
    fork = next((t for t in state.tasks if t.ref == node.after.ref), None)
    return (
        fork is not None and fork.fanout is not None and _bit(fork.fanout.done, int(match["index"]))
    )


def _earlier_item_attempts(draft: _Draft, fork_ref: str, task: ForkTask) -> int:
    """The highest item attempt earlier runs of a FORK gave (their records may be gone:
    the earlier FORK record keeps it)."""
    assert task.each is not None
    earlier = draft.tasks.get(fork_ref)
    highest = earlier.fanout.top if earlier is not None and earlier.fanout is not None else 0
    prefix = f"{task.each.ref}["
    for ref, record in draft.tasks.items():
        if ref.startswith(prefix):
            highest = max(highest, record.attempt)
    return highest


def _digest(items: list[Json]) -> str:
    """A streamed FORK's list, in short: it is read again as items are dispatched."""
    return hashlib.sha256(msgspec.json.encode(items)).hexdigest()[:16]


def _bitmap(count: int) -> str:
    """``count`` bits, none set, as hex."""
    return "00" * ((count + 7) // 8)


def _bit(bitmap: str, index: int) -> bool:
    byte = index // 8
    if 2 * byte + 2 > len(bitmap):
        return False
    return bool(int(bitmap[2 * byte : 2 * byte + 2], 16) & (1 << (index % 8)))


def _with_bit(bitmap: str, index: int) -> str:
    byte = index // 8
    value = int(bitmap[2 * byte : 2 * byte + 2], 16) | (1 << (index % 8))
    return f"{bitmap[: 2 * byte]}{value:02x}{bitmap[2 * byte + 2 :]}"


def _items(record: TaskRecord) -> int:
    """How many items a dynamic FORK fanned out over (kept in its record's input)."""
    count = record.input.get("items") if isinstance(record.input, dict) else None
    return count if isinstance(count, int) else 0


def _complete_fork(draft: _Draft, fork_ref: str) -> None:
    record = draft.tasks[fork_ref]
    task = draft.definition.nodes[fork_ref].task
    assert isinstance(task, ForkTask)
    output: Json
    if task.each is not None:
        output = [_output_of(draft, f"{task.each.ref}[{i}]") for i in range(_items(record))]
    else:
        inside = {
            n
            for n, node in draft.definition.nodes.items()
            if node.path.startswith(draft.definition.nodes[fork_ref].path + ".")
        }
        output = {r: t.output for r, t in draft.tasks.items() if r in inside}
    draft.put(msgspec.structs.replace(record, status="COMPLETED", output=output, ended_at=draft.at))
    _finish_task(draft, fork_ref)


def _output_of(draft: _Draft, ref: str) -> Json:
    record = draft.tasks.get(ref)
    return record.output if record is not None else None
