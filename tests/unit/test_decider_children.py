"""A parent that ends, or stops waiting, terminates the children its SUB_WORKFLOWs still run."""

from __future__ import annotations

from typing import Any

import pytest

from kapellmeister.decider import Decision, commands_caused_by, decide
from kapellmeister.definitions import Definition, compile_definition, parse_definition
from kapellmeister.messages import (
    Failure,
    NotifyParent,
    ParentLink,
    RetryRequested,
    Saga,
    Started,
    StartWorkflow,
    TaskCompleted,
    TaskFailed,
    TaskRecord,
    TerminateRequested,
    TerminateWorkflow,
    WorkflowTimedOut,
)

T = [f"2026-11-23T10:00:0{i}.000Z" for i in range(10)]
BOOM = Failure(type="internal", message="card declined", retryable=False)
KID = {"ref": "kid", "type": "SUB_WORKFLOW", "workflow": "kid"}


def definition(tasks: list[dict[str, Any]], **extra: Any) -> Definition:
    return compile_definition(parse_definition({"name": "p", "tasks": tasks, **extra}))


# A parent whose one task is a child workflow.
ALONE = definition([KID])
# A child that runs beside a SIMPLE task, which may fail, or end the parent by a TERMINATE.
BESIDE = definition(
    [
        {
            "ref": "both",
            "type": "FORK",
            "branches": [
                [KID],
                [
                    {"ref": "a", "type": "SIMPLE", "task": "t.a"},
                    {
                        "ref": "check",
                        "type": "SWITCH",
                        "expression": "${a.output.stop}",
                        "cases": {"true": [{"ref": "stop", "type": "TERMINATE"}]},
                        "default": [],
                    },
                ],
            ],
        }
    ],
    timeout_s=60,
)


def start(d: Definition, workflow_id: str = "p", parent: ParentLink | None = None) -> Saga:
    state = decide(
        d,
        None,
        Started(
            workflow_id=workflow_id, workflow=d.name, version=1, input={}, at=T[0], parent=parent
        ),
    ).state
    assert state is not None
    return state


def kid(state: Saga | None) -> TaskRecord:
    assert state is not None
    return next(t for t in state.tasks if t.ref == "kid")


def terminations(decision: Decision) -> list[TerminateWorkflow]:
    return [c for c in decision.commands if isinstance(c, TerminateWorkflow)]


def test_terminating_the_parent_terminates_its_running_child():
    ended = decide(
        ALONE, start(ALONE), TerminateRequested(workflow_id="p", reason="budget cut", at=T[1])
    )
    assert ended.state is not None and ended.state.status == "TERMINATED"
    assert kid(ended.state).status == "CANCELED"
    assert terminations(ended) == [
        TerminateWorkflow(
            msg_id="p-kid-1:terminated-by-parent",
            workflow_id="p-kid-1",
            reason="terminated with its parent workflow p (TERMINATED: budget cut)",
            compensate=False,
        )
    ]
    # A request is not redelivered: the saga says its commands may not be out yet, and
    # the sweeper derives the same ones from the state.
    assert ended.state.unpublished == "terminate"
    assert commands_caused_by(ALONE, ended.state, "terminate") == ended.commands


def test_a_parent_terminated_with_compensation_has_its_child_compensate_too():
    ended = decide(
        ALONE,
        start(ALONE),
        TerminateRequested(workflow_id="p", reason="off", compensate=True, at=T[1]),
    )
    assert [c.compensate for c in terminations(ended)] == [True]


def test_a_failing_parent_terminates_its_child_which_undoes_its_work():
    failed = decide(
        BESIDE, start(BESIDE), TaskFailed(workflow_id="p", ref="a", attempt=1, error=BOOM, at=T[1])
    )
    assert failed.state is not None and failed.state.status == "FAILED"
    [command] = terminations(failed)
    assert command.reason == (
        "terminated with its parent workflow p (FAILED: task 'a' failed: card declined)"
    )
    assert command.compensate
    # The failure is a stream fact: redelivered, it gives back the same commands.
    again = decide(
        BESIDE, failed.state, TaskFailed(workflow_id="p", ref="a", attempt=1, error=BOOM, at=T[2])
    )
    assert again.state is failed.state and again.commands == failed.commands


def test_a_timed_out_parent_terminates_its_child():
    ended = decide(BESIDE, start(BESIDE), WorkflowTimedOut(workflow_id="p", at=T[5]))
    assert ended.state is not None and ended.state.status == "TIMED_OUT"
    [command] = terminations(ended)
    assert "(TIMED_OUT: workflow ran past its timeout_s" in command.reason
    assert command.compensate


