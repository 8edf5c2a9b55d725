"""Task timeouts that fall due while a workflow is paused take effect at its resume."""

from __future__ import annotations

import msgspec
import pytest

from kapellmeister.decider import Decision, commands_caused_by, decide, fact_id
from kapellmeister.definitions import Definition, compile_definition, parse_definition
from kapellmeister.messages import (
    PauseRequested,
    ResumeRequested,
    RunTask,
    Saga,
    ScheduleTimer,
    Started,
    TaskCompleted,
    TaskRecord,
    TaskTimedOut,
)

T0 = "2026-11-23T10:00:00.000Z"
PAUSED_AT = "2026-11-23T10:00:01.000Z"
TIMEOUT_AT = "2026-11-23T10:00:05.000Z"  # T0 plus the task's timeout_s
RESUMED_AT = "2026-11-23T10:00:09.000Z"
EARLY = "2026-11-23T10:00:03.000Z"  # a resume before the timeout is due


def timed(policy: str, retry: int = 0, delay_s: float = 0) -> Definition:
    return compile_definition(
        parse_definition(
            {
                "name": "r",
                "tasks": [
                    {
                        "ref": "a",
                        "type": "SIMPLE",
                        "task": "t.a",
                        "timeout_s": 5,
                        "timeout_policy": policy,
                        "retry": {"count": retry, "delay_s": delay_s},
                    },
                    {"ref": "b", "type": "SIMPLE", "task": "t.b"},
                ],
            }
        )
    )


def paused(d: Definition) -> Saga:
    started = decide(d, None, Started(workflow_id="w", workflow="r", version=1, input={}, at=T0))
    state = decide(d, started.state, PauseRequested(workflow_id="w", at=PAUSED_AT)).state
    assert state is not None and state.status == "PAUSED"
    return state


def fired(d: Definition, state: Saga | None, attempt: int = 1, at: str = TIMEOUT_AT) -> Decision:
    return decide(d, state, TaskTimedOut(workflow_id="w", ref="a", attempt=attempt, at=at))


def resume(d: Definition, state: Saga | None, at: str = RESUMED_AT) -> Decision:
    return decide(d, state, ResumeRequested(workflow_id="w", at=at))


def task_a(state: Saga | None) -> TaskRecord:
    assert state is not None
    return next(t for t in state.tasks if t.ref == "a")


def fired_while_paused(d: Definition) -> Saga:
    """The timeout's timer fired while paused: noted on the attempt, nothing else."""
    noted = fired(d, paused(d))
    assert noted.commands == ()
    assert noted.state is not None and noted.state.status == "PAUSED"
    assert (task_a(noted.state).status, task_a(noted.state).timeout_fired) == ("SCHEDULED", True)
    return noted.state


def test_a_timeout_fired_while_paused_is_noted_once():
    d = timed("TIME_OUT_WF")
    noted = fired_while_paused(d)
    again = fired(d, noted)  # the timer's result redelivered
    assert again.state is noted and again.commands == ()
    stored = msgspec.json.decode(msgspec.json.encode(noted), type=Saga)
    assert task_a(stored).timeout_fired  # the note survives the KV round trip


@pytest.mark.parametrize("seen", ["fired", "passed"], ids=["fired", "passed"])
def test_time_out_wf_at_resume_ends_the_workflow_timed_out(seen):
    """Whether the timer's firing reached the paused saga or its time has merely passed."""
    d = timed("TIME_OUT_WF")
    state = fired_while_paused(d) if seen == "fired" else paused(d)
    resumed = resume(d, state)
    assert resumed.refusal is None
    ended = resumed.state
    assert ended is not None and ended.status == "TIMED_OUT"
    assert ended.ended_by == fact_id(ResumeRequested(workflow_id="w", at=RESUMED_AT))
    assert ended.error is not None and ended.error.type == "timed_out"
    a = task_a(ended)
    assert (a.status, a.ended_at, a.timeout_fired) == ("TIMED_OUT", RESUMED_AT, False)
    assert [t.ref for t in ended.tasks] == ["a"]  # nothing after it was started
    assert resumed.commands == ()


@pytest.mark.parametrize("seen", ["fired", "passed"], ids=["fired", "passed"])
def test_retry_at_resume_dispatches_the_next_attempt_with_its_own_timeout(seen):
    d = timed("RETRY", retry=1)
    state = fired_while_paused(d) if seen == "fired" else paused(d)
    resumed = resume(d, state)
    assert resumed.state is not None and resumed.state.status == "RUNNING"
    a = task_a(resumed.state)
    assert (a.attempt, a.status, a.scheduled_at, a.timeout_fired) == (
        2,
        "SCHEDULED",
        RESUMED_AT,
        False,
    )
    assert [(h.attempt, h.status) for h in a.history] == [(1, "TIMED_OUT")]
    assert resumed.commands == (
        RunTask(
            msg_id="w:a:2",
            workflow_id="w",
            workflow="r",
            ref="a",
            attempt=2,
            task="t.a",
            input={},
        ),
        ScheduleTimer(
            msg_id="w:a:2:timeout",
            workflow_id="w",
            ref="a",
            attempt=2,
            fire_at="2026-11-23T10:00:14.000Z",
            purpose="timeout",
        ),
    )
    # The resume is a request, not redelivered: its commands are re-derived from the
    # state (the sweeper does), and the state says they may not be out yet.
    cause = resumed.state.last_fact
    assert commands_caused_by(d, resumed.state, cause) == resumed.commands
    assert resumed.state.unpublished == cause


