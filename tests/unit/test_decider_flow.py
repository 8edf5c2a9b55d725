"""The decider's parallel and waiting task types: FORK/JOIN, WAIT, DELAY, SUB_WORKFLOW."""

from __future__ import annotations

from typing import Any

import pytest

from kapellmeister.decider import Decision, decide
from kapellmeister.definitions import Definition, compile_definition, parse_definition
from kapellmeister.errors import InvalidDefinition
from kapellmeister.messages import (
    NotifyParent,
    ParentLink,
    PublishEvent,
    RunTask,
    Saga,
    ScheduleTimer,
    SignalReceived,
    Started,
    StartWorkflow,
    TaskCompleted,
    TerminateRequested,
)

T0 = "2026-11-23T10:00:00.000Z"


def definition(tasks: list[dict[str, Any]], **extra: Any) -> Definition:
    return compile_definition(parse_definition({"name": "w", "tasks": tasks, **extra}))


def start(d: Definition, data: dict[str, Any] | None = None, **extra: Any) -> Decision:
    return decide(
        d,
        None,
        Started(workflow_id="w1", workflow="w", version=1, input=data or {}, at=T0, **extra),
    )


def done(d: Definition, state: Saga | None, ref: str, output: Any = None, at: str = T0) -> Decision:
    assert state is not None
    record = next(t for t in state.tasks if t.ref == ref)
    return decide(
        d,
        state,
        TaskCompleted(workflow_id="w1", ref=ref, attempt=record.attempt, output=output, at=at),
    )


def statuses(state: Saga | None) -> dict[str, str]:
    assert state is not None
    return {t.ref: t.status for t in state.tasks}


FORK: list[dict[str, Any]] = [
    {
        "ref": "both",
        "type": "FORK",
        "branches": [
            [{"ref": "a", "type": "SIMPLE", "task": "t.a"}],
            [
                {"ref": "b", "type": "SIMPLE", "task": "t.b"},
                {"ref": "b2", "type": "SIMPLE", "task": "t.b2"},
            ],
        ],
    },
    {"ref": "joined", "type": "JOIN", "join_on": ["a", "b2"]},
    {
        "ref": "after",
        "type": "EVENT",
        "subject": "events.forked",
        "input": {"a": "${a.output}", "b": "${joined.output.b2}"},
    },
]


def test_a_static_fork_runs_its_branches_in_parallel_and_joins_once():
    d = definition(FORK, output={"all": "${both.output}"})
    first = start(d)
    assert [c.ref for c in first.commands if isinstance(c, RunTask)] == ["a", "b"]
    second = done(d, first.state, "b", 2)
    assert [c.ref for c in second.commands if isinstance(c, RunTask)] == ["b2"]
    third = done(d, second.state, "a", 1)
    assert third.commands == ()  # b2 still runs: no join yet
    assert statuses(third.state)["both"] == "IN_PROGRESS"
    last = done(d, third.state, "b2", 22)
    assert last.state is not None and last.state.status == "COMPLETED"
    assert last.commands == (
        PublishEvent(msg_id="w1:after:1", subject="events.forked", data={"a": 1, "b": 22}),
    )
    assert last.state.output == {"all": {"a": 1, "b": 2, "b2": 22}}
    assert statuses(last.state)["joined"] == "COMPLETED"


def test_a_dynamic_fork_runs_one_task_per_item_and_outputs_them_in_order():
    d = definition(
        [
            {
                "ref": "each_city",
                "type": "FORK",
                "over": "${workflow.input.cities}",
                "each": {
                    "ref": "report",
                    "type": "SIMPLE",
                    "task": "weather.report",
                    "input": {"date": "${workflow.input.date}", "city": "${item}", "n": "${index}"},
                },
            },
        ],
        output={"reports": "${each_city.output}"},
    )
    first = start(d, {"cities": ["oslo", "rome", "lima"], "date": "2019-04-02"})
    runs = [c for c in first.commands if isinstance(c, RunTask)]
    assert [(c.ref, c.input) for c in runs] == [
        (f"report[{i}]", {"date": "2019-04-02", "city": city, "n": i})
        for i, city in enumerate(["oslo", "rome", "lima"])
    ]
    state = first.state
    for i in (2, 0, 1):
        state = done(d, state, f"report[{i}]", {"city": i}).state
    assert state is not None and state.status == "COMPLETED"
    assert state.output == {"reports": [{"city": 0}, {"city": 1}, {"city": 2}]}


def test_a_dynamic_fork_over_nothing_goes_straight_on():
    d = definition(
        [
            {
                "ref": "each",
                "type": "FORK",
                "over": "${workflow.input.xs}",
                "each": {"ref": "x", "type": "SIMPLE", "task": "t.x"},
            },
        ],
        output={"n": "${each.output}"},
    )
    state = start(d, {"xs": []}).state
    assert state is not None and (state.status, state.output) == ("COMPLETED", {"n": []})


def test_a_dynamic_fork_over_a_non_list_fails_the_workflow():
    d = definition(
        [
            {
                "ref": "each",
                "type": "FORK",
                "over": "${workflow.input.xs}",
                "each": {"ref": "x", "type": "SIMPLE", "task": "t.x"},
            }
        ]
    )
    state = start(d, {"xs": 3}).state
    assert state is not None and state.status == "FAILED"
    assert state.error is not None and "not a list" in state.error.message


APPROVE = [
    {"ref": "approve", "type": "WAIT", "input": {"money": "${workflow.input.money}"}},
    {
        "ref": "paid",
        "type": "EVENT",
        "subject": "events.paid",
        "input": {"by": "${approve.output.approver}"},
    },
]


def signal(d: Definition, state: Saga | None, ref: str, output: Any) -> Decision:
    return decide(d, state, SignalReceived(workflow_id="w1", ref=ref, output=output, at=T0))


