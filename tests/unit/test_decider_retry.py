"""Retries: backoff timers, attempt history, terminal failures, operator retry."""

from __future__ import annotations

from typing import Any

import pytest

from kapellmeister.decider import Decision, decide
from kapellmeister.definitions import Definition, compile_definition, parse_definition
from kapellmeister.messages import (
    Failure,
    PauseRequested,
    ResumeRequested,
    RetryDue,
    RetryRequested,
    RunTask,
    Saga,
    ScheduleTimer,
    Started,
    TaskCompleted,
    TaskFailed,
    TaskTimedOut,
    WorkflowTimedOut,
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


def timed(policy: str, retry: int = 0) -> Definition:
    return compile_definition(
        parse_definition(
            {
                "name": "r",
                "timeout_s": 60,
                "tasks": [
                    {
                        "ref": "a",
                        "type": "SIMPLE",
                        "task": "t.a",
                        "timeout_s": 5,
                        "timeout_policy": policy,
                        "retry": {"count": retry, "delay_s": 0},
                    }
                ],
            }
        )
    )


def timed_out(d: Definition, state: Saga | None, attempt: int) -> Decision:
    return decide(
        d,
        state,
        TaskTimedOut(workflow_id="w", ref="a", attempt=attempt, at="2026-11-23T10:00:05.000Z"),
    )


def test_dispatch_sets_the_task_and_workflow_timers():
    d = timed("TIME_OUT_WF")
    first = decide(d, None, Started(workflow_id="w", workflow="r", version=1, input={}, at=T0))
    timers = {(c.ref, c.purpose, c.fire_at) for c in first.commands if isinstance(c, ScheduleTimer)}
    assert timers == {
        ("a", "timeout", "2026-11-23T10:00:05.000Z"),
        ("workflow", "workflow_timeout", "2026-11-23T10:01:00.000Z"),
    }


def test_time_out_wf_ends_the_workflow_and_a_late_result_is_stale():
    d = timed("TIME_OUT_WF")
    ended = timed_out(d, start(d), 1)
    assert ended.state is not None and ended.state.status == "TIMED_OUT"
    assert record(ended.state).status == "TIMED_OUT"
    late = decide(
        d, ended.state, TaskCompleted(workflow_id="w", ref="a", attempt=1, output=1, at=T0)
    )
    assert late.state is ended.state and late.commands == ()


def test_retry_policy_runs_a_new_attempt_with_its_own_timeout():
    d = timed("RETRY", retry=1)
    retried = timed_out(d, start(d), 1)
    assert retried.state is not None and retried.state.status == "RUNNING"
    a = record(retried.state)
    assert (a.attempt, a.status, a.history[0].status) == (2, "SCHEDULED", "TIMED_OUT")
    assert {type(c).__name__ for c in retried.commands} == {"RunTask", "ScheduleTimer"}
    spent = timed_out(d, retried.state, 2)
    assert spent.state is not None and spent.state.status == "TIMED_OUT"


def test_alert_only_keeps_waiting_and_says_so():
    d = timed("ALERT_ONLY")
    alerted = timed_out(d, start(d), 1)
    a = record(alerted.state)
    assert (a.status, a.error is not None and a.error.type) == ("SCHEDULED", "timed_out")
    done = decide(
        d, alerted.state, TaskCompleted(workflow_id="w", ref="a", attempt=1, output=1, at=T0)
    )
    assert done.state is not None and done.state.status == "COMPLETED"


def test_the_workflow_timeout_cancels_what_waits():
    d = timed("ALERT_ONLY")
    ended = decide(d, start(d), WorkflowTimedOut(workflow_id="w", at="2026-11-23T10:01:00.000Z"))
    assert ended.state is not None and ended.state.status == "TIMED_OUT"
    assert record(ended.state).status == "CANCELED"
    assert decide(d, ended.state, WorkflowTimedOut(workflow_id="w", at=T0)).state is ended.state


SEQ = compile_definition(
    parse_definition(
        {
            "name": "r",
            "tasks": [
                {"ref": "a", "type": "SIMPLE", "task": "t.a"},
                {"ref": "b", "type": "SIMPLE", "task": "t.b", "input": {"x": "${a.output}"}},
            ],
        }
    )
)


def test_a_paused_workflow_records_results_but_dispatches_nothing_until_resumed():
    state = decide(
        SEQ, None, Started(workflow_id="w", workflow="r", version=1, input={}, at=T0)
    ).state
    paused = decide(SEQ, state, PauseRequested(workflow_id="w", at=T0))
    assert paused.state is not None and paused.state.status == "PAUSED"
    arrived = decide(
        SEQ, paused.state, TaskCompleted(workflow_id="w", ref="a", attempt=1, output=5, at=T0)
    )
    assert arrived.commands == ()
    assert arrived.state is not None and arrived.state.tasks[0].status == "COMPLETED"
    assert arrived.state.deferred == ["a"]
    resumed = decide(SEQ, arrived.state, ResumeRequested(workflow_id="w", at=T0))
    assert resumed.state is not None and (resumed.state.status, resumed.state.deferred) == (
        "RUNNING",
        [],
    )
    assert [(c.ref, c.input) for c in resumed.commands if isinstance(c, RunTask)] == [
        ("b", {"x": 5})
    ]


def test_pause_and_resume_refuse_the_wrong_status():
    state = decide(
        SEQ, None, Started(workflow_id="w", workflow="r", version=1, input={}, at=T0)
    ).state
    refused = decide(SEQ, state, ResumeRequested(workflow_id="w", at=T0))
    assert refused.refusal is not None and refused.refusal.code == 409
    paused = decide(SEQ, state, PauseRequested(workflow_id="w", at=T0)).state
    again = decide(SEQ, paused, PauseRequested(workflow_id="w", at=T0))
    assert again.refusal is not None and again.refusal.code == 409


def test_a_retry_due_while_paused_is_dispatched_at_resume():
    d = flow({"count": 1, "delay_s": 1})
    failed = fail(d, start(d), 1).state
    paused = decide(d, failed, PauseRequested(workflow_id="w", at=T0)).state
    due = decide(
        d, paused, RetryDue(workflow_id="w", ref="a", attempt=2, at="2026-11-23T10:00:01.000Z")
    )
    assert due.commands == ()
    resumed = decide(d, due.state, ResumeRequested(workflow_id="w", at="2026-11-23T10:00:09.000Z"))
    assert [(c.ref, c.attempt) for c in resumed.commands if isinstance(c, RunTask)] == [("a", 2)]
