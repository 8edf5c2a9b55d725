"""`when`: conditions on earlier outputs, and a task that is SKIPPED when they fail."""

from __future__ import annotations

from typing import Any

import pytest

from kapellmeister.conditions import compile_condition
from kapellmeister.decider import commands_caused_by, decide
from kapellmeister.errors import InvalidDefinition
from kapellmeister.messages import RunTask, TaskCompleted
from tests.unit.test_decider_flow import definition, done, start, statuses

CONTEXT: dict[str, Any] = {
    "recipe": {"output": {"style": "IPA", "hops_g": 40, "flag": True, "note": "dry hopped"}},
    "order": {"output": {"drink": "beer", "count": 1}},
}


def holds(raw: Any) -> bool:
    return compile_condition(raw, "when").holds(CONTEXT)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"value": "${order.output.drink}", "op": "==", "to": "beer"}, True),
        ({"value": "${order.output.drink}", "op": "!=", "to": "beer"}, False),
        ({"value": "${order.output.count}", "op": "==", "to": True}, False),  # 1 is not true
        ({"value": "${recipe.output.flag}", "op": "==", "to": True}, True),
        ({"value": "${recipe.output.style}", "op": "in", "to": ["IPA", "NEIPA"]}, True),
        ({"value": "hopped", "op": "in", "to": "${recipe.output.note}"}, True),
        ({"value": "${recipe.output.hops_g}", "op": ">", "to": 30}, True),
        ({"value": "${recipe.output.hops_g}", "op": "<", "to": 30}, False),
        ({"value": "${recipe.output.style}", "op": "<", "to": 30}, False),  # no order across
        ({"value": "${recipe.output.missing}", "op": ">", "to": 0}, False),
        ({"exists": "${recipe.output.hops_g}"}, True),
        ({"exists": "${recipe.output.missing}"}, False),
        ({"all": []}, True),
        ({"any": []}, False),
        (
            {
                "all": [
                    {"value": "${order.output.drink}", "op": "==", "to": "beer"},
                    {
                        "any": [
                            {"value": "${recipe.output.style}", "op": "==", "to": "lager"},
                            {"exists": "${recipe.output.hops_g}"},
                        ]
                    },
                ]
            },
            True,
        ),
        ({"any": [{"exists": "${nothing.output}"}, {"all": [{"any": []}]}]}, False),
    ],
)
def test_conditions_compare_as_json_and_never_raise(raw, expected):
    assert holds(raw) is expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"value": 1, "op": "~", "to": 1}, "op '~' is not one of ==, !=, in, <, > - at `when.op`"),
        ({"exists": "plain"}, "`exists` takes one ${…} - at `when.exists`"),
        ({"all": {"x": 1}}, "`all` takes a list - at `when.all`"),
        ({"any": [{"value": 1}]}, "not ['value'] - at `when.any[0]`"),
        ([], "a condition is an object - at `when`"),
        ({"value": "${a.", "op": "==", "to": 1}, "at `when`"),
    ],
)
def test_a_malformed_condition_is_refused_with_its_path(raw, message):
    with pytest.raises(InvalidDefinition) as info:
        compile_condition(raw, "when")
    assert message in info.value.message


DRY_HOP: list[dict[str, Any]] = [
    {"ref": "recipe", "type": "SIMPLE", "task": "b.recipe"},
    {
        "ref": "dry_hop",
        "type": "SIMPLE",
        "task": "b.dry_hop",
        "when": {"value": "${recipe.output.style}", "op": "in", "to": ["IPA", "NEIPA"]},
    },
    {"ref": "bottle", "type": "SIMPLE", "task": "b.bottle"},
]


def test_a_task_whose_when_is_false_is_skipped_and_the_walk_goes_on():
    d = definition(DRY_HOP)
    started = start(d)
    lager = done(d, started.state, "recipe", {"style": "lager"})
    assert statuses(lager.state) == {
        "recipe": "COMPLETED",
        "dry_hop": "SKIPPED",
        "bottle": "SCHEDULED",
    }
    assert lager.state is not None
    skipped = next(t for t in lager.state.tasks if t.ref == "dry_hop")
    assert skipped.reason == "its `when` is false"
    assert [c.task for c in lager.commands if isinstance(c, RunTask)] == ["b.bottle"]
    # A redelivery of the fact gives back the same commands.
    again = decide(
        d,
        lager.state,
        TaskCompleted(workflow_id="w1", ref="recipe", attempt=1, output={"style": "lager"}, at="x"),
    )
    assert again.state is lager.state and again.commands == lager.commands
    assert commands_caused_by(d, lager.state, "recipe#1") == lager.commands


def test_a_task_whose_when_holds_runs():
    d = definition(DRY_HOP)
    ipa = done(d, start(d).state, "recipe", {"style": "IPA"})
    assert statuses(ipa.state) == {"recipe": "COMPLETED", "dry_hop": "SCHEDULED"}


def test_a_when_naming_an_unknown_ref_is_refused_at_compile_time():
    with pytest.raises(InvalidDefinition, match=r"unknown task ref 'nope' - at `tasks\[0\]\.when`"):
        definition(
            [{"ref": "a", "type": "SIMPLE", "task": "x.y", "when": {"exists": "${nope.output}"}}]
        )