def test_a_wait_task_completes_with_its_signal():
    d = definition(APPROVE)
    first = start(d, {"money": 5})
    assert first.commands == ()
    assert statuses(first.state) == {"approve": "IN_PROGRESS"}
    second = signal(d, first.state, "approve", {"approver": "kim"})
    assert second.refusal is None
    assert second.commands == (
        PublishEvent(msg_id="w1:paid:1", subject="events.paid", data={"by": "kim"}),
    )


@pytest.mark.parametrize(
    ("ref", "code", "fragment"),
    [
        ("nope", 404, "no task 'nope'"),
        ("paid", 409, "not reached yet"),
    ],
)
def test_a_signal_to_a_task_that_is_not_waiting_is_refused(ref, code, fragment):
    d = definition(APPROVE)
    state = start(d, {"money": 5}).state
    refused = signal(d, state, ref, {})
    assert refused.state is state
    assert refused.refusal is not None and refused.refusal.code == code
    assert fragment in refused.refusal.message


def test_a_second_signal_is_refused_and_a_finished_workflow_refuses_all():
    d = definition(APPROVE)
    state = signal(d, start(d, {"money": 5}).state, "approve", {"approver": "kim"}).state
    again = signal(d, state, "approve", {"approver": "kim"})
    assert again.refusal is not None and again.refusal.code == 409


def test_terminate_cancels_what_waits_and_is_refused_once_finished():
    d = definition(APPROVE)
    state = start(d, {"money": 5}).state
    ended = decide(d, state, TerminateRequested(workflow_id="w1", reason="no budget", at=T0))
    assert ended.state is not None and ended.state.status == "TERMINATED"
    assert statuses(ended.state) == {"approve": "CANCELED"}
    assert ended.state.error is not None and ended.state.error.message == "no budget"
    again = decide(d, ended.state, TerminateRequested(workflow_id="w1", reason="", at=T0))
    assert again.refusal is not None and again.refusal.code == 409


def test_a_delay_schedules_a_timer_and_goes_on_when_it_fires():
    d = definition(
        [
            {"ref": "nap", "type": "DELAY", "duration_s": "${workflow.input.s}"},
            {"ref": "after", "type": "SIMPLE", "task": "t.x"},
        ]
    )
    first = start(d, {"s": 90})
    assert first.commands == (
        ScheduleTimer(
            msg_id="w1:nap:1",
            workflow_id="w1",
            ref="nap",
            attempt=1,
            fire_at="2026-11-23T10:01:30.000Z",
        ),
    )
    second = done(d, first.state, "nap")
    assert [c.ref for c in second.commands if isinstance(c, RunTask)] == ["after"]


def test_a_delay_of_no_number_fails_the_workflow():
    d = definition([{"ref": "nap", "type": "DELAY", "duration_s": "${workflow.input.s}"}])
    state = start(d, {"s": "soon"}).state
    assert state is not None and state.status == "FAILED"


def test_a_sub_workflow_starts_its_child_and_the_child_reports_back():
    parent = definition(
        [
            {
                "ref": "child",
                "type": "SUB_WORKFLOW",
                "workflow": "kid",
                "input": {"n": "${workflow.input.n}"},
            }
        ],
        output={"got": "${child.output.doubled}"},
    )
    first = start(parent, {"n": 2})
    assert first.commands == (
        StartWorkflow(
            msg_id="w1:child:1",
            workflow_id="w1-child-1",
            workflow="kid",
            version=None,
            input={"n": 2},
            tenant="",
            parent=ParentLink(workflow_id="w1", ref="child", attempt=1),
            priority=0,  # the parent's: a child waits for a slot as its parent would
        ),
    )
    kid = compile_definition(
        parse_definition(
            {
                "name": "kid",
                "tasks": [{"ref": "t", "type": "SET_VARIABLE", "input": {"d": 4}}],
                "output": {"doubled": "${workflow.variables.d}"},
            }
        )
    )
    link = ParentLink(workflow_id="w1", ref="child", attempt=1)
    child = decide(
        kid,
        None,
        Started(
            workflow_id="w1-child-1", workflow="kid", version=1, input={"n": 2}, at=T0, parent=link
        ),
    )
    assert child.commands == (
        NotifyParent(
            msg_id="w1-child-1:ended",
            parent=link,
            child="w1-child-1",
            status="COMPLETED",
            output={"doubled": 4},
        ),
    )
    final = done(parent, first.state, "child", {"doubled": 4})
    assert final.state is not None and final.state.output == {"got": 4}


@pytest.mark.parametrize(
    ("tasks", "fragment"),
    [
        ([{"ref": "f", "type": "FORK"}], "either `branches`"),
        ([{"ref": "f", "type": "FORK", "over": "${workflow.input.x}"}], "both `over` and `each`"),
        (
            [
                {
                    "ref": "f",
                    "type": "FORK",
                    "over": "${workflow.input.x}",
                    "each": {"ref": "e", "type": "EVENT", "subject": "events.x"},
                }
            ],
            "SIMPLE or SUB_WORKFLOW",
        ),
        ([{"ref": "j", "type": "JOIN"}], "right after a FORK"),
        (
            [
                {
                    "ref": "f",
                    "type": "FORK",
                    "branches": [[{"ref": "a", "type": "SIMPLE", "task": "t.a"}]],
                },
                {"ref": "j", "type": "JOIN", "join_on": ["zz"]},
            ],
            "join_on names unknown task ref 'zz'",
        ),
    ],
)
def test_misshapen_parallel_tasks_are_rejected(tasks, fragment):
    with pytest.raises(InvalidDefinition) as info:
        definition(tasks)
    assert fragment in info.value.message
