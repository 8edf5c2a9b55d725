"""Compensation (the saga) and the failure workflow, in the pure decider."""

from __future__ import annotations

from typing import Any

from kapellmeister.decider import Decision, decide
from kapellmeister.definitions import Definition, compile_definition, parse_definition
from kapellmeister.messages import (
    Failure,
    RerunRequested,
    RunTask,
    Saga,
    Started,
    StartWorkflow,
    TaskCompleted,
    TaskFailed,
    TerminateRequested,
)

T = [f"2026-11-23T10:00:0{i}.000Z" for i in range(10)]
BOOM = Failure(type="internal", message="card declined", retryable=False)

TRIP: dict[str, Any] = {
    "name": "trip",
    "failure": "trip_failed",
    "tasks": [
        {
            "ref": "flight",
            "type": "SIMPLE",
            "task": "book.flight",
            "compensate": {
                "ref": "cancel_flight",
                "type": "SIMPLE",
                "task": "book.cancel",
                "input": {"booking": "${flight.output.id}"},
            },
        },
        {
            "ref": "hotel",
            "type": "SIMPLE",
            "task": "book.hotel",
            "compensate": {
                "ref": "cancel_hotel",
                "type": "SIMPLE",
                "task": "book.cancel",
                "input": {"booking": "${hotel.output.id}"},
            },
        },
        {"ref": "pay", "type": "SIMPLE", "task": "book.pay"},
    ],
}


def trip() -> Definition:
    return compile_definition(parse_definition(TRIP))


def step(d: Definition, state: Saga | None, ref: str, output: Any, at: str) -> Decision:
    return decide(
        d, state, TaskCompleted(workflow_id="w", ref=ref, attempt=1, output=output, at=at)
    )


def booked(d: Definition) -> Saga | None:
    state = decide(
        d, None, Started(workflow_id="w", workflow="trip", version=1, input={"who": "ann"}, at=T[0])
    ).state
    state = step(d, state, "flight", {"id": "F1"}, T[1]).state
    return step(d, state, "hotel", {"id": "H1"}, T[2]).state


def runs(decision: Decision) -> list[tuple[str, Any]]:
    return [(c.ref, c.input) for c in decision.commands if isinstance(c, RunTask)]


def test_a_failure_undoes_the_completed_tasks_last_first_then_fails():
    d = trip()
    failed = decide(
        d, booked(d), TaskFailed(workflow_id="w", ref="pay", attempt=1, error=BOOM, at=T[3])
    )
    assert failed.state is not None and failed.state.status == "RUNNING"
    assert failed.state.compensating is not None
    assert runs(failed) == [("cancel_hotel", {"booking": "H1"})]
    second = step(d, failed.state, "cancel_hotel", None, T[4])
    assert runs(second) == [("cancel_flight", {"booking": "F1"})]
    done = step(d, second.state, "cancel_flight", None, T[5])
    assert done.state is not None and done.state.status == "FAILED"
    assert done.state.error is not None and "card declined" in done.state.error.message
    assert done.state.compensating is None
    [failure] = [c for c in done.commands if isinstance(c, StartWorkflow)]
    assert (failure.workflow, failure.workflow_id, failure.parent) == (
        "trip_failed",
        "w-failure",
        None,
    )
    assert isinstance(failure.input, dict)
    assert (failure.input["workflow_id"], failure.input["status"]) == ("w", "FAILED")


def test_a_failing_compensation_fails_the_workflow_saying_so():
    d = trip()
    failed = decide(
        d, booked(d), TaskFailed(workflow_id="w", ref="pay", attempt=1, error=BOOM, at=T[3])
    ).state
    broken = decide(
        d,
        failed,
        TaskFailed(
            workflow_id="w",
            ref="cancel_hotel",
            attempt=1,
            error=Failure(type="x", message="hotel gone"),
            at=T[4],
        ),
    )
    assert broken.state is not None and broken.state.status == "FAILED"
    assert broken.state.error is not None and broken.state.error.type == "compensation_failed"
    assert (
        "hotel gone" in broken.state.error.message and "card declined" in broken.state.error.message
    )


def test_terminate_with_compensation_undoes_then_ends_terminated():
    d = trip()
    asked = decide(
        d,
        booked(d),
        TerminateRequested(workflow_id="w", reason="trip off", compensate=True, at=T[3]),
    )
    assert runs(asked) == [("cancel_hotel", {"booking": "H1"})]
    state = step(d, asked.state, "cancel_hotel", None, T[4]).state
    state = step(d, state, "cancel_flight", None, T[5]).state
    assert state is not None and state.status == "TERMINATED"
    statuses = {t.ref: t.status for t in state.tasks}
    assert statuses["pay"] == "CANCELED"


