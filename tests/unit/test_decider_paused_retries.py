"""Retry backoffs that fall due while a workflow is paused are dispatched at its resume.

The backoff timer fires on the server's clock, the resume is stamped by a conductor's:
a conductor running behind must not leave the retry waiting on a timer already spent.
"""

from __future__ import annotations

import msgspec
import pytest

from kapellmeister.decider import Decision, commands_caused_by, decide, fact_id
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
    TaskFailed,
    TaskRecord,
    TerminateRequested,
)

T0 = "2026-11-23T10:00:00.000Z"
FAILED_AT = "2026-11-23T10:00:01.000Z"
PAUSED_AT = "2026-11-23T10:00:02.000Z"
EARLY = "2026-11-23T10:00:03.000Z"  # a resume before the backoff is over
BEHIND = "2026-11-23T10:00:04.000Z"  # after the timer fired, by a conductor clock behind
RETRY_AT = "2026-11-23T10:00:05.000Z"  # FAILED_AT plus the 4 s backoff
RESUMED_AT = "2026-11-23T10:00:09.000Z"
FLAKY = Failure(type="internal", message="flaky", retryable=True)


def backing_off(timeout_s: float | None = None) -> Definition:
    a: dict[str, object] = {
        "ref": "a",
        "type": "SIMPLE",
        "task": "t.a",
        "retry": {"count": 2, "delay_s": 4},
    }
    if timeout_s is not None:
        a["timeout_s"] = timeout_s
    return compile_definition(
        parse_definition({"name": "r", "tasks": [a, {"ref": "b", "type": "SIMPLE", "task": "t.b"}]})
    )


def paused(d: Definition) -> Saga:
    """Attempt 1 failed, attempt 2 waits for RETRY_AT, and the workflow is paused."""
    started = decide(d, None, Started(workflow_id="w", workflow="r", version=1, input={}, at=T0))
    failed = decide(
        d,
        started.state,
        TaskFailed(workflow_id="w", ref="a", attempt=1, error=FLAKY, at=FAILED_AT),
    )
    assert task_a(failed.state).retry_at == RETRY_AT
    state = decide(d, failed.state, PauseRequested(workflow_id="w", at=PAUSED_AT)).state
    assert state is not None and state.status == "PAUSED"
    return state


def due(d: Definition, state: Saga | None, attempt: int = 2, at: str = RETRY_AT) -> Decision:
    return decide(d, state, RetryDue(workflow_id="w", ref="a", attempt=attempt, at=at))


def resume(d: Definition, state: Saga | None, at: str = RESUMED_AT) -> Decision:
    return decide(d, state, ResumeRequested(workflow_id="w", at=at))


def task_a(state: Saga | None) -> TaskRecord:
    assert state is not None
    return next(t for t in state.tasks if t.ref == "a")


def fired_while_paused(d: Definition) -> Saga:
    """The backoff's timer fired while paused: noted on the attempt, nothing dispatched."""
    noted = due(d, paused(d))
    assert noted.commands == ()
    assert noted.state is not None and noted.state.status == "PAUSED"
    a = task_a(noted.state)
    assert (a.attempt, a.status, a.retry_at, a.retry_fired) == (2, "SCHEDULED", RETRY_AT, True)
    assert a.cause == "a#1"  # still the failure's: the note itself caused no command
    return noted.state


def dispatch(at: str, timeout_at: str | None) -> tuple[RunTask | ScheduleTimer, ...]:
    run = RunTask(
        msg_id="w:a:2", workflow_id="w", workflow="r", ref="a", attempt=2, task="t.a", input={}
    )
    if timeout_at is None:
        return (run,)
    timer = ScheduleTimer(
        msg_id="w:a:2:timeout",
        workflow_id="w",
        ref="a",
        attempt=2,
        fire_at=timeout_at,
        purpose="timeout",
    )
    return (run, timer)


