"""The static checker: properties over generated definitions, and the cases it must tell apart.

The generator builds definitions from SIMPLE ``weather.report`` tasks, SWITCHes (always
with a default) and static FORKs, nested, and keeps its own account of which SIMPLE
tasks can have run before each one: everything earlier in an enclosing sequence,
including what ran inside an earlier SWITCH or FORK. Everything else cannot: the task
itself, anything later, another branch of an enclosing FORK, another case of an
enclosing SWITCH. Expressions naming only the former give no problem; one expression
switched to the latter gives exactly one problem, at that task's ``input.date``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from kapellmeister.agent import task
from kapellmeister.checker import Problem, check, check_file
from kapellmeister.definitions import compile_definition, parse_definition
from services import conductor
from services.agenda.handlers import activity
from services.weather.handlers import report

WEATHER = msgspec.to_builtins(task("weather.report", report).registration("weather"))
AGENDA = msgspec.to_builtins(task("agenda.activity", activity).registration("agenda"))
TASKS: dict[str, dict[str, Any]] = {"weather.report": WEATHER, "agenda.activity": AGENDA}
REPORT_FIELDS = frozenset({"rain", "temperature", "snow"})
CASE_KEYS = ("true", "false", "x")


def compiled(spec: dict[str, Any]):
    return compile_definition(parse_definition(spec))


# --- the generator ------------------------------------------------------------------------

# A shape is ("SIMPLE",), ("SWITCH", {key: [shape]}, [shape]) or ("FORK", [[shape]]).
SIMPLE_SHAPE: tuple[str] = ("SIMPLE",)


def _nested(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    sequence = st.lists(children, max_size=3)
    return st.one_of(
        st.builds(
            lambda cases, default: ("SWITCH", cases, default),
            st.dictionaries(st.sampled_from(CASE_KEYS), sequence, max_size=2),
            sequence,
        ),
        st.builds(lambda branches: ("FORK", branches), st.lists(sequence, min_size=1, max_size=3)),
    )


SHAPES = st.lists(
    st.recursive(st.just(SIMPLE_SHAPE), _nested, max_leaves=12), min_size=1, max_size=4
)


@dataclasses.dataclass
class Simple:
    """A generated SIMPLE task: its dict in the spec, its path, what can have run before it."""

    ref: str
    path: str
    before: frozenset[str]
    spec: dict[str, Any]


@dataclasses.dataclass
class Generated:
    spec: dict[str, Any]
    simples: list[Simple]
    # Each SWITCH's dict and the SIMPLE refs that can have run before it.
    switches: list[tuple[dict[str, Any], frozenset[str]]]

    @property
    def refs(self) -> frozenset[str]:
        return frozenset(s.ref for s in self.simples)


class _Builder:
    """Turns shapes into a definition, numbering refs and recording what ran before what."""

    def __init__(self) -> None:
        self.count = 0
        self.simples: list[Simple] = []
        self.switches: list[tuple[dict[str, Any], frozenset[str]]] = []

    def sequence(
        self, shapes: list[Any], path: str, seen: frozenset[str]
    ) -> tuple[list[dict[str, Any]], frozenset[str]]:
        """The tasks of a sequence and every SIMPLE ref inside it."""
        tasks, inside = [], frozenset[str]()
        for i, shape in enumerate(shapes):
            spec, refs = self.task(shape, f"{path}[{i}]", seen)
            tasks.append(spec)
            seen, inside = seen | refs, inside | refs
        return tasks, inside

    def task(
        self, shape: Any, path: str, seen: frozenset[str]
    ) -> tuple[dict[str, Any], frozenset[str]]:
        ref = f"t{self.count}"
        self.count += 1
        date = "${workflow.input.date}"
        spec: dict[str, Any]
        if shape[0] == "SIMPLE":
            spec = {"ref": ref, "type": "SIMPLE", "task": "weather.report", "input": {"date": date}}
            self.simples.append(Simple(ref, path, seen, spec))
            return spec, frozenset({ref})
        inside = frozenset[str]()
        if shape[0] == "SWITCH":
            spec = {"ref": ref, "type": "SWITCH", "expression": date, "cases": {}}
            self.switches.append((spec, seen))
            for key, branch in shape[1].items():
                spec["cases"][key], refs = self.sequence(branch, f"{path}.cases.{key}", seen)
                inside |= refs
            spec["default"], refs = self.sequence(shape[2], f"{path}.default", seen)
            return spec, inside | refs
        spec = {"ref": ref, "type": "FORK", "branches": []}
        for b, branch in enumerate(shape[1]):
            tasks, refs = self.sequence(branch, f"{path}.branches[{b}]", seen)
            spec["branches"].append(tasks)
            inside |= refs
        return spec, inside


def _has_simple(shapes: list[Any]) -> bool:
    for shape in shapes:
        if shape[0] == "SIMPLE":
            return True
        branches = [*shape[1].values(), shape[2]] if shape[0] == "SWITCH" else shape[1]
        if any(_has_simple(branch) for branch in branches):
            return True
    return False


_TOKEN = re.compile(r"\[\d+\]|\.?[^.\[]+")


def _relation(simple: Simple, other: Simple) -> str:
    """How ``other`` stands to ``simple``, for Hypothesis's statistics."""
    if other is simple:
        return "itself"
    mine, theirs = _TOKEN.findall(simple.path), _TOKEN.findall(other.path)
    i = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b)
    branch = mine[i - 1] in {".branches", ".cases"} or mine[i].startswith((".cases", ".default"))
    return "another branch" if branch else "later"


