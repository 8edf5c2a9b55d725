"""GRAPH: tasks linked by the artefacts they require and produce (the drinks example)."""

from __future__ import annotations

from typing import Any

import pytest

from kapellmeister.decider import Decision, commands_caused_by, decide
from kapellmeister.errors import InvalidDefinition
from kapellmeister.messages import PublishEvent, RerunRequested, RunTask, Saga, TaskCompleted
from tests.unit.test_decider_flow import definition, done, start, statuses

BREW: list[dict[str, Any]] = [
    {
        "ref": "brew",
        "type": "GRAPH",
        "input": {"order": "${workflow.input}"},
        "tasks": [
            {
                "ref": "malt",
                "type": "SIMPLE",
                "task": "b.malt",
                "requires": ["order"],
                "produces": ["malt"],
            },
            {
                "ref": "hops",
                "type": "SIMPLE",
                "task": "b.hops",
                "requires": ["order"],
                "produces": ["hops"],
            },
            {
                "ref": "mash",
                "type": "SIMPLE",
                "task": "b.mash",
                "requires": ["malt"],
                "produces": ["wort"],
            },
            {
                "ref": "boil",
                "type": "SIMPLE",
                "task": "b.boil",
                "requires": ["wort", "hops"],
                "produces": ["young_beer"],
            },
            {
                "ref": "dry_hop",
                "type": "SIMPLE",
                "task": "b.dry_hop",
                "requires": ["young_beer", "order"],
                "produces": ["dry_hopped"],
                "when": {"value": "${artefacts.order.style}", "op": "==", "to": "IPA"},
            },
            {
                "ref": "bottle",
                "type": "SIMPLE",
                "task": "b.bottle",
                "requires": ["young_beer", "dry_hopped?"],
                "produces": ["beer"],
            },
        ],
    },
    {
        "ref": "ready",
        "type": "EVENT",
        "subject": "events.drink.ready",
        "input": {"beer": "${brew.output.beer}"},
    },
]


def dispatched(decision: Decision) -> list[str]:
    return [c.ref for c in decision.commands if isinstance(c, RunTask)]


def brew(style: str) -> tuple[Any, Decision]:
    d = definition(BREW)
    return d, start(d, {"style": style})


def step(d: Any, decision: Decision, ref: str, output: Any) -> Decision:
    return done(d, decision.state, ref, output)


def task(state: Saga | None, ref: str) -> Any:
    assert state is not None
    return next(t for t in state.tasks if t.ref == ref)


def test_what_needs_only_the_order_runs_at_once_in_parallel():
    _, started = brew("lager")
    assert dispatched(started) == ["malt", "hops"]
    assert statuses(started.state) == {
        "brew": "IN_PROGRESS",
        "malt": "SCHEDULED",
        "hops": "SCHEDULED",
    }
    assert task(started.state, "malt").input == {"order": {"style": "lager"}}


def test_a_lager_skips_the_dry_hop_and_bottles_without_it():
    d, s = brew("lager")
    s = step(d, s, "malt", {"malt": "pale"})
    assert dispatched(s) == ["mash"]
    s = step(d, s, "hops", {"hops": "saaz"})
    assert dispatched(s) == []  # boil needs the wort too
    s = step(d, s, "mash", {"wort": "sweet"})
    assert dispatched(s) == ["boil"]
    assert task(s.state, "boil").input == {"wort": "sweet", "hops": "saaz"}
    s = step(d, s, "boil", {"young_beer": "green"})
    assert dispatched(s) == ["bottle"]
    dry_hop = task(s.state, "dry_hop")
    assert (dry_hop.status, dry_hop.reason) == ("SKIPPED", "its `when` is false")
    assert task(s.state, "bottle").input == {"young_beer": "green", "dry_hopped": None}
    s = step(d, s, "bottle", {"beer": "lager"})
    assert s.state is not None and s.state.status == "COMPLETED"
    assert task(s.state, "brew").output == {
        "order": {"style": "lager"},
        "malt": "pale",
        "hops": "saaz",
        "wort": "sweet",
        "young_beer": "green",
        "beer": "lager",
        "dry_hopped": None,
    }
    [event] = [c for c in s.commands if isinstance(c, PublishEvent)]
    assert event.data == {"beer": "lager"}