def test_terminate_without_compensation_ends_at_once():
    d = trip()
    ended = decide(d, booked(d), TerminateRequested(workflow_id="w", reason="stop", at=T[3]))
    assert ended.state is not None and ended.state.status == "TERMINATED"
    assert runs(ended) == []


def test_terminate_with_compensation_of_a_workflow_already_undoing_is_refused():
    """Its compensations finish and it ends as it was going to (a parent's end asks this)."""
    d = trip()
    undoing = decide(
        d, booked(d), TaskFailed(workflow_id="w", ref="pay", attempt=1, error=BOOM, at=T[3])
    ).state
    refused = decide(
        d,
        undoing,
        TerminateRequested(workflow_id="w", reason="trip off", compensate=True, at=T[4]),
    )
    assert refused.state is undoing and refused.commands == ()
    assert refused.refusal is not None and refused.refusal.code == 409
    assert "already compensating, to end FAILED" in refused.refusal.message
    stopped = decide(d, undoing, TerminateRequested(workflow_id="w", reason="stop", at=T[4]))
    assert stopped.state is not None and stopped.state.status == "TERMINATED"


def test_nothing_to_undo_fails_at_once():
    d = trip()
    state = decide(
        d, None, Started(workflow_id="w", workflow="trip", version=1, input={}, at=T[0])
    ).state
    failed = decide(
        d, state, TaskFailed(workflow_id="w", ref="flight", attempt=1, error=BOOM, at=T[1])
    )
    assert failed.state is not None and failed.state.status == "FAILED"
    assert [c.workflow for c in failed.commands if isinstance(c, StartWorkflow)] == ["trip_failed"]


def plan_day_done() -> tuple[Definition, Saga | None]:
    from pathlib import Path

    from kapellmeister.definitions import load_definition

    d = load_definition(Path(__file__).parents[2] / "services/conductor/definitions/plan_day.yaml")
    state = decide(
        d,
        None,
        Started(
            workflow_id="w",
            workflow="plan_day",
            version=1,
            input={"user": "ann", "datetime": "2026-11-21T12:00:00"},
            at=T[0],
        ),
    ).state
    state = step(d, state, "agenda", {"activity": "free"}, T[1]).state
    state = step(d, state, "weather", {"rain": False, "snow": False, "temperature": 9}, T[2]).state
    assert state is not None and state.output == {"activity": "run"}
    return d, state


def test_rerun_from_a_task_keeps_what_ran_before_and_runs_the_rest_again():
    d, state = plan_day_done()
    again = decide(d, state, RerunRequested(workflow_id="w", task="weather", at=T[3]))
    assert again.refusal is None
    assert again.state is not None and again.state.status == "RUNNING"
    assert [(c.ref, c.attempt, c.msg_id) for c in again.commands if isinstance(c, RunTask)] == [
        ("weather", 2, "w:weather:2")
    ]
    records = {t.ref: t for t in again.state.tasks}
    assert (records["agenda"].status, records["agenda"].output) == (
        "COMPLETED",
        {"activity": "free"},
    )
    assert {records[r].status for r in ("is_wet", "run", "notify")} == {"CANCELED"}
    assert records["notify"].history[0].status == "COMPLETED"
    wet = decide(
        d,
        again.state,
        TaskCompleted(
            workflow_id="w",
            ref="weather",
            attempt=2,
            output={"rain": True, "snow": False, "temperature": 5},
            at=T[4],
        ),
    )
    assert wet.state is not None and wet.state.output == {"activity": "code_for_fun"}
    [event] = [c for c in wet.commands if not isinstance(c, RunTask)]
    assert event.msg_id == "w:notify:2"  # a new event, not a duplicate of the first run's


def test_rerun_refuses_unknown_tasks_and_running_workflows():
    d, state = plan_day_done()
    unknown = decide(d, state, RerunRequested(workflow_id="w", task="nope", at=T[3]))
    assert unknown.refusal is not None and unknown.refusal.code == 404
    running = decide(d, state, RerunRequested(workflow_id="w", task="weather", at=T[3])).state
    refused = decide(d, running, RerunRequested(workflow_id="w", task="agenda", at=T[4]))
    assert refused.refusal is not None and refused.refusal.code == 409
