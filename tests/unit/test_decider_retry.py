"""Retries: backoff timers, attempt history, terminal failures, operator retry."""

from __future__ import annotations

from typing import Any

import pytest

from kapellmeister.decider import Decision, decide
from kapellmeister.definitions import Definition, compile_definition, parse_definition
from kapellmeister.messages import (
    Failure,
    RetryDue,
    RetryRequested,
    RunTask,
    Saga,
    ScheduleTimer,
    Started,
    TaskCompleted,
    TaskFailed,
)

T0 = "2026-11-23T10:00:00.000Z"
TRANSIENT = Failure(type="internal", message="flaky", retryable=True)
TERMINAL = Failure(type="bad_request", message="bad date", code=400, retryable=False)


def flow(retry: dict[str, Any]) -> Definition:
    return compile_definition(
        parse_definition(
            {"name": "r", "tasks": [{"ref": "a", "type": "SIMPLE", "task": "t.a", "retry": retry}]}
        )
    )


def start(d: Definition) -> Saga:
    state = decide(
        d, None, Started(workflow_id="w", workflow="r", version=1, input={}, at=T0)
    ).state
    assert state is not None
    return state


def fail(
    d: Definition, state: Saga | None, attempt: int, error: Failure = TRANSIENT, at: str = T0
) -> Decision:
    return decide(
        d, state, TaskFailed(workflow_id="w", ref="a", attempt=attempt, error=error, at=at)
    )


def record(state: Saga | None):
    assert state is not None
    return state.tasks[0]


def test_a_retry_without_delay_dispatches_the_next_attempt_at_once():
    d = flow({"count": 2, "delay_s": 0})
    second = fail(d, start(d), 1)
    assert [(c.ref, c.attempt, c.msg_id) for c in second.commands if isinstance(c, RunTask)] == [
        ("a", 2, "w:a:2")
    ]
    a = record(second.state)
    assert (a.status, a.attempt, a.error) == ("SCHEDULED", 2, None)
    assert [(h.attempt, h.status, h.error) for h in a.history] == [(1, "FAILED", TRANSIENT)]


@pytest.mark.parametrize(
    ("logic", "delays"),
    [
        ("FIXED", ["10:00:02", "10:00:02"]),
        ("LINEAR", ["10:00:02", "10:00:04"]),
        ("EXPONENTIAL", ["10:00:02", "10:00:04"]),
    ],
)
def test_backoff_waits_on_a_durable_timer(logic, delays):
    d = flow({"count": 3, "logic": logic, "delay_s": 2})
    state: Saga | None = start(d)
    for attempt, when in enumerate(delays, start=1):
        failed = fail(d, state, attempt)
        assert failed.commands == (
            ScheduleTimer(
                msg_id=f"w:a:{attempt + 1}:retry",
                workflow_id="w",
                ref="a",
                attempt=attempt + 1,
                fire_at=f"2026-11-23T{when}.000Z",
                purpose="retry",
            ),
        )
        due = decide(
            d,
            failed.state,
            RetryDue(workflow_id="w", ref="a", attempt=attempt + 1, at=f"2026-11-23T{when}.000Z"),
        )
        assert [c.attempt for c in due.commands if isinstance(c, RunTask)] == [attempt + 1]
        again = decide(d, due.state, RetryDue(workflow_id="w", ref="a", attempt=attempt + 1, at=T0))
        assert again.state is due.state and again.commands == due.commands  # redelivered timer
        state = due.state


def test_exponential_doubles():
    d = flow({"count": 3, "logic": "EXPONENTIAL", "delay_s": 1})
    state: Saga | None = start(d)
    fire_times = []
    for attempt in (1, 2, 3):
        failed = fail(d, state, attempt)
        fire_times.append(record(failed.state).retry_at)
        state = decide(
            d, failed.state, RetryDue(workflow_id="w", ref="a", attempt=attempt + 1, at=T0)
        ).state
    assert fire_times == [
        "2026-11-23T10:00:01.000Z",
        "2026-11-23T10:00:02.000Z",
        "2026-11-23T10:00:04.000Z",
    ]


def test_a_terminal_failure_is_not_retried():
    d = flow({"count": 5, "delay_s": 0})
    failed = fail(d, start(d), 1, TERMINAL)
    assert failed.state is not None and failed.state.status == "FAILED"
    assert record(failed.state).error == TERMINAL
    assert failed.commands == ()


def test_when_the_retries_are_spent_the_workflow_fails_with_every_attempt_kept():
    d = flow({"count": 1, "delay_s": 0})
    state = fail(d, fail(d, start(d), 1).state, 2).state
    assert state is not None and state.status == "FAILED"
    a = record(state)
    assert (a.attempt, a.status, [h.attempt for h in a.history]) == (2, "FAILED", [1])


def test_a_late_result_of_an_earlier_attempt_changes_nothing():
    d = flow({"count": 2, "delay_s": 0})
    retried = fail(d, start(d), 1).state
    late = decide(d, retried, TaskCompleted(workflow_id="w", ref="a", attempt=1, output=1, at=T0))
    assert late.state is retried and late.commands == ()


def test_operator_retry_runs_the_failed_task_again():
    d = flow({"count": 0})
    failed = fail(d, start(d), 1).state
    assert failed is not None and failed.status == "FAILED"
    retried = decide(d, failed, RetryRequested(workflow_id="w", at="2026-11-23T11:00:00.000Z"))
    assert retried.refusal is None
    assert retried.state is not None and (retried.state.status, retried.state.error) == (
        "RUNNING",
        None,
    )
    assert [(c.ref, c.attempt) for c in retried.commands if isinstance(c, RunTask)] == [("a", 2)]
    done = decide(
        d,
        retried.state,
        TaskCompleted(workflow_id="w", ref="a", attempt=2, output=7, at="2026-11-23T11:00:01.000Z"),
    )
    assert done.state is not None and done.state.status == "COMPLETED"
    assert [h.attempt for h in record(done.state).history] == [1]


def test_operator_retry_of_a_running_workflow_is_refused():
    d = flow({"count": 0})
    state = start(d)
    refused = decide(d, state, RetryRequested(workflow_id="w", at=T0))
    assert refused.state is state
    assert refused.refusal is not None and refused.refusal.code == 409