def test_an_ipa_dry_hops_and_bottles_once_it_is_done():
    d, s = brew("IPA")
    for ref, output in [
        ("malt", {"malt": "pale"}),
        ("hops", {"hops": "citra"}),
        ("mash", {"wort": "sweet"}),
    ]:
        s = step(d, s, ref, output)
    s = step(d, s, "boil", {"young_beer": "green"})
    assert dispatched(s) == ["dry_hop"]  # bottle waits for the optional artefact
    s = step(d, s, "dry_hop", {"dry_hopped": "hoppy"})
    assert dispatched(s) == ["bottle"]
    assert task(s.state, "bottle").input == {"young_beer": "green", "dry_hopped": "hoppy"}


def test_a_redelivered_result_gives_back_the_same_commands():
    d, s = brew("lager")
    after = step(d, s, "malt", {"malt": "pale"})
    assert after.state is not None
    again = decide(
        d,
        after.state,
        TaskCompleted(workflow_id="w1", ref="malt", attempt=1, output={"malt": "pale"}, at="x"),
    )
    assert again.state is after.state and again.commands == after.commands
    assert commands_caused_by(d, after.state, "malt#1") == after.commands


def test_an_artefact_a_task_did_not_produce_fails_the_workflow():
    d, s = brew("lager")
    s = step(d, s, "malt", {"barley": "pale"})
    assert s.state is not None and s.state.status == "FAILED"
    assert s.state.error is not None and "did not produce malt" in s.state.error.message


def test_what_requires_an_artefact_that_will_not_come_is_skipped_too():
    tasks = [
        {
            "ref": "g",
            "type": "GRAPH",
            "tasks": [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "x.a",
                    "produces": ["one"],
                    "when": {"any": []},
                },
                {
                    "ref": "b",
                    "type": "SIMPLE",
                    "task": "x.b",
                    "requires": ["one"],
                    "produces": ["two"],
                },
                {"ref": "c", "type": "SIMPLE", "task": "x.c", "produces": ["three"]},
            ],
        }
    ]
    d = definition(tasks)
    s = start(d)
    assert statuses(s.state) == {
        "g": "IN_PROGRESS",
        "a": "SKIPPED",
        "b": "SKIPPED",
        "c": "SCHEDULED",
    }
    assert task(s.state, "b").reason == "requires one, which will not come"
    s = done(d, s.state, "c", {"three": 3})
    assert s.state is not None and s.state.status == "COMPLETED"
    assert task(s.state, "g").output == {"three": 3, "one": None, "two": None}


def test_a_rerun_from_a_member_runs_it_and_what_depends_on_it_keeping_the_rest():
    d, s = brew("lager")
    for ref, output in [
        ("malt", {"malt": "pale"}),
        ("hops", {"hops": "saaz"}),
        ("mash", {"wort": "sweet"}),
        ("boil", {"young_beer": "green"}),
        ("bottle", {"beer": "lager"}),
    ]:
        s = step(d, s, ref, output)
    assert s.state is not None and s.state.status == "COMPLETED"
    rerun = decide(
        d, s.state, RerunRequested(workflow_id="w1", task="mash", at="2026-11-23T11:00:00.000Z")
    )
    assert dispatched(rerun) == ["mash"]
    assert (
        statuses(rerun.state)["malt"] == "COMPLETED"
        and statuses(rerun.state)["hops"] == "COMPLETED"
    )
    assert task(rerun.state, "mash").attempt == 2
    assert task(rerun.state, "mash").input == {"malt": "pale"}  # upstream kept
    assert statuses(rerun.state)["boil"] == "CANCELED"
    s = done(d, rerun.state, "mash", {"wort": "sweeter"})
    assert dispatched(s) == ["boil"]
    assert task(s.state, "boil").input == {"wort": "sweeter", "hops": "saaz"}


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (
            [{"ref": "a", "type": "SIMPLE", "task": "x.a", "requires": ["nope"]}],
            "artefact 'nope' required by 'a' is produced by no task"
            " - at `tasks[0].tasks[0].requires[0]`",
        ),
        (
            [
                {"ref": "a", "type": "SIMPLE", "task": "x.a", "produces": ["one"]},
                {"ref": "b", "type": "SIMPLE", "task": "x.b", "produces": ["one"]},
            ],
            "artefact 'one' is produced twice (tasks[0].tasks[0].produces[0])"
            " - at `tasks[0].tasks[1].produces[0]`",
        ),
        (
            [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "x.a",
                    "requires": ["two"],
                    "produces": ["one"],
                },
                {
                    "ref": "b",
                    "type": "SIMPLE",
                    "task": "x.b",
                    "requires": ["one"],
                    "produces": ["two"],
                },
            ],
            "requires/produces form a cycle: a -> b -> a - at `tasks[0].tasks`",
        ),
        (
            [{"ref": "e", "type": "EVENT", "subject": "events.x"}],
            "a GRAPH's tasks are SIMPLE, WAIT or SUB_WORKFLOW tasks - at `tasks[0].tasks[0].type`",
        ),
    ],
)
def test_a_graph_that_cannot_run_is_refused_with_the_path(tasks, message):
    with pytest.raises(InvalidDefinition) as info:
        definition([{"ref": "g", "type": "GRAPH", "tasks": tasks}])
    assert message in info.value.message