def test_a_retry_fired_while_paused_is_noted_once():
    d = backing_off()
    noted = fired_while_paused(d)
    again = due(d, noted)  # the timer's result redelivered, still paused
    assert again.state is noted and again.commands == ()
    stored = msgspec.json.decode(msgspec.json.encode(noted), type=Saga)
    assert task_a(stored).retry_fired  # the note survives the KV round trip


@pytest.mark.parametrize(
    ("timeout_s", "timeout_at"),
    [(None, None), (5, "2026-11-23T10:00:09.000Z")],
    ids=["no-timeout", "timeout"],
)
def test_a_retry_fired_while_paused_is_dispatched_at_a_resume_stamped_before_retry_at(
    timeout_s, timeout_at
):
    d = backing_off(timeout_s)
    resumed = resume(d, fired_while_paused(d), at=BEHIND)
    assert resumed.refusal is None
    assert resumed.state is not None and resumed.state.status == "RUNNING"
    a = task_a(resumed.state)
    cause = fact_id(ResumeRequested(workflow_id="w", at=BEHIND))
    assert (a.attempt, a.status, a.retry_at, a.retry_fired) == (2, "SCHEDULED", None, False)
    assert (a.cause, a.scheduled_at, a.timeout_at) == (cause, BEHIND, timeout_at)
    assert resumed.commands == dispatch(BEHIND, timeout_at)


@pytest.mark.parametrize("timeout_s", [None, 5], ids=["no-timeout", "timeout"])
def test_the_resumes_dispatch_is_derived_again_from_the_state(timeout_s):
    """The resume is a request, not redelivered: the sweeper re-derives its commands."""
    d = backing_off(timeout_s)
    resumed = resume(d, fired_while_paused(d), at=BEHIND)
    assert resumed.state is not None
    cause = resumed.state.last_fact
    assert commands_caused_by(d, resumed.state, cause) == resumed.commands
    # Only a timer needs the mark: a SCHEDULED record's dispatch is re-driven anyway.
    assert resumed.state.unpublished == (cause if timeout_s else "")


@pytest.mark.parametrize("at", [BEHIND, RESUMED_AT], ids=["behind", "after"])
def test_the_retry_due_redelivered_after_resume_changes_nothing(at):
    d = backing_off(5)
    resumed = resume(d, fired_while_paused(d), at=at)
    late = due(d, resumed.state, at="2026-11-23T10:00:10.000Z")
    assert late.state is resumed.state
    assert late.commands == ()


def test_a_resume_before_the_backoff_is_over_waits_for_its_timer():
    d = backing_off(5)
    state = paused(d)
    resumed = resume(d, state, at=EARLY)
    assert resumed.state is not None and resumed.state.status == "RUNNING"
    assert task_a(resumed.state) == task_a(state)
    assert resumed.commands == ()
    # The timer is still set and fires on the running workflow: dispatched then.
    fired = due(d, resumed.state)
    a = task_a(fired.state)
    assert (a.retry_at, a.retry_fired, a.cause, a.scheduled_at) == (
        None,
        False,
        "a#2:due",
        RETRY_AT,
    )
    assert fired.commands == dispatch(RETRY_AT, "2026-11-23T10:00:10.000Z")


def test_a_retry_whose_time_passed_is_dispatched_at_resume_without_its_timer():
    """The resume's clock alone is enough when it is past retry_at (the firing not seen)."""
    d = backing_off()
    resumed = resume(d, paused(d))
    assert resumed.commands == dispatch(RESUMED_AT, None)


def test_the_next_attempt_starts_without_the_mark():
    """Terminated while paused, the noted attempt is retried by the operator."""
    d = backing_off()
    noted = fired_while_paused(d)
    ended = decide(d, noted, TerminateRequested(workflow_id="w", reason="stop", at=EARLY))
    assert ended.state is not None and ended.state.status == "TERMINATED"
    again = decide(d, ended.state, RetryRequested(workflow_id="w", at=RESUMED_AT))
    a = task_a(again.state)
    assert (a.attempt, a.status, a.retry_at, a.retry_fired) == (3, "SCHEDULED", None, False)
    assert [c.attempt for c in again.commands if isinstance(c, RunTask)] == [3]
