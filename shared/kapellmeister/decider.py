"""The conductor's pure saga logic: ``decide(definition, state, fact) -> Decision``.

No I/O, no clock, no randomness: time and ids come in on the fact. Given the same
definition, state and fact it always returns the same decision, which is what lets any
number of conductor replicas race on a workflow with compare-and-set as the only lock.

Redelivery is the normal case, not an edge case. Each task record remembers the fact
that scheduled it (``cause``), and the commands of a decision are derived from the new
state as "everything this fact caused" (`commands_caused_by`). So a fact applied a
second time, after a crash between the KV write and the publish, gives back the same
state and the same commands, and message-id dedupe drops the copies downstream.
"""

from __future__ import annotations

from typing import Final

import msgspec

from kapellmeister.definitions import (
    Definition,
    EventTask,
    SetVariableTask,
    SimpleTask,
    SwitchTask,
    TerminateTask,
)
from kapellmeister.expressions import Json, switch_key
from kapellmeister.messages import (
    TERMINAL,
    Command,
    Fact,
    Failure,
    PublishEvent,
    RunTask,
    Saga,
    Started,
    TaskCompleted,
    TaskFailed,
    TaskRecord,
    WorkflowStatus,
)

__all__ = ["Decision", "commands_caused_by", "decide", "fact_id", "task_msg_id"]

START: Final = "start"
_WAITING: Final = frozenset({"SCHEDULED", "IN_PROGRESS"})


class Decision(msgspec.Struct, frozen=True):
    """The new state (the same object when nothing changed) and the commands to emit."""

    state: Saga | None
    commands: tuple[Command, ...]


def fact_id(fact: Fact) -> str:
    """The id of a fact within its workflow: what task records name as their cause."""
    match fact:
        case Started():
            return START
        case TaskCompleted(ref=ref, attempt=attempt) | TaskFailed(ref=ref, attempt=attempt):
            return f"{ref}#{attempt}"


def task_msg_id(workflow_id: str, ref: str, attempt: int) -> str:
    """The ``Nats-Msg-Id`` of a task attempt's request; its result and events derive from it."""
    return f"{workflow_id}:{ref}:{attempt}"


def decide(definition: Definition, state: Saga | None, fact: Fact) -> Decision:
    """Apply one fact to a saga. See the module docstring for the redelivery rule."""
    match fact:
        case Started():
            if state is not None:
                return Decision(state, commands_caused_by(definition, state, START))
            return _start(definition, fact)
        case TaskCompleted() | TaskFailed():
            if state is None:
                return Decision(None, ())
            return _task_ended(definition, state, fact)


def commands_caused_by(definition: Definition, state: Saga, cause: str) -> tuple[Command, ...]:
    """Every command the fact ``cause`` produced, derived from the state it left."""
    commands: list[Command] = []
    for record in state.tasks:
        if record.cause != cause:
            continue
        msg_id = task_msg_id(state.workflow_id, record.ref, record.attempt)
        task = definition.nodes[record.ref].task
        if isinstance(task, SimpleTask) and record.status == "SCHEDULED":
            commands.append(
                RunTask(
                    msg_id=msg_id,
                    workflow_id=state.workflow_id,
                    workflow=state.workflow,
                    ref=record.ref,
                    task=task.task,
                    attempt=record.attempt,
                    input=record.input,
                )
            )
        elif isinstance(task, EventTask) and record.status == "COMPLETED":
            commands.append(PublishEvent(msg_id=msg_id, subject=task.subject, data=record.input))
    return tuple(commands)