def test_requires_and_produces_belong_to_a_graph():
    with pytest.raises(InvalidDefinition, match="requires/produces belong to a GRAPH's tasks"):
        definition([{"ref": "a", "type": "SIMPLE", "task": "x.a", "produces": ["one"]}])


def test_a_task_switched_off_for_the_tenant_is_skipped_and_so_is_what_needs_it():
    d = definition(BREW)
    s = start(d, {"style": "IPA"}, tenant="sober_bar", switched_off=["hops"])
    assert dispatched(s) == ["malt"]
    hops = task(s.state, "hops")
    assert (hops.status, hops.reason) == ("SKIPPED", "switched off for tenant 'sober_bar'")
    s = step(d, s, "malt", {"malt": "pale"})
    s = step(d, s, "mash", {"wort": "sweet"})
    # boil hard-requires hops: skipped, and with it everything after
    assert statuses(s.state)["boil"] == "SKIPPED"
    assert s.state is not None and s.state.status == "COMPLETED"
    assert task(s.state, "brew").output["beer"] is None


def test_a_sequenced_task_switched_off_is_skipped_and_the_walk_goes_on():
    d = definition(
        [
            {"ref": "a", "type": "SIMPLE", "task": "x.a"},
            {"ref": "b", "type": "SIMPLE", "task": "x.b"},
        ]
    )
    s = start(d, tenant="t", switched_off=["a"])
    assert statuses(s.state) == {"a": "SKIPPED", "b": "SCHEDULED"}


def test_a_tenant_may_switch_off_only_tasks_the_definition_has():
    with pytest.raises(
        InvalidDefinition, match=r"no task 'nope' to switch off - at `tenants\.x\.skip\[0\]`"
    ):
        definition(
            [{"ref": "a", "type": "SIMPLE", "task": "x.a"}], tenants={"x": {"skip": ["nope"]}}
        )


TYPED: list[dict[str, Any]] = [
    {
        "ref": "g",
        "type": "GRAPH",
        "artefacts": {"count": "int", "note": "str?"},
        "tasks": [
            {"ref": "a", "type": "SIMPLE", "task": "x.a", "produces": ["count", "note"]},
            {
                "ref": "b",
                "type": "SIMPLE",
                "task": "x.b",
                "requires": ["count"],
                "produces": ["done"],
            },
        ],
    }
]


def test_artefacts_of_their_declared_type_flow_and_others_fail_the_workflow():
    d = definition(TYPED)
    good = done(d, start(d).state, "a", {"count": 3, "note": None})
    assert statuses(good.state)["b"] == "SCHEDULED"
    bad = done(d, start(d).state, "a", {"count": "three", "note": None})
    assert bad.state is not None and bad.state.status == "FAILED"
    assert bad.state.error is not None
    assert "produced a bad artefact: Expected `int`, got `str` - at `artefact count`" in (
        bad.state.error.message
    )


@pytest.mark.parametrize(
    ("artefacts", "message"),
    [
        ({"nothing": "int"}, "artefact 'nothing' has a type but nothing produces it"),
        ({"count": "integer"}, "unknown type 'integer' - at `tasks[0].artefacts.count`"),
    ],
)
def test_artefact_types_are_checked_at_registration(artefacts, message):
    with pytest.raises(InvalidDefinition) as info:
        definition([{**TYPED[0], "artefacts": artefacts}])
    assert message in info.value.message