def _rain(ref: str | None) -> str:
    return "${workflow.input.date}" if ref is None else f"${{{ref}.output.rain}}"


@st.composite
def definitions(draw: st.DrawFn) -> Generated:
    """A definition whose every expression names a task that can have run before it."""
    shapes = draw(SHAPES.filter(_has_simple))
    builder = _Builder()
    tasks, _ = builder.sequence(shapes, "tasks", frozenset())
    for simple in builder.simples:
        named = draw(st.sampled_from([None, *sorted(simple.before)]))
        simple.spec["input"]["date"] = _rain(named)
    for switch, before in builder.switches:
        switch["expression"] = _rain(draw(st.sampled_from([None, *sorted(before)])))
    spec = {"name": "generated", "input": {"date": "str"}, "tasks": tasks}
    return Generated(spec, builder.simples, builder.switches)


def test_the_generator_writes_paths_as_the_compiler_does():
    builder = _Builder()
    shapes = [SIMPLE_SHAPE, ("FORK", [[SIMPLE_SHAPE], [("SWITCH", {"x": [SIMPLE_SHAPE]}, [])]])]
    tasks, _ = builder.sequence(shapes, "tasks", frozenset())
    generated = Generated({"name": "g", "tasks": tasks}, builder.simples, builder.switches)
    nodes = compiled(generated.spec).nodes
    assert [(s.path, nodes[s.ref].path) for s in generated.simples] == [
        ("tasks[0]", "tasks[0]"),
        ("tasks[1].branches[0][0]", "tasks[1].branches[0][0]"),
        ("tasks[1].branches[1][0].cases.x[0]", "tasks[1].branches[1][0].cases.x[0]"),
    ]
    assert [s.before for s in generated.simples] == [
        frozenset(),
        frozenset({"t0"}),
        frozenset({"t0"}),
    ]


# --- properties ---------------------------------------------------------------------------


@given(definitions())
def test_expressions_naming_only_earlier_tasks_give_no_problem(generated):
    definition = compiled(generated.spec)
    assert {s.ref: s.path for s in generated.simples} == {
        s.ref: definition.nodes[s.ref].path for s in generated.simples
    }
    assert check(definition, TASKS) == []


