"""Static checks of a workflow definition, at registration and with ``kapellmeister check``.

Parsing and compiling (`kapellmeister.definitions`) already reject what does not fit the
language. The checker finds what fits but cannot work, and reports every problem with its
path in the definition (``tasks[2].input.date``):

* a SIMPLE task naming a task no agent has registered;
* an input field the agent's input schema does not have, or a required one missing;
* ``${ref.output.field}`` where the agent's output schema has no ``field``;
* an expression naming a task that cannot have run before it (a later task, a task in
  another branch of the same FORK, itself);
* a SWITCH with no ``default`` whose cases do not cover every value of its expression;
* a SUB_WORKFLOW naming an unknown workflow, or a chain of sub-workflows that comes
  back to this one (a cycle);
* a schedule with no or both of ``cron`` and ``every_s``, a cron that does not parse, an
  unknown timezone, an input the workflow would refuse, or a name that is not one (too
  long: ``<workflow>-<n>``) or is used twice.

Agent task registrations and other definitions are optional inputs: offline, only what
the definition alone can tell is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from kapellmeister.definitions import (
    Definition,
    ForkTask,
    Node,
    SimpleTask,
    SubWorkflowTask,
    SwitchTask,
    compile_definition,
    parse_definition,
)
from kapellmeister.errors import BadRequest, InvalidDefinition
from kapellmeister.expressions import Compiled, DictOf, ListOf, Reference, paths
from kapellmeister.schedules import SCHEDULE_NAME, from_definition, validate

__all__ = ["Problem", "SubWorkflows", "check", "check_file", "problems_message"]

# What the checker needs to know of other definitions: name -> the SUB_WORKFLOWs' names.
SubWorkflows = Callable[[str], Sequence[str] | None]


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a definition, and where (``tasks[1].input.date``)."""

    path: str
    message: str


def check(
    definition: Definition,
    tasks: Mapping[str, Mapping[str, Any]] | None = None,
    sub_workflows: SubWorkflows | None = None,
) -> list[Problem]:
    """Every problem found in ``definition``; empty when it is fine.

    Args:
        definition: the compiled definition.
        tasks: agent task registrations by task name (``input_schema``,
            ``output_schema``); None skips the checks that need them.
        sub_workflows: the SUB_WORKFLOW names of a registered workflow, None for an
            unknown one; None skips the sub-workflow checks.
    """
    problems: list[Problem] = []
    before = definition.ran_before
    for ref, node in definition.nodes.items():
        problems += _check_expressions(definition, node, before[ref], tasks)
        match node.task:
            case SimpleTask() as task if tasks is not None:
                problems += _check_agent_task(node, task, tasks)
            case SwitchTask() as task:
                problems += _check_switch(definition, node, task, tasks)
            case SubWorkflowTask() as task if sub_workflows is not None:
                problems += _check_sub_workflow(definition, node, task, sub_workflows)
    problems += _check_output(definition, tasks)
    problems += _check_schedules(definition)
    return problems


def _check_schedules(definition: Definition) -> Iterator[Problem]:
    """Each schedule's timing (one of cron and every_s, a cron that parses, a known
    timezone) and its input, against the definition's own input schema."""
    seen: set[str] = set()
    for n, spec in enumerate(from_definition(definition.spec)):
        if not SCHEDULE_NAME.fullmatch(spec.name):
            yield Problem(
                path=f"schedules[{n}]",
                message=f"name {spec.name!r} is not 1-64 of A-Z a-z 0-9 _ - (give it a `name`)",
            )
        elif spec.name in seen:
            yield Problem(path=f"schedules[{n}]", message=f"name {spec.name!r} is used twice")
        seen.add(spec.name)
        try:
            validate(spec)
        except BadRequest as exc:
            yield Problem(path=f"schedules[{n}]", message=exc.message)
        try:
            definition.validate_input(spec.input)
        except BadRequest as exc:
            yield Problem(path=f"schedules[{n}].input", message=exc.message)


def check_file(path: Path, online_tasks: Mapping[str, Any] | None = None) -> list[Problem]:
    """Parse, compile and check a definition file; parse errors are problems too."""
    try:
        definition = compile_definition(parse_definition(path.read_bytes()))
    except InvalidDefinition as exc:
        return [Problem(path=_where(exc.message), message=exc.message)]
    return check(definition, online_tasks)


def problems_message(name: str, problems: Sequence[Problem]) -> str:
    """One line for an error reply: ``2 problems in x: tasks[1]: ...; output: ...``."""
    shown = "; ".join(f"{p.path}: {p.message}" for p in problems)
    noun = "problem" if len(problems) == 1 else "problems"
    return f"{len(problems)} {noun} in {name}: {shown}"


def _where(message: str) -> str:
    """The path msgspec or the compiler named in ``message`` (``$.tasks[0]`` -> ``tasks[0]``)."""
    if "- at `" in message:
        return message.rsplit("- at `", 1)[1].rstrip("`").removeprefix("$.")
    return "definition"


# --- expressions ---------------------------------------------------------------------------


def _leaves(compiled: Compiled, path: str) -> Iterator[tuple[str, Compiled]]:
    """Each template in a compiled value with its path (``input.date``)."""
    match compiled:
        case DictOf(items=items):
            for key, value in items:
                yield from _leaves(value, f"{path}.{key}")
        case ListOf(items=values):
            for i, value in enumerate(values):
                yield from _leaves(value, f"{path}[{i}]")
        case _:
            yield path, compiled


