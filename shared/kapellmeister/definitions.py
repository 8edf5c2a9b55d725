"""The definitions language: workflow definitions as data, parsed, checked and compiled.

A definition is YAML or JSON, decoded by msgspec into the structs below. What people
write by hand rejects unknown fields, so a typo is an error with its path
(``$.tasks[1].expresion``), not a silently ignored key. Netflix Conductor's field names
(``taskReferenceName``, ``inputParameters``, ``decisionCases``, ``defaultCase``,
``caseValueParam``, ``outputParameters``, ``DECISION``) are accepted as aliases and
rewritten to ours before decoding.

`compile_definition` turns a decoded `WorkflowDef` into a `Definition`: every template
parsed once, every task indexed by ref, and the successor of each task precomputed, so
the decider walks a table instead of the tree.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import yaml

from kapellmeister.conditions import Condition, compile_condition
from kapellmeister.errors import BadRequest, InvalidDefinition
from kapellmeister.expressions import (
    Compiled,
    ExpressionError,
    Json,
    compile_value,
    paths,
    switch_key,
)
from kapellmeister.messages import NAME_PATTERN

__all__ = [
    "After",
    "Concurrency",
    "Priority",
    "slot_name",
    "Definition",
    "DelayTask",
    "EventTask",
    "ForkTask",
    "GraphPlan",
    "GraphTask",
    "JoinTask",
    "RetryPolicy",
    "ScheduleDef",
    "SetVariableTask",
    "SimpleTask",
    "SubWorkflowTask",
    "SwitchTask",
    "TaskDef",
    "TenantConfig",
    "TerminateTask",
    "Trigger",
    "WaitTask",
    "WorkflowDef",
    "compile_definition",
    "load_definition",
    "load_definitions",
    "Node",
    "parse_definition",
    "subject_matches",
]

REF_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
TASK_PATTERN: Final = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
SUBJECT_PATTERN: Final = r"^events(\.[A-Za-z0-9_-]+)+$"
# A trigger's subject may use NATS wildcards: `*` for one token, a final `>` for the rest.
TRIGGER_PATTERN: Final = r"^events(\.([A-Za-z0-9_-]+|\*))*(\.>)?$"
RESERVED_REFS: Final = frozenset({"workflow", "event", "item", "index", "artefacts"})
ARTEFACT_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
# A requirement; a final `?` makes it optional (null if it never comes).
REQUIRED_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,63}\??$"

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Ref = Annotated[str, msgspec.Meta(pattern=REF_PATTERN)]
TaskName = Annotated[str, msgspec.Meta(pattern=TASK_PATTERN)]
EventSubject = Annotated[str, msgspec.Meta(pattern=SUBJECT_PATTERN)]
TriggerSubject = Annotated[str, msgspec.Meta(pattern=TRIGGER_PATTERN)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
# Work waiting for a concurrency slot is served highest priority first.
Priority = Annotated[int, msgspec.Meta(ge=0, le=99)]


class Concurrency(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """At most ``limit`` at once across every conductor replica (`kapellmeister.slots`);
    with ``key`` (an expression such as ``${workflow.input.customer}``), at most
    ``limit`` per value of it. What is over the limit waits, in order of priority, then
    of arrival."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)]
    key: str = ""


def slot_name(kind: Literal["wf", "task"], name: str, key: str, value: Json) -> str:
    """The `slots` bucket key of a semaphore: ``wf.<workflow>`` or ``task.<task name>``,
    and ``.k.<digest>`` of the key's JSON value when the limit has a ``key``."""
    if not key:
        return f"{kind}.{name}"
    digest = hashlib.sha256(msgspec.json.encode(value)).hexdigest()[:16]
    return f"{kind}.{name}.k.{digest}"


class RetryPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a failed task is tried again: ``count`` more attempts, spaced by ``logic``."""

    count: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    logic: Literal["FIXED", "EXPONENTIAL", "LINEAR"] = "FIXED"
    delay_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0


class _Task(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    ref: Ref
    description: str = ""
    # Run only if this holds (`kapellmeister.conditions`); else the task is SKIPPED.
    when: dict[str, Json] | None = None
    # Inside a GRAPH: the artefacts this task needs, and those its output provides.
    requires: list[Annotated[str, msgspec.Meta(pattern=REQUIRED_PATTERN)]] = []
    produces: list[Annotated[str, msgspec.Meta(pattern=ARTEFACT_PATTERN)]] = []


class SimpleTask(_Task, tag="SIMPLE", frozen=True):
    """Run an agent's task: published on ``tasks.<task>``, its result advances the saga."""

    task: TaskName
    input: dict[str, Json] = {}
    retry: RetryPolicy = RetryPolicy()
    timeout_s: PositiveSeconds | None = None
    response_timeout_s: PositiveSeconds | None = None
    timeout_policy: Literal["RETRY", "TIME_OUT_WF", "ALERT_ONLY"] = "TIME_OUT_WF"
    optional: bool = False
    # Undoes this task's effect if the workflow fails after it completed (the saga).
    compensate: SimpleTask | None = None
    # At most this many attempts of the task name dispatched at once, in all workflows.
    concurrency: Concurrency | None = None
    # The order among attempts waiting for a slot; None: the workflow's priority.
    priority: Priority | None = None

    def __post_init__(self) -> None:
        limit, heartbeat = self.timeout_s, self.response_timeout_s
        if limit is not None and heartbeat is not None and heartbeat > limit:
            raise ValueError(
                f"response_timeout_s ({heartbeat}) is longer than timeout_s ({limit}):"
                " the heartbeat bound must fit in the attempt's whole time"
            )


class SwitchTask(_Task, tag="SWITCH", frozen=True):
    """Choose a branch by the JSON text of ``expression`` (``true``, ``ok``, ``3``)."""

    expression: str
    cases: dict[str, list[TaskDef]] = {}
    # None: no default at all (the checker asks for one unless the cases cover every value).
    default: list[TaskDef] | None = None


class EventTask(_Task, tag="EVENT", frozen=True):
    """Publish ``input`` to ``subject`` on the EVENTS stream, once."""

    subject: EventSubject
    input: dict[str, Json] = {}


class TerminateTask(_Task, tag="TERMINATE", frozen=True):
    """End the workflow now with this status and output."""

    status: Literal["COMPLETED", "FAILED"] = "COMPLETED"
    output: dict[str, Json] = {}
    reason: str = ""


class SetVariableTask(_Task, tag="SET_VARIABLE", frozen=True):
    """Set ``workflow.variables.<key>`` for each key of ``input`` (Conductor's SET_VARIABLE)."""

    input: dict[str, Json] = {}


class WaitTask(_Task, tag="WAIT", frozen=True):
    """Wait for ``conductor.signal.<workflow_id>.<ref>``; the signal's body is the output.

    ``input`` is shown in the saga state (what is being waited for, e.g. the amount).
    """

    input: dict[str, Json] = {}


class DelayTask(_Task, tag="DELAY", frozen=True):
    """Wait ``duration_s`` seconds (a number or an expression), durably.

    The timer is a JetStream scheduled message: it fires on the server's clock and
    survives conductor restarts. Resolution is one second.
    """

    duration_s: Annotated[float, msgspec.Meta(ge=0)] | str


class ForkTask(_Task, tag="FORK", frozen=True):
    """Run branches in parallel and continue when all have finished.

    Static: ``branches`` (Conductor's ``forkTasks``), each a list of tasks. Dynamic:
    ``over`` (an expression naming a list) and ``each`` (one task run once per item, with
    ``${item}`` and ``${index}`` in its input). Output: the outputs of the branch tasks by
    ref (static), or the list of ``each``'s outputs in item order (dynamic).
    """

    branches: list[list[TaskDef]] = []
    over: str | None = None
    each: TaskDef | None = None
    # Dynamic only: at most this many items at once, streamed (`kapellmeister.decider`):
    # each item's record leaves the saga as it ends, and the output is a reference to
    # the list of outputs. Over `STREAM_OVER` items a FORK is streamed anyway.
    # (At most 1,000: their records are in the saga while they run.)
    max_parallel: Annotated[int, msgspec.Meta(ge=1, le=1_000)] | None = None


class GraphTask(_Task, tag="GRAPH", frozen=True):
    """Tasks linked by data, not by order: each runs as soon as every artefact it
    ``requires`` exists (in parallel with the others), unless its ``when`` is false or
    something it requires never comes (then it is SKIPPED). ``input`` seeds artefacts;
    a member's output is an object with a member per artefact it ``produces``; the
    GRAPH completes when nothing more can run, its output every artefact by name."""

    tasks: Annotated[list[TaskDef], msgspec.Meta(min_length=1)]
    input: dict[str, Json] = {}
    # Types of artefacts, in the input types' language (`str`, `int`, `object`, `?`…);
    # one a task produces that does not match fails that task's workflow.
    artefacts: dict[str, str] = {}