@given(definitions(), st.data())
def test_one_expression_naming_a_task_that_cannot_have_run_is_one_problem(generated, data):
    simple = data.draw(st.sampled_from(generated.simples), label="task")
    # Later tasks, other branches of an enclosing FORK, other cases of an enclosing
    # SWITCH, itself: every SIMPLE task not counted as possibly run before this one.
    # Itself only when there is no other, else most draws would name it.
    cannot = sorted(generated.refs - simple.before - {simple.ref}) or [simple.ref]
    named = data.draw(st.sampled_from(cannot), label="names")
    event(_relation(simple, next(s for s in generated.simples if s.ref == named)))
    simple.spec["input"]["date"] = _rain(named)
    problems = check(compiled(generated.spec), TASKS)
    assert [p.path for p in problems] == [f"{simple.path}.input.date"], problems
    assert f"${{{named}.output.rain}}" in problems[0].message


def test_a_sibling_fork_branch_is_flagged_and_a_task_after_the_fork_sees_all_of_it():
    def simple(ref: str, date: str) -> dict[str, Any]:
        return {"ref": ref, "type": "SIMPLE", "task": "weather.report", "input": {"date": date}}

    spec = {
        "name": "siblings",
        "tasks": [
            {
                "ref": "both",
                "type": "FORK",
                "branches": [
                    [simple("left", "2019-04-02")],
                    [simple("right", "${left.output.rain}")],
                ],
            },
            simple("after", "${left.output.rain} ${right.output.rain}"),
        ],
    }
    assert check(compiled(spec), TASKS) == [
        Problem(
            "tasks[0].branches[1][0].input.date",
            "`${left.output.rain}` names a task that cannot have run before it ('left')",
        )
    ]


OUTPUT_FIELD = st.from_regex(r"[^\s.${}\[\]]+", fullmatch=True).filter(
    lambda f: f not in REPORT_FIELDS
)


@given(field=OUTPUT_FIELD, key=st.text(min_size=1, max_size=12))
def test_an_output_field_the_agent_does_not_produce_is_flagged_in_the_output(field, key):
    spec = {
        "name": "fields",
        "tasks": [
            {
                "ref": "a",
                "type": "SIMPLE",
                "task": "weather.report",
                "input": {"date": "2019-04-02"},
            }
        ],
        "output": {key: f"${{a.output.{field}}}", "fine": "${a.output.temperature}"},
    }
    problems = check(compiled(spec), TASKS)
    assert [p.path for p in problems] == [f"output.{key}"]
    assert f"no output field {field!r}" in problems[0].message


def test_the_each_task_of_a_dynamic_fork_cannot_be_named_after_the_fork():
    definition = compiled(
        {
            "name": "fan_out",
            "input": {"dates": "list"},
            "tasks": [
                {
                    "ref": "all",
                    "type": "FORK",
                    "over": "${workflow.input.dates}",
                    "each": {
                        "ref": "one",
                        "type": "SIMPLE",
                        "task": "weather.report",
                        "input": {"date": "${item}"},
                    },
                },
                {
                    "ref": "after",
                    "type": "SIMPLE",
                    "task": "weather.report",
                    "input": {"date": "${one.output.rain}"},
                },
            ],
        }
    )
    # The decider names each item's record `one[0]`, `one[1]`...: no context root `one`
    # ever exists, and `${all.output.0.rain}` is the way to read an item's output.
    assert [p.path for p in check(definition, TASKS)] == ["tasks[1].input.date"]


# --- SWITCH coverage ----------------------------------------------------------------------


def _switch_on(task_name: str, data: dict[str, Any], expression: str, cases: list[str]):
    return compiled(
        {
            "name": "covered",
            "tasks": [
                {"ref": "ask", "type": "SIMPLE", "task": task_name, "input": data},
                {
                    "ref": "which",
                    "type": "SWITCH",
                    "expression": expression,
                    "cases": {case: [] for case in cases},
                },
            ],
        }
    )


def test_a_switch_without_default_covering_true_and_false_of_a_boolean_is_fine():
    definition = _switch_on(
        "weather.report", {"date": "2019-04-02"}, "${ask.output.rain}", ["true", "false"]
    )
    assert check(definition, TASKS) == []


def test_a_switch_without_default_covering_only_true_is_flagged_at_its_default():
    definition = _switch_on(
        "weather.report", {"date": "2019-04-02"}, "${ask.output.rain}", ["true"]
    )
    problems = check(definition, TASKS)
    assert [p.path for p in problems] == ["tasks[1].default"]
    assert "uncovered: false" in problems[0].message