def _check_expressions(
    definition: Definition,
    node: Node,
    before: frozenset[str],
    tasks: Mapping[str, Mapping[str, Any]] | None,
) -> Iterator[Problem]:
    allowed = before | {"workflow"}
    if node.task.ref in _each_refs(definition):
        allowed = allowed | {"item", "index"}
    for field, compiled in node.templates.items():
        for where, leaf in _leaves(compiled, f"{node.path}.{field}"):
            for path in paths(leaf):
                root = path[0]
                if root not in allowed:
                    later = (
                        "itself"
                        if root == node.task.ref
                        else "a task that cannot have run before it"
                    )
                    yield Problem(where, f"`${{{'.'.join(path)}}}` names {later} ({root!r})")
                    continue
                problem = _output_field(definition, path, tasks)
                if problem:
                    yield Problem(where, problem)


def _each_refs(definition: Definition) -> set[str]:
    return {
        n.task.each.ref
        for n in definition.nodes.values()
        if isinstance(n.task, ForkTask) and n.task.each is not None
    }


def _output_field(
    definition: Definition, path: tuple[str, ...], tasks: Mapping[str, Mapping[str, Any]] | None
) -> str | None:
    """A problem if ``path`` reads a field the agent's output schema does not have."""
    if tasks is None or len(path) < 3 or path[1] != "output":
        return None
    node = definition.nodes.get(path[0])
    if node is None or not isinstance(node.task, SimpleTask) or node.task.task not in tasks:
        return None
    schema = _resolve(tasks[node.task.task].get("output_schema", {}))
    properties = schema.get("properties")
    if isinstance(properties, dict) and path[2] not in properties:
        known = ", ".join(sorted(properties)) or "none"
        return (
            f"`${{{'.'.join(path)}}}`: {node.task.task} has no output field "
            f"{path[2]!r} (it has: {known})"
        )
    return None


def _resolve(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """The object schema behind msgspec's ``{"$ref": "#/$defs/X", "$defs": {...}}``."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        found = schema.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
        return found if isinstance(found, Mapping) else {}
    return schema


# --- agent tasks ---------------------------------------------------------------------------


def _check_agent_task(
    node: Node, task: SimpleTask, tasks: Mapping[str, Mapping[str, Any]]
) -> Iterator[Problem]:
    registration = tasks.get(task.task)
    if registration is None:
        known = ", ".join(sorted(tasks)) or "none registered"
        yield Problem(f"{node.path}.task", f"no agent serves task {task.task!r} (known: {known})")
        return
    schema = _resolve(registration.get("input_schema", {}))
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return
    # Inside a GRAPH, the artefacts a task requires are input fields too.
    artefacts = [r.rstrip("?") for r in task.requires]
    for field, where in [
        *((f, f"input.{f}") for f in task.input),
        *((a, f"requires[{i}]") for i, a in enumerate(artefacts)),
    ]:
        if field not in properties:
            yield Problem(
                f"{node.path}.{where}",
                f"{task.task} takes no field {field!r} (it takes: {', '.join(sorted(properties))})",
            )
    for field in schema.get("required", []):
        if field not in task.input and field not in artefacts:
            yield Problem(f"{node.path}.input", f"{task.task} requires field {field!r}")


# --- SWITCH coverage -----------------------------------------------------------------------


def _check_switch(
    definition: Definition,
    node: Node,
    task: SwitchTask,
    tasks: Mapping[str, Mapping[str, Any]] | None,
) -> Iterator[Problem]:
    if task.default is not None:
        return
    values = _possible_values(definition, node.templates["expression"], tasks)
    if values is not None and values <= set(task.cases):
        return
    missing = (
        "" if values is None else f" (uncovered: {', '.join(sorted(values - set(task.cases)))})"
    )
    yield Problem(
        f"{node.path}.default",
        f"SWITCH {task.ref!r} has no default and its cases may not match{missing}",
    )


def _possible_values(
    definition: Definition, expression: Compiled, tasks: Mapping[str, Mapping[str, Any]] | None
) -> set[str] | None:
    """Every case key the expression can produce, when its type says (a bool, an enum)."""
    if not isinstance(expression, Reference) or tasks is None or len(expression.path) != 3:
        return None
    ref, part, field = expression.path
    node = definition.nodes.get(ref)
    if part != "output" or node is None or not isinstance(node.task, SimpleTask):
        return None
    registration = tasks.get(node.task.task)
    if registration is None:
        return None
    prop = _resolve(registration.get("output_schema", {})).get("properties", {}).get(field, {})
    if prop.get("type") == "boolean":
        return {"true", "false"}
    enum = prop.get("enum")
    return {str(v) for v in enum} if isinstance(enum, list) else None


# --- sub-workflows -------------------------------------------------------------------------


def _check_sub_workflow(
    definition: Definition, node: Node, task: SubWorkflowTask, sub_workflows: SubWorkflows
) -> Iterator[Problem]:
    if task.workflow != definition.name and sub_workflows(task.workflow) is None:
        yield Problem(f"{node.path}.workflow", f"no workflow definition named {task.workflow!r}")
        return
    chain = _cycle(definition.name, task.workflow, sub_workflows, [definition.name])
    if chain:
        yield Problem(f"{node.path}.workflow", f"sub-workflows form a cycle: {' -> '.join(chain)}")


def _cycle(origin: str, name: str, sub_workflows: SubWorkflows, chain: list[str]) -> list[str]:
    if name == origin:
        return [*chain, name]
    if name in chain:
        return []
    for child in sub_workflows(name) or ():
        found = _cycle(origin, child, sub_workflows, [*chain, name])
        if found:
            return found
    return []


def _check_output(
    definition: Definition, tasks: Mapping[str, Mapping[str, Any]] | None
) -> Iterator[Problem]:
    for where, leaf in _leaves(definition.output, "output"):
        for path in paths(leaf):
            problem = _output_field(definition, path, tasks)
            if problem:
                yield Problem(where, problem)