class JoinTask(_Task, tag="JOIN", frozen=True):
    """Conductor's JOIN after a FORK: output ``{ref: output}`` of the ``join_on`` refs."""

    join_on: list[Ref] = []


class SubWorkflowTask(_Task, tag="SUB_WORKFLOW", frozen=True):
    """Start workflow ``workflow`` (its own saga, linked both ways) and wait for its end."""

    workflow: Name
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    input: dict[str, Json] = {}
    optional: bool = False


TaskDef = (
    SimpleTask
    | SwitchTask
    | EventTask
    | TerminateTask
    | SetVariableTask
    | WaitTask
    | DelayTask
    | ForkTask
    | GraphTask
    | JoinTask
    | SubWorkflowTask
)


class Trigger(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Start the workflow for each event stored on a subject matching ``subject``, with
    ``input`` evaluated against ``${event.…}`` (the event's data)."""

    subject: TriggerSubject
    input: dict[str, Json] = {}


class ScheduleDef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A schedule the definition brings (`kapellmeister.schedules`): stored, or brought up
    to date, when the definition is registered or a conductor starts. ``name`` defaults
    to the workflow's (``<workflow>-<n>`` for the n-th of several)."""

    name: Name | None = None
    cron: str | None = None
    every_s: Annotated[int, msgspec.Meta(ge=1)] | None = None
    input: dict[str, Json] = {}
    catch_up: Literal["skip", "once", "all"] = "skip"
    timezone: str = "UTC"
    tenant: str = ""


class TenantConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a tenant does not get: the refs of tasks switched off (SKIPPED) for it.
    (Not ``off``: YAML reads an unquoted ``off`` as false.)"""

    skip: list[Ref] = []


class WorkflowDef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A workflow definition as written (YAML or JSON)."""

    name: Name
    version: Annotated[int, msgspec.Meta(ge=1)] = 1
    description: str = ""
    input: dict[str, str] = {}
    tasks: Annotated[list[TaskDef], msgspec.Meta(min_length=1)]
    output: dict[str, Json] = {}
    timeout_s: PositiveSeconds | None = None
    # A workflow started when this one fails or times out (Conductor's failureWorkflow),
    # with input {"workflow_id", "workflow", "status", "error", "input"}.
    failure: Name | None = None
    # Events that start it (on the EVENTS stream), each with its input mapping.
    triggers: list[Trigger] = []
    # Per tenant (the `Tenant` header of a start), tasks switched off.
    tenants: dict[str, TenantConfig] = {}
    # Starts on a cron or an interval (`kapellmeister.schedules`).
    schedules: list[ScheduleDef] = []
    # How long a finished workflow is kept after it ends; then the sweeper removes its
    # saga from KV. None: KAPELLMEISTER_RETENTION_S, and without that, kept.
    retention_s: PositiveSeconds | None = None
    # At most this many of its workflows RUNNING (or PAUSED) at once; the rest are QUEUED.
    concurrency: Concurrency | None = None
    # Its workflows' priority unless a start's `Priority` header says otherwise.
    priority: Priority = 0


# Conductor's names for our fields. `name` is Conductor's task-definition name only when
# the task also uses `taskReferenceName`; at the workflow level `name` is ours already.
_ALIASES: Final = {
    "taskReferenceName": "ref",
    "inputParameters": "input",
    "decisionCases": "cases",
    "defaultCase": "default",
    "outputParameters": "output",
    "timeoutSeconds": "timeout_s",
    "responseTimeoutSeconds": "response_timeout_s",
    "timeoutPolicy": "timeout_policy",
    "failureWorkflow": "failure",
    "forkTasks": "branches",
    "joinOn": "join_on",
    "terminationStatus": "status",
    "workflowOutput": "output",
    "terminationReason": "reason",
}
_TYPE_ALIASES: Final = {"DECISION": "SWITCH", "FORK_JOIN": "FORK", "HUMAN": "WAIT"}


def _normalize_task(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    task: dict[str, Any] = {_ALIASES.get(k) or k: v for k, v in raw.items()}
    if isinstance(task.get("type"), str):
        task["type"] = _TYPE_ALIASES.get(task["type"], task["type"])
    _conductor_fields(task, named="taskReferenceName" in raw)
    _normalize_children(task)
    return task


def _conductor_fields(task: dict[str, Any], *, named: bool) -> None:
    """Rewrite Conductor's task fields that do not map one to one onto ours."""
    if named and "name" in task:
        # Conductor names every task; only a SIMPLE task's name is the agent's task.
        name = task.pop("name")
        if task.get("type") == "SIMPLE":
            task.setdefault("task", name)
    param = task.pop("caseValueParam", None)
    if isinstance(param, str) and "expression" not in task:
        inputs = task.pop("input", {})
        task["expression"] = inputs.get(param, "") if isinstance(inputs, dict) else ""
    sink = task.pop("sink", None)
    if isinstance(sink, str) and task.get("type") == "EVENT":
        # Conductor's EVENT names its sink as "<kind>:<subject>"; ours is always NATS.
        task.setdefault("subject", sink.split(":", 1)[-1])
    sub = task.pop("subWorkflowParam", None)
    if isinstance(sub, dict):
        task.setdefault("workflow", sub.get("name"))
        if sub.get("version") is not None:
            task.setdefault("version", sub.get("version"))


def _normalize_children(task: dict[str, Any]) -> None:
    """Normalize the tasks nested in a SWITCH, a FORK or a compensation."""
    if isinstance(task.get("cases"), dict):
        # YAML reads `true:` or `3:` as a bool or an int; a case key is the JSON text.
        task["cases"] = {
            k if isinstance(k, str) else switch_key(k): _normalize_tasks(v)
            for k, v in task["cases"].items()
        }
    if "default" in task:
        task["default"] = _normalize_tasks(task["default"])
    if isinstance(task.get("branches"), list):
        task["branches"] = [_normalize_tasks(b) for b in task["branches"]]
    for single in ("each", "compensate"):
        if single in task:
            task[single] = _normalize_task(task[single])


def _normalize_tasks(raw: Any) -> Any:
    return [_normalize_task(t) for t in raw] if isinstance(raw, list) else raw


def _normalize(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    workflow = {_ALIASES.get(k, k): v for k, v in raw.items()}
    workflow.pop("schemaVersion", None)
    if "tasks" in workflow:
        workflow["tasks"] = _normalize_tasks(workflow["tasks"])
    return workflow


def parse_definition(data: bytes | str | Mapping[str, Any]) -> WorkflowDef:
    """Decode a definition from YAML or JSON text, or an already parsed mapping.

    Raises:
        InvalidDefinition: the text does not parse or does not fit the language; the
            message names the path (``$.tasks[0].task``).
    """
    if isinstance(data, bytes | str):
        try:
            raw = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise InvalidDefinition(f"not YAML or JSON: {exc}") from exc
    else:
        raw = data
    try:
        return msgspec.convert(_normalize(raw), WorkflowDef)
    except msgspec.ValidationError as exc:
        raise InvalidDefinition(str(exc)) from exc


_INPUT_TYPES: Final[dict[str, Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "datetime": datetime.datetime,
    "date": datetime.date,
    "list": list[Json],
    "object": dict[str, Json],
    "any": Json,
}


def _input_struct(name: str, schema: Mapping[str, str]) -> type[msgspec.Struct]:
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for field, type_name in schema.items():
        optional = type_name.endswith("?")
        base = _INPUT_TYPES.get(type_name.removesuffix("?"))
        if base is None:
            known = ", ".join(sorted(_INPUT_TYPES))
            raise InvalidDefinition(
                f"unknown type {type_name!r} - at `$.input.{field}` (known: {known}, '?' suffix)"
            )
        fields.append((field, base | None, None) if optional else (field, base))
    return msgspec.defstruct(f"{name}_input", fields, kw_only=True, forbid_unknown_fields=True)


class After(msgspec.Struct, frozen=True):
    """Where the walk goes once a task is done.

    ``next``: run ``ref``. ``branch``: branch ``branch`` of FORK ``ref`` is finished.
    ``instance``: one item of dynamic FORK ``ref`` is finished. ``end``: the workflow is.
    ``compensation``: the compensation of task ``ref`` is finished.
    """

    kind: Literal["next", "branch", "instance", "end", "compensation", "graph"]
    ref: str | None = None
    branch: int = 0


_END: Final = After("end")


class Node(msgspec.Struct, frozen=True):
    """One task of a compiled definition: its def, where it sits, what comes after it."""

    task: TaskDef
    path: str
    after: After
    templates: Mapping[str, Compiled]
    condition: Condition | None = None

    @property
    def successor(self) -> str | None:
        """The next task in sequence, if the walk simply goes on to one."""
        return self.after.ref if self.after.kind == "next" else None


class Definition:
    """A compiled, checked definition: what the decider reads. Build with `compile_definition`."""

    def __init__(
        self, spec: WorkflowDef, nodes: dict[str, Node], graphs: dict[str, GraphPlan] | None = None
    ) -> None:
        self.spec = spec
        self.graphs = graphs or {}
        self.name = spec.name
        self.version = spec.version
        self.nodes = nodes
        self.first = spec.tasks[0].ref
        self.output = _compile_output(spec)
        self.triggers: list[tuple[Trigger, Compiled]] = [
            (t, _compile_trigger(t, i)) for i, t in enumerate(spec.triggers)
        ]
        self._input_type = _input_struct(spec.name, spec.input)
        self.concurrency_key = _compile_concurrency_key(spec)
        # Whether any concurrency limit applies: saga writes may then free slots.
        self.limited = spec.concurrency is not None or any(
            isinstance(n.task, SimpleTask) and n.task.concurrency is not None
            for n in nodes.values()
        )
        # For each task, the refs that may have finished before it starts.
        self.ran_before = _ran_before(spec.tasks)

    def downstream(self, ref: str) -> frozenset[str]:
        """``ref``, what is inside it, and every task that may run after it."""
        node = self.nodes[ref]
        return frozenset(
            {r for r, before in self.ran_before.items() if ref in before} | set(_inside(node.task))
        )

    def validate_input(self, data: Json) -> None:
        """Check a workflow input against the definition's ``input`` schema.

        Raises:
            BadRequest: with msgspec's path message, e.g. ``... - at `$.datetime```.
        """
        if not isinstance(data, dict):
            raise BadRequest("workflow input must be a JSON object")
        try:
            msgspec.convert(data, self._input_type)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid input for {self.name}: {exc}") from exc

    def __repr__(self) -> str:
        return f"Definition({self.name!r}, version={self.version})"


def _link(
    tasks: Sequence[TaskDef], path: str, after: After
) -> Iterator[tuple[TaskDef, str, After]]:
    """Every task under ``tasks`` with its path and what comes after it."""
    for i, task in enumerate(tasks):
        then = After("next", tasks[i + 1].ref) if i + 1 < len(tasks) else after
        yield from _link_at(task, f"{path}[{i}]", then)


def _link_at(task: TaskDef, here: str, then: After) -> Iterator[tuple[TaskDef, str, After]]:
    """``task`` at ``here``, followed by ``then``, and every task inside it."""
    yield task, here, then
    match task:
        case SwitchTask(cases=cases, default=default):
            for key, branch in cases.items():
                yield from _link(branch, f"{here}.cases.{key}", then)
            yield from _link(default or [], f"{here}.default", then)
        case ForkTask(branches=branches, each=each):
            for b, branch in enumerate(branches):
                yield from _link(branch, f"{here}.branches[{b}]", After("branch", task.ref, b))
            if each is not None:
                yield each, f"{here}.each", After("instance", task.ref)
        case GraphTask(tasks=members):
            for m, member in enumerate(members):
                yield from _link_at(member, f"{here}.tasks[{m}]", After("graph", task.ref))
        case SimpleTask(compensate=compensate) if compensate is not None:
            yield compensate, f"{here}.compensate", After("compensation", task.ref)


def _templates(task: TaskDef, path: str) -> dict[str, Compiled]:
    try:
        return _compile_templates(task)
    except ExpressionError as exc:
        raise InvalidDefinition(f"{exc} - at `{path}`") from exc


def _compile_templates(task: TaskDef) -> dict[str, Compiled]:
    match task:
        case SimpleTask(input=data, concurrency=Concurrency(key=key)) if key:
            return {"input": compile_value(dict(data)), "concurrency_key": compile_value(key)}
        case (
            SimpleTask(input=data)
            | EventTask(input=data)
            | SetVariableTask(input=data)
            | WaitTask(input=data)
            | SubWorkflowTask(input=data)
            | GraphTask(input=data)
        ):
            return {"input": compile_value(dict(data))}
        case TerminateTask(output=data, reason=reason):
            return {"output": compile_value(dict(data)), "reason": compile_value(reason)}
        case SwitchTask(expression=expression):
            return {"expression": compile_value(expression)}
        case DelayTask(duration_s=duration):
            return {"duration_s": compile_value(duration)}
        case ForkTask(over=over) if over is not None:
            return {"over": compile_value(over)}
    return {}


def _check_shape(task: TaskDef, path: str, previous: TaskDef | None) -> None:
    match task:
        case ForkTask(branches=branches, over=over, each=each):
            if bool(branches) == (over is not None or each is not None):
                raise InvalidDefinition(
                    f"a FORK has either `branches` or `over` with `each` - at `{path}`"
                )
            if task.max_parallel is not None and over is None:
                raise InvalidDefinition(
                    f"max_parallel belongs to a dynamic FORK (`over`/`each`) - at `{path}`"
                )
            if (over is None) != (each is None):
                raise InvalidDefinition(
                    f"a dynamic FORK needs both `over` and `each` - at `{path}`"
                )
            if each is not None and not isinstance(each, SimpleTask | SubWorkflowTask):
                raise InvalidDefinition(
                    f"`each` must be a SIMPLE or SUB_WORKFLOW task - at `{path}.each`"
                )
            if isinstance(each, SimpleTask) and each.compensate is not None:
                # One compensation per item is not built: refused here, rather than a
                # decider that cannot find it when the workflow fails.
                raise InvalidDefinition(
                    "a dynamic FORK's `each` cannot have `compensate` (undo the items in a "
                    f"task of a failure workflow instead) - at `{path}.each.compensate`"
                )
        case JoinTask():
            if not isinstance(previous, ForkTask):
                raise InvalidDefinition(f"a JOIN must come right after a FORK - at `{path}`")
        case GraphTask(tasks=members):
            for m, member in enumerate(members):
                if not isinstance(member, SimpleTask | WaitTask | SubWorkflowTask):
                    raise InvalidDefinition(
                        "a GRAPH's tasks are SIMPLE, WAIT or SUB_WORKFLOW tasks"
                        f" - at `{path}.tasks[{m}].type`"
                    )


class GraphPlan:
    """A GRAPH's members: what each requires (and whether optionally) and produces, who
    produces each artefact ('' for one the GRAPH's ``input`` seeds), and the order in
    which the decider looks at them (producers before consumers, else as written)."""

    def __init__(self, graph: GraphTask) -> None:
        self.ref = graph.ref
        self.members = [m.ref for m in graph.tasks]
        self.requires = {
            m.ref: tuple((r.rstrip("?"), r.endswith("?")) for r in m.requires) for m in graph.tasks
        }
        self.produces = {m.ref: tuple(m.produces) for m in graph.tasks}
        self.producer: dict[str, str] = dict.fromkeys(graph.input, "")
        self.types = dict(graph.artefacts)
        self._structs: dict[str, type[msgspec.Struct]] = {}
        for member in graph.tasks:
            for artefact in member.produces:
                self.producer.setdefault(artefact, member.ref)
        self.order: list[str] = []

    @classmethod
    def of(cls, graph: GraphTask, path: str = "") -> GraphPlan:
        """The plan, checked.

        Raises:
            InvalidDefinition: an artefact required but produced by nothing, produced
                twice, or a cycle of requirements; the message names the path.
        """
        plan = cls(graph)
        plan._check(graph, path)
        return plan

    def _depends(self, ref: str) -> list[str]:
        found = (self.producer.get(name, "") for name, _ in self.requires[ref])
        return [p for p in found if p]

    def _check(self, graph: GraphTask, path: str) -> None:
        seen: dict[str, str] = dict.fromkeys(graph.input, f"{path}.input")
        for m, member in enumerate(graph.tasks):
            for p, artefact in enumerate(member.produces):
                where = f"{path}.tasks[{m}].produces[{p}]"
                if artefact in seen:
                    raise InvalidDefinition(
                        f"artefact {artefact!r} is produced twice ({seen[artefact]}) - at `{where}`"
                    )
                seen[artefact] = where
        for m, member in enumerate(graph.tasks):
            for r, (artefact, _) in enumerate(self.requires[member.ref]):
                if artefact not in self.producer:
                    raise InvalidDefinition(
                        f"artefact {artefact!r} required by {member.ref!r} is produced by no"
                        f" task - at `{path}.tasks[{m}].requires[{r}]`"
                    )
        self.order = self._sorted(path)
        for artefact in graph.artefacts:
            if artefact not in self.producer:
                raise InvalidDefinition(
                    f"artefact {artefact!r} has a type but nothing produces it"
                    f" - at `{path}.artefacts.{artefact}`"
                )
        try:  # one struct per artefact: a task's output holds only some of them
            self._structs = {
                name: _input_struct(f"{graph.ref}_{name}", {name: kind})
                for name, kind in graph.artefacts.items()
            }
        except InvalidDefinition as exc:
            raise InvalidDefinition(exc.message.replace("$.input", f"{path}.artefacts")) from exc

    def invalid(self, values: Mapping[str, Json]) -> str | None:
        """Why these artefact values do not have their declared types (None if they do)."""
        for name, value in values.items():
            struct = self._structs.get(name)
            if struct is None:
                continue
            try:
                msgspec.convert({name: value}, struct)
            except msgspec.ValidationError as exc:
                return str(exc).replace("$.", "artefact ")
        return None

    def _sorted(self, path: str) -> list[str]:
        """Members with producers first (depth-first, as written); a cycle is refused."""
        done: list[str] = []
        visiting: list[str] = []

        def visit(ref: str) -> None:
            if ref in done:
                return
            if ref in visiting:
                cycle = [*visiting[visiting.index(ref) :], ref]
                raise InvalidDefinition(
                    f"requires/produces form a cycle: {' -> '.join(cycle)} - at `{path}.tasks`"
                )
            visiting.append(ref)
            for upstream in self._depends(ref):
                visit(upstream)
            visiting.pop()
            done.append(ref)

        for ref in self.members:
            visit(ref)
        return done

    def upstream(self, ref: str) -> frozenset[str]:
        """Every member ``ref`` depends on, directly or not."""
        found: set[str] = set()
        stack = self._depends(ref)
        while stack:
            member = stack.pop()
            if member not in found:
                found.add(member)
                stack += self._depends(member)
        return frozenset(found)


# --- which refs can have run before each task ---------------------------------------------


def _ran_before(tasks: Sequence[TaskDef]) -> dict[str, frozenset[str]]:
    """For each task, the refs that may have finished before it starts.

    A task sees everything before it in its sequence (including what ran inside those
    tasks' branches), what its enclosing sequences had before them, and the SWITCHes
    that chose its branch; never its own FORK's other branches, nor anything later.
    """
    result: dict[str, frozenset[str]] = {}
    _walk_before(tasks, frozenset(), result)
    return result


def _inside(task: TaskDef) -> Iterator[str]:
    """Every ref within ``task`` that expressions after it can name, itself included.

    A dynamic FORK's ``each`` is not one of them: its runs are recorded as ``each[0]``,
    ``each[1]``…, and read through the FORK's output.
    """
    yield task.ref
    match task:
        case SwitchTask(cases=cases, default=default):
            for branch in (*cases.values(), default or []):
                for inner in branch:
                    yield from _inside(inner)
        case ForkTask(branches=branches):
            for branch in branches:
                for inner in branch:
                    yield from _inside(inner)
        case GraphTask(tasks=members):
            for member in members:
                yield from _inside(member)


def _walk_before(
    tasks: Sequence[TaskDef], seen: frozenset[str], out: dict[str, frozenset[str]]
) -> None:
    for task in tasks:
        out[task.ref] = seen
        match task:
            case SwitchTask(cases=cases, default=default):
                for branch in (*cases.values(), default or []):
                    _walk_before(branch, seen | {task.ref}, out)
            case ForkTask(branches=branches, each=each):
                for branch in branches:
                    _walk_before(branch, seen, out)
                if each is not None:
                    out[each.ref] = seen
            case SimpleTask(compensate=compensate) if compensate is not None:
                # A compensation runs after its task completed, on the way out.
                out[compensate.ref] = seen | {task.ref}
            case GraphTask(tasks=members):
                # A member runs after what was before the GRAPH and what it depends on.
                plan = GraphPlan.of(task)
                for member in members:
                    _walk_before([member], seen | plan.upstream(member.ref), out)
        seen = seen | frozenset(_inside(task))


def compile_definition(spec: WorkflowDef) -> Definition:
    """Index, link and structurally check a decoded definition.

    Raises:
        InvalidDefinition: a duplicate or reserved ref, a misshapen FORK or JOIN, or an
            expression naming a task ref the definition does not have; the message names
            the path.
    """
    _input_struct(spec.name, spec.input)
    nodes: dict[str, Node] = {}
    previous: dict[str, TaskDef] = {}
    graphs: dict[str, GraphPlan] = {}
    for task, path, after in _link(spec.tasks, "tasks", _END):
        if task.ref in RESERVED_REFS:
            raise InvalidDefinition(f"ref {task.ref!r} is reserved - at `{path}.ref`")
        if task.ref in nodes:
            raise InvalidDefinition(f"duplicate ref {task.ref!r} - at `{path}.ref`")
        if after.kind == "next" and after.ref is not None:
            previous[after.ref] = task
        _check_shape(task, path, previous.get(task.ref))
        condition = compile_condition(task.when, f"{path}.when") if task.when else None
        nodes[task.ref] = Node(task, path, after, _templates(task, path), condition)
        if (task.requires or task.produces) and after.kind != "graph":
            raise InvalidDefinition(f"requires/produces belong to a GRAPH's tasks - at `{path}`")
        if isinstance(task, GraphTask):
            graphs[task.ref] = GraphPlan.of(task, path)
    _check_references(spec, nodes)
    for tenant, config in spec.tenants.items():
        for i, ref in enumerate(config.skip):
            if ref not in nodes:
                raise InvalidDefinition(
                    f"no task {ref!r} to switch off - at `tenants.{tenant}.skip[{i}]`"
                )
    return Definition(spec, nodes, graphs)


def _compile_trigger(trigger: Trigger, index: int) -> Compiled:
    """A trigger's input mapping, which may name only ``${event.…}``."""
    where = f"triggers[{index}].input"
    try:
        compiled = compile_value(dict(trigger.input))
    except ExpressionError as exc:
        raise InvalidDefinition(f"{exc} - at `{where}`") from exc
    for path in paths(compiled):
        if path[0] != "event":
            raise InvalidDefinition(
                f"a trigger's input may name only ${{event.…}}, not {path[0]!r} - at `{where}`"
            )
    return compiled


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches the NATS subject ``pattern`` (``*``, a final ``>``)."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(wanted)


def _compile_concurrency_key(spec: WorkflowDef) -> Compiled | None:
    """The workflow's concurrency key, which is evaluated at start: ``${workflow.…}`` only."""
    if spec.concurrency is None or not spec.concurrency.key:
        return None
    try:
        compiled = compile_value(spec.concurrency.key)
    except ExpressionError as exc:
        raise InvalidDefinition(f"{exc} - at `concurrency.key`") from exc
    for path in paths(compiled):
        if path[0] != "workflow":
            raise InvalidDefinition(
                "a workflow's concurrency key may name only ${workflow.…}, not "
                f"{path[0]!r} - at `concurrency.key`"
            )
    return compiled


def _compile_output(spec: WorkflowDef) -> Compiled:
    try:
        return compile_value(dict(spec.output))
    except ExpressionError as exc:
        raise InvalidDefinition(f"{exc} - at `output`") from exc


def _check_references(spec: WorkflowDef, nodes: Mapping[str, Node]) -> None:
    known = set(nodes) | RESERVED_REFS
    places = [
        (f"{node.path}.{field}", c)
        for node in nodes.values()
        for field, c in node.templates.items()
    ]
    places.append(("output", _compile_output(spec)))
    named: list[tuple[str, Iterable[tuple[str, ...]]]] = [(p, paths(c)) for p, c in places]
    named += [(f"{n.path}.when", n.condition.paths()) for n in nodes.values() if n.condition]
    for place, found in named:
        for path in found:
            if path[0] not in known:
                raise InvalidDefinition(
                    f"expression names unknown task ref {path[0]!r} - at `{place}`"
                )
    for node in nodes.values():
        if isinstance(node.task, JoinTask):
            for i, ref in enumerate(node.task.join_on):
                if ref not in nodes:
                    raise InvalidDefinition(
                        f"join_on names unknown task ref {ref!r} - at `{node.path}.join_on[{i}]`"
                    )


def load_definition(path: Path) -> Definition:
    """Read, parse and compile one definition file (``.yaml``, ``.yml`` or ``.json``)."""
    try:
        return compile_definition(parse_definition(path.read_bytes()))
    except InvalidDefinition as exc:
        raise InvalidDefinition(f"{path.name}: {exc.message}") from exc


def load_definitions(directory: Path) -> list[Definition]:
    """Read every definition file in a directory, sorted by file name."""
    files = sorted(p for p in directory.iterdir() if p.suffix in {".yaml", ".yml", ".json"})
    return [load_definition(p) for p in files]