def test_a_switch_without_default_covering_every_value_of_an_enum_is_fine():
    definition = _switch_on(
        "agenda.activity",
        {"datetime": "2026-11-21T12:00:00"},
        "${ask.output.activity}",
        ["free", "work", "kids", "sleep"],
    )
    assert check(definition, TASKS) == []


def test_a_switch_without_default_missing_enum_values_names_them():
    definition = _switch_on(
        "agenda.activity",
        {"datetime": "2026-11-21T12:00:00"},
        "${ask.output.activity}",
        ["free", "work"],
    )
    problems = check(definition, TASKS)
    assert [p.path for p in problems] == ["tasks[1].default"]
    assert "uncovered: kids, sleep" in problems[0].message


# --- files, offline checks, sub-workflows -------------------------------------------------


def test_check_file_reports_a_yaml_syntax_error_as_one_problem(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ntasks: [\n  {ref: a, type: WAIT\n")
    problems = check_file(path)
    assert len(problems) == 1
    assert "YAML" in problems[0].message


def test_without_a_task_registry_the_agent_checks_are_skipped():
    definition = compiled(
        {
            "name": "offline",
            "tasks": [{"ref": "a", "type": "SIMPLE", "task": "nobody.serves", "input": {"z": 1}}],
            "output": {"x": "${a.output.nothing}"},
        }
    )
    assert [p.path for p in check(definition, TASKS)] == ["tasks[0].task"]
    assert check(definition) == []


def test_without_a_task_registry_ordering_is_still_checked():
    definition = compiled(
        {
            "name": "offline",
            "tasks": [
                {"ref": "a", "type": "SIMPLE", "task": "nobody.serves", "input": {"x": "${b}"}},
                {"ref": "b", "type": "WAIT"},
            ],
        }
    )
    assert [p.path for p in check(definition)] == ["tasks[0].input.x"]


def test_a_sub_workflow_cycle_of_two_is_flagged_with_its_chain():
    definition = compiled(
        {"name": "a", "tasks": [{"ref": "call_b", "type": "SUB_WORKFLOW", "workflow": "b"}]}
    )
    known = {"a": ["b"], "b": ["a"]}
    problems = check(definition, TASKS, known.get)
    assert [p.path for p in problems] == ["tasks[0].workflow"]
    assert "a -> b -> a" in problems[0].message


def test_a_sub_workflow_chain_without_a_cycle_is_fine():
    definition = compiled(
        {"name": "a", "tasks": [{"ref": "call_b", "type": "SUB_WORKFLOW", "workflow": "b"}]}
    )
    known: dict[str, list[str]] = {"a": ["b"], "b": ["c"], "c": []}
    assert check(definition, TASKS, known.get) == []


@pytest.mark.parametrize("name", ["plan_day", "approval"])
def test_the_shipped_definitions_pass(name):
    path = Path(conductor.__file__).parent / "definitions" / f"{name}.yaml"
    assert check_file(path, TASKS) == []


def test_a_graph_members_artefacts_are_its_input_fields():
    # weather.report takes {"date"}: an artefact named date feeds it; another is flagged.
    def graph(requires: list[str]) -> dict[str, Any]:
        return {
            "name": "g",
            "input": {"day": "str"},
            "tasks": [
                {
                    "ref": "g",
                    "type": "GRAPH",
                    "input": {"date": "${workflow.input.day}", "place": "here"},
                    "tasks": [
                        {
                            "ref": "w",
                            "type": "SIMPLE",
                            "task": "weather.report",
                            "requires": requires,
                            "produces": ["forecast"],
                        }
                    ],
                }
            ],
        }

    assert check(compiled(graph(["date"])), TASKS) == []
    assert check(compiled(graph(["date", "place"])), TASKS) == [
        Problem(
            "tasks[0].tasks[0].requires[1]",
            "weather.report takes no field 'place' (it takes: date)",
        )
    ]
    assert [p.message for p in check(compiled(graph(["place"])), TASKS)] == [
        "weather.report takes no field 'place' (it takes: date)",
        "weather.report requires field 'date'",
    ]