class _Draft:
    """The saga being changed by one decision; frozen back into a `Saga` at the end."""

    def __init__(self, definition: Definition, state: Saga, at: str) -> None:
        self.definition = definition
        self.state = state
        self.at = at
        self.tasks = {t.ref: t for t in state.tasks}
        self.variables = dict(state.variables)
        self.status: WorkflowStatus = state.status
        self.output: Json = state.output
        self.error = state.error
        self._context: dict[str, Json] | None = None

    def context(self) -> dict[str, Json]:
        """What expressions see: ``workflow`` and one root per task ref.

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
        return self._context

    def put(self, record: TaskRecord) -> None:
        self.tasks[record.ref] = record
        if self._context is not None:
            self._context[record.ref] = _root(record)

    def set_variables(self, values: dict[str, Json]) -> None:
        self.variables.update(values)
        self._context = None

    def record(self, ref: str, cause: str, *, status: str = "COMPLETED", **fields: Json) -> None:
        task = self.definition.nodes[ref].task
        previous = self.tasks.get(ref)
        attempt = previous.attempt + 1 if previous is not None else 1
        done = status != "SCHEDULED"
        record = TaskRecord(
            ref=ref,
            name=task.task if isinstance(task, SimpleTask) else "",
            type=type(task).__struct_config__.tag or "",  # type: ignore[arg-type]
            status=status,  # type: ignore[arg-type]
            attempt=attempt,
            scheduled_at=self.at,
            started_at=self.at if done else None,
            ended_at=self.at if done else None,
            cause=cause,
        )
        self.put(msgspec.structs.replace(record, **fields))

    def finish(self, status: WorkflowStatus, output: Json, error: Failure | None = None) -> None:
        self.status, self.output, self.error = status, output, error

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
        )


def _root(record: TaskRecord) -> Json:
    return {
        "input": record.input,
        "output": record.output,
        "status": record.status,
        "attempt": record.attempt,
    }


def _start(definition: Definition, fact: Started) -> Decision:
    state = Saga(
        workflow_id=fact.workflow_id,
        workflow=definition.name,
        version=definition.version,
        status="RUNNING",
        input=fact.input,
        tenant=fact.tenant,
        created_at=fact.at,
        updated_at=fact.at,
        trace_id=fact.trace_id,
        traceparent=fact.traceparent,
    )
    draft = _Draft(definition, state, fact.at)
    _advance(draft, definition.first, START)
    new = draft.freeze()
    return Decision(new, commands_caused_by(definition, new, START))


def _task_ended(definition: Definition, state: Saga, fact: TaskCompleted | TaskFailed) -> Decision:
    cause = fact_id(fact)
    record = next((t for t in state.tasks if t.ref == fact.ref), None)
    if record is None or record.attempt != fact.attempt:
        return Decision(state, ())  # a stale attempt or a ref this saga never scheduled
    if record.status not in _WAITING:
        return Decision(state, commands_caused_by(definition, state, cause))  # redelivery
    if state.status in TERMINAL:
        return Decision(state, ())
    draft = _Draft(definition, state, fact.at)
    node = definition.nodes[fact.ref]
    match fact:
        case TaskCompleted(output=output):
            draft.put(_ended(record, "COMPLETED", fact, output=output))
            _advance(draft, node.successor, cause)
        case TaskFailed(error=error):
            draft.put(_ended(record, "FAILED", fact, error=error))
            if isinstance(node.task, SimpleTask) and node.task.optional:
                _advance(draft, node.successor, cause)
            else:
                message = f"task {fact.ref!r} failed: {error.message}"
                draft.finish(
                    "FAILED", None, Failure(type="task_failed", message=message, task=fact.ref)
                )
    new = draft.freeze()
    return Decision(new, commands_caused_by(definition, new, cause))


def _ended(
    record: TaskRecord, status: str, fact: TaskCompleted | TaskFailed, **fields: Json | Failure
) -> TaskRecord:
    return msgspec.structs.replace(
        record,
        status=status,
        started_at=fact.started_at or record.scheduled_at,
        ended_at=fact.at,
        worker=fact.worker,
        **fields,
    )


def _advance(draft: _Draft, ref: str | None, cause: str) -> None:
    """Run the definition forward from ``ref`` until a task must wait or the workflow ends.

    SWITCH, EVENT, SET_VARIABLE and TERMINATE complete inside the decision; SIMPLE stops
    the walk until its result comes back as a fact.
    """
    definition = draft.definition
    while ref is not None:
        node = definition.nodes[ref]
        templates = node.templates
        match node.task:
            case SimpleTask():
                data = templates["input"].evaluate(draft.context())
                draft.record(ref, cause, status="SCHEDULED", input=data)
                return
            case SwitchTask(cases=cases, default=default):
                value = templates["expression"].evaluate(draft.context())
                key = switch_key(value)
                branch = cases.get(key, default)
                draft.record(
                    ref,
                    cause,
                    input={"value": value},
                    output={"case": key if key in cases else "default"},
                )
                ref = branch[0].ref if branch else node.successor
            case EventTask():
                draft.record(ref, cause, input=templates["input"].evaluate(draft.context()))
                ref = node.successor
            case SetVariableTask():
                values = templates["input"].evaluate(draft.context())
                if isinstance(values, dict):
                    draft.set_variables(values)
                draft.record(ref, cause, input=values)
                ref = node.successor
            case TerminateTask(status=status, reason=reason):
                output = templates["output"].evaluate(draft.context())
                draft.record(ref, cause, output=output)
                error = Failure(
                    type="terminated", message=reason or f"terminated by task {ref!r}", task=ref
                )
                draft.finish(status, output, error if status == "FAILED" else None)
                return
    draft.finish("COMPLETED", definition.output.evaluate(draft.context()))