def test_retry_at_resume_waits_out_the_backoff_on_a_timer():
    d = timed("RETRY", retry=1, delay_s=2)
    resumed = resume(d, fired_while_paused(d))
    a = task_a(resumed.state)
    assert (a.attempt, a.status, a.retry_at) == (2, "SCHEDULED", "2026-11-23T10:00:11.000Z")
    assert [(c.purpose, c.attempt) for c in resumed.commands if isinstance(c, ScheduleTimer)] == [
        ("retry", 2)
    ]
    assert not any(isinstance(c, RunTask) for c in resumed.commands)


def test_retry_at_resume_with_the_retries_spent_ends_the_workflow_timed_out():
    d = timed("RETRY", retry=0)
    resumed = resume(d, fired_while_paused(d))
    assert resumed.state is not None and resumed.state.status == "TIMED_OUT"


@pytest.mark.parametrize("seen", ["fired", "passed"], ids=["fired", "passed"])
def test_alert_only_at_resume_records_the_alert_and_keeps_waiting(seen):
    d = timed("ALERT_ONLY")
    state = fired_while_paused(d) if seen == "fired" else paused(d)
    resumed = resume(d, state)
    assert resumed.state is not None and resumed.state.status == "RUNNING"
    a = task_a(resumed.state)
    assert (a.status, a.attempt, a.timeout_fired) == ("SCHEDULED", 1, False)
    assert a.error is not None and a.error.type == "timed_out"
    assert "ran past its timeout_s (5.0 s)" in a.error.message
    assert resumed.commands == ()
    done = decide(
        d,
        resumed.state,
        TaskCompleted(workflow_id="w", ref="a", attempt=1, output=1, at="2026-11-23T10:00:10.000Z"),
    )
    assert done.state is not None and task_a(done.state).status == "COMPLETED"
    assert [c.ref for c in done.commands if isinstance(c, RunTask)] == ["b"]


def test_an_alert_is_not_raised_again_at_a_later_resume():
    d = timed("ALERT_ONLY")
    alerted = resume(d, fired_while_paused(d)).state
    again = decide(d, alerted, PauseRequested(workflow_id="w", at="2026-11-23T10:00:10.000Z"))
    resumed = resume(d, again.state, at="2026-11-23T10:00:11.000Z")
    assert task_a(resumed.state) == task_a(alerted)


@pytest.mark.parametrize("policy", ["TIME_OUT_WF", "RETRY", "ALERT_ONLY"])
def test_a_timeout_not_yet_due_at_resume_is_untouched_and_fires_later(policy):
    d = timed(policy, retry=1)
    state = paused(d)
    resumed = resume(d, state, at=EARLY)
    assert resumed.state is not None and resumed.state.status == "RUNNING"
    assert task_a(resumed.state) == task_a(state)
    assert resumed.commands == ()
    # Its timer is still set and fires on a running workflow: the policy applies then.
    later = fired(d, resumed.state)
    a = task_a(later.state)
    assert later.state is not None
    if policy == "TIME_OUT_WF":
        assert later.state.status == "TIMED_OUT"
    elif policy == "RETRY":
        assert (a.attempt, a.status) == (2, "SCHEDULED")
    else:
        assert a.error is not None and a.error.type == "timed_out"


@pytest.mark.parametrize("seen", ["fired", "passed"], ids=["fired", "passed"])
@pytest.mark.parametrize("policy", ["TIME_OUT_WF", "RETRY", "ALERT_ONLY"])
def test_the_late_timeout_of_an_attempt_handled_at_resume_changes_nothing(policy, seen):
    """The timer's result arrives (or comes again) after the resume acted on it."""
    d = timed(policy, retry=1)
    state = fired_while_paused(d) if seen == "fired" else paused(d)
    resumed = resume(d, state)
    late = fired(d, resumed.state, at="2026-11-23T10:00:10.000Z")
    assert late.state is resumed.state
    assert late.commands == ()


def test_a_result_that_came_while_paused_is_not_timed_out_at_resume():
    d = timed("TIME_OUT_WF")
    done = decide(
        d,
        paused(d),
        TaskCompleted(workflow_id="w", ref="a", attempt=1, output=1, at="2026-11-23T10:00:04.000Z"),
    )
    resumed = resume(d, done.state)
    assert resumed.state is not None and resumed.state.status == "RUNNING"
    assert task_a(resumed.state).status == "COMPLETED"
    assert [c.ref for c in resumed.commands if isinstance(c, RunTask)] == ["b"]


def test_a_retry_dispatched_at_resume_gets_its_timeout():
    d = timed("RETRY", retry=1, delay_s=2)
    state = decide(d, None, Started(workflow_id="w", workflow="r", version=1, input={}, at=T0))
    backing_off = fired(d, state.state).state  # attempt 2 waits for 10:00:07
    held = decide(d, backing_off, PauseRequested(workflow_id="w", at="2026-11-23T10:00:06.000Z"))
    resumed = resume(d, held.state)
    a = task_a(resumed.state)
    assert (a.attempt, a.retry_at, a.scheduled_at, a.timeout_at) == (
        2,
        None,
        RESUMED_AT,
        "2026-11-23T10:00:14.000Z",
    )
    assert [(type(c).__name__, getattr(c, "attempt", None)) for c in resumed.commands] == [
        ("RunTask", 2),
        ("ScheduleTimer", 2),
    ]