def test_a_parent_completed_by_a_terminate_task_terminates_its_child_without_undoing():
    ended = decide(
        BESIDE,
        start(BESIDE),
        TaskCompleted(workflow_id="p", ref="a", attempt=1, output={"stop": True}, at=T[1]),
    )
    assert ended.state is not None and ended.state.status == "COMPLETED"
    assert terminations(ended) == [
        TerminateWorkflow(
            msg_id="p-kid-1:terminated-by-parent",
            workflow_id="p-kid-1",
            reason="terminated with its parent workflow p (COMPLETED)",
            compensate=False,
        )
    ]


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "TERMINATED"])
def test_the_childs_end_arriving_at_the_ended_parent_changes_nothing(status):
    ended = decide(
        ALONE, start(ALONE), TerminateRequested(workflow_id="p", reason="budget cut", at=T[1])
    ).state
    # What the conductor makes of the child's NotifyParent: the SUB_WORKFLOW's result.
    result = (
        TaskCompleted(workflow_id="p", ref="kid", attempt=1, output={}, at=T[2])
        if status == "COMPLETED"
        else TaskFailed(
            workflow_id="p",
            ref="kid",
            attempt=1,
            error=Failure(type=f"child_{status.lower()}", message="ended"),
            at=T[2],
        )
    )
    late = decide(ALONE, ended, result)
    assert late.state is ended and late.commands == ()


def test_a_child_that_ended_before_its_parent_is_left_alone():
    done = decide(
        BESIDE,
        start(BESIDE),
        TaskCompleted(workflow_id="p", ref="kid", attempt=1, output={}, at=T[1]),
    )
    failed = decide(
        BESIDE, done.state, TaskFailed(workflow_id="p", ref="a", attempt=1, error=BOOM, at=T[2])
    )
    assert failed.state is not None and failed.state.status == "FAILED"
    assert terminations(failed) == []
    assert kid(failed.state).child_terminated is None


def test_the_fact_that_started_a_canceled_child_now_terminates_it():
    """A redelivered start finds the child's task canceled: it ends the child, never starts it.

    (The runtime may have crashed between creating the child and acking that fact, on a
    replica that did not yet see the parent end.)
    """
    first = decide(
        ALONE, None, Started(workflow_id="p", workflow="p", version=1, input={}, at=T[0])
    )
    assert [type(c) for c in first.commands] == [StartWorkflow]
    ended = decide(
        ALONE, first.state, TerminateRequested(workflow_id="p", reason="budget cut", at=T[1])
    )
    again = decide(
        ALONE, ended.state, Started(workflow_id="p", workflow="p", version=1, input={}, at=T[0])
    )
    assert again.state is ended.state
    assert again.commands == tuple(terminations(ended))


def test_retrying_the_terminated_parent_starts_a_new_child_and_terminates_nothing():
    ended = decide(
        ALONE, start(ALONE), TerminateRequested(workflow_id="p", reason="budget cut", at=T[1])
    )
    retried = decide(ALONE, ended.state, RetryRequested(workflow_id="p", at=T[2]))
    assert retried.state is not None and retried.state.status == "RUNNING"
    a = kid(retried.state)
    assert (a.attempt, a.child, a.child_terminated) == (2, "p-kid-2", None)
    assert [type(c) for c in retried.commands] == [StartWorkflow]


CHILD = compile_definition(
    parse_definition({"name": "kid", "tasks": [{"ref": "wait", "type": "WAIT"}, KID]})
)


def test_the_terminated_child_reports_to_its_parent_and_terminates_its_own_child():
    """What the runtime does with a `TerminateWorkflow`: the child's TerminateRequested."""
    link = ParentLink(workflow_id="p", ref="kid", attempt=1)
    child = start(CHILD, "p-kid-1", parent=link)
    waited = decide(
        CHILD,
        child,
        TaskCompleted(workflow_id="p-kid-1", ref="wait", attempt=1, output={}, at=T[1]),
    ).state
    assert waited is not None
    child = waited
    assert child is not None and kid(child).child == "p-kid-1-kid-1"
    reason = "terminated with its parent workflow p (TERMINATED: budget cut)"
    ended = decide(CHILD, child, TerminateRequested(workflow_id="p-kid-1", reason=reason, at=T[2]))
    assert ended.state is not None and ended.state.status == "TERMINATED"
    assert ended.state.error is not None and ended.state.error.message == reason
    assert ended.commands == (
        TerminateWorkflow(
            msg_id="p-kid-1-kid-1:terminated-by-parent",
            workflow_id="p-kid-1-kid-1",
            reason=f"terminated with its parent workflow p-kid-1 (TERMINATED: {reason})",
        ),
        NotifyParent(
            msg_id="p-kid-1:ended",
            parent=link,
            child="p-kid-1",
            status="TERMINATED",
            output=None,
            error=ended.state.error,
        ),
    )
