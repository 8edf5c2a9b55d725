"""The pure decider: plan_day end to end, redelivery, stale facts, failures and task types.

Every test feeds facts into `decide` by hand and checks the saga and the commands exactly;
there is no I/O and no clock (times come in on the facts, as the runtime stamps them).
"""

from pathlib import Path

import msgspec
import pytest

import services.conductor
from kapellmeister.decider import Decision, commands_caused_by, decide, fact_id, task_msg_id
from kapellmeister.definitions import compile_definition, load_definition, parse_definition
from kapellmeister.messages import (
    Failure,
    PublishEvent,
    RunTask,
    Saga,
    Started,
    TaskCompleted,
    TaskFailed,
)

PLAN_DAY = load_definition(
    Path(services.conductor.__file__).parent / "definitions" / "plan_day.yaml"
)
WF = "wf-1"
SATURDAY_NOON = "2019-04-06T12:00:00"


def at(second: int) -> str:
    return f"2026-11-23T10:00:{second:02d}.000Z"


def started(definition=PLAN_DAY, data=None, second=0, **extra):
    return Started(
        workflow_id=WF,
        workflow=definition.name,
        version=definition.version,
        input={"user": "ann", "datetime": SATURDAY_NOON} if data is None else data,
        at=at(second),
        **extra,
    )


def completed(ref, output, second, attempt=1, **extra):
    return TaskCompleted(
        workflow_id=WF, ref=ref, attempt=attempt, output=output, at=at(second), **extra
    )


def failed(ref, second, message="boom", attempt=1, **extra):
    error = Failure(type="boom", message=message, code=500)
    return TaskFailed(workflow_id=WF, ref=ref, attempt=attempt, error=error, at=at(second), **extra)


def compile_(data):
    return compile_definition(parse_definition(data))


def run(definition, facts, state=None):
    """Apply facts in order; return every decision."""
    decisions = []
    for fact in facts:
        decision = decide(definition, state, fact)
        decisions.append(decision)
        state = decision.state
    return decisions


def weather(rain, snow, temperature=12):
    return {"rain": rain, "temperature": temperature, "snow": snow}


def notify(activity):
    return PublishEvent(
        msg_id=f"{WF}:notify:1",
        subject="events.activity.chosen",
        data={"user": "ann", "activity": activity, "workflow_id": WF},
    )


def run_agenda():
    return RunTask(
        msg_id=f"{WF}:agenda:1",
        workflow_id=WF,
        workflow="plan_day",
        ref="agenda",
        task="agenda.activity",
        attempt=1,
        input={"datetime": SATURDAY_NOON},
    )


def run_weather():
    return RunTask(
        msg_id=f"{WF}:weather:1",
        workflow_id=WF,
        workflow="plan_day",
        ref="weather",
        task="weather.report",
        attempt=1,
        input={"date": SATURDAY_NOON},
    )


def record(state, ref):
    matches = [t for t in state.tasks if t.ref == ref]
    assert len(matches) == 1, f"{ref!r} recorded {len(matches)} times"
    return matches[0]


# --- ids -------------------------------------------------------------------------------


def test_msg_id_and_fact_id_formats():
    assert task_msg_id("wf-9", "agenda", 3) == "wf-9:agenda:3"
    assert fact_id(started()) == "start"
    assert fact_id(completed("agenda", {}, 1, attempt=2)) == "agenda#2"
    assert fact_id(failed("weather", 1, attempt=4)) == "weather#4"


# --- plan_day, every path -----------------------------------------------------------------


def test_start_schedules_the_agenda():
    decision = decide(PLAN_DAY, None, started(trace_id="t" * 32, tenant="acme"))
    state = decision.state
    assert decision.commands == (run_agenda(),)
    assert state is not None
    assert state.workflow_id == WF
    assert (state.workflow, state.version, state.status) == ("plan_day", 1, "RUNNING")
    assert state.input == {"user": "ann", "datetime": SATURDAY_NOON}
    assert (state.created_at, state.updated_at) == (at(0), at(0))
    assert (state.trace_id, state.tenant) == ("t" * 32, "acme")
    assert state.output is None
    assert state.error is None
    agenda = record(state, "agenda")
    assert [t.ref for t in state.tasks] == ["agenda"]
    assert (agenda.name, agenda.type, agenda.status, agenda.attempt) == (
        "agenda.activity",
        "SIMPLE",
        "SCHEDULED",
        1,
    )
    assert (agenda.scheduled_at, agenda.started_at, agenda.ended_at) == (at(0), None, None)
    assert agenda.input == {"datetime": SATURDAY_NOON}
    assert agenda.cause == "start"


@pytest.mark.parametrize(
    ("report", "activity"),
    [
        (weather(rain=False, snow=False), "run"),
        (weather(rain=True, snow=False), "code_for_fun"),
        (weather(rain=False, snow=True), "code_for_fun"),
        (weather(rain=True, snow=True), "code_for_fun"),
    ],
)
def test_free_asks_the_weather(report, activity):
    first, second, third = run(
        PLAN_DAY,
        [
            started(),
            completed("agenda", {"activity": "free"}, 1),
            completed("weather", report, 2),
        ],
    )
    assert first.commands == (run_agenda(),)
    assert second.commands == (run_weather(),)
    assert second.state is not None
    assert second.state.status == "RUNNING"
    assert third.commands == (notify(activity),)
    state = third.state
    assert state is not None
    assert state.status == "COMPLETED"
    assert state.output == {"activity": activity}
    assert state.error is None
    assert state.variables == {"activity": activity}
    assert [t.ref for t in state.tasks] == [
        "agenda",
        "is_free",
        "weather",
        "is_wet",
        activity,
        "notify",
    ]
    assert all(t.attempt == 1 for t in state.tasks)
    assert all(t.status == "COMPLETED" for t in state.tasks)
    wet = record(state, "is_wet")
    expected_case = "rain=false snow=false" if activity == "run" else "default"
    assert wet.output == {"case": expected_case}
    assert wet.input == {
        "value": f"rain={str(report['rain']).lower()} snow={str(report['snow']).lower()}"
    }
    assert record(state, "weather").output == report
    assert record(state, "weather").input == {"date": SATURDAY_NOON}


@pytest.mark.parametrize("activity", ["work", "kids", "sleep"])
def test_busy_takes_the_agenda_activity_without_weather(activity):
    first, second = run(PLAN_DAY, [started(), completed("agenda", {"activity": activity}, 1)])
    assert first.commands == (run_agenda(),)
    assert second.commands == (notify(activity),)
    state = second.state
    assert state is not None
    assert state.status == "COMPLETED"
    assert state.output == {"activity": activity}
    assert [t.ref for t in state.tasks] == ["agenda", "is_free", "busy", "notify"]
    assert record(state, "is_free").output == {"case": "default"}
    assert record(state, "is_free").input == {"value": activity}
    assert not any(isinstance(c, RunTask) and c.ref == "weather" for c in second.commands)


def test_saga_times_and_records():
    decisions = run(
        PLAN_DAY,
        [
            started(),
            completed("agenda", {"activity": "free"}, 3, started_at=at(2), worker="agenda-1"),
            completed("weather", weather(False, False), 7),
        ],
    )
    state = decisions[-1].state
    assert state is not None
    assert (state.created_at, state.updated_at) == (at(0), at(7))
    agenda = record(state, "agenda")
    assert (agenda.scheduled_at, agenda.started_at, agenda.ended_at) == (at(0), at(2), at(3))
    assert agenda.worker == "agenda-1"
    assert agenda.output == {"activity": "free"}
    assert agenda.cause == "start"
    weather_record = record(state, "weather")
    # Without started_at on the fact, the task counts as started when it was scheduled.
    assert (weather_record.scheduled_at, weather_record.started_at, weather_record.ended_at) == (
        at(3),
        at(3),
        at(7),
    )
    assert weather_record.cause == "agenda#1"
    # Tasks that complete inside a decision start and end at the fact's time.
    for ref in ("is_free",):
        assert (record(state, ref).scheduled_at, record(state, ref).ended_at) == (at(3), at(3))
    for ref in ("is_wet", "run", "notify"):
        assert record(state, ref).ended_at == at(7)
        assert record(state, ref).cause == "weather#1"
    assert record(state, "notify").input == {"user": "ann", "activity": "run", "workflow_id": WF}
    assert record(state, "run").name == ""
    assert record(state, "run").type == "SET_VARIABLE"
    assert record(state, "notify").type == "EVENT"
    assert record(state, "is_wet").type == "SWITCH"
    # The saga is readable JSON and reads back to the same value.
    assert msgspec.json.decode(msgspec.json.encode(state), type=Saga) == state


# --- redelivery ---------------------------------------------------------------------------


def test_started_twice_gives_back_the_same_state_and_commands():
    first = decide(PLAN_DAY, None, started())
    again = decide(PLAN_DAY, first.state, started())
    assert again.state is first.state
    assert again.commands == first.commands == (run_agenda(),)


def test_started_on_a_later_state_gives_the_commands_of_start():
    _, second = run(PLAN_DAY, [started(), completed("agenda", {"activity": "free"}, 1)])
    assert second.state is not None
    caused = commands_caused_by(PLAN_DAY, second.state, "start")
    again = decide(PLAN_DAY, second.state, started(second=5))
    assert again.state is second.state
    # The agenda's request is answered: "start" caused nothing that is still to do.
    assert again.commands == () == caused


def test_started_on_a_later_state_reemits_an_event_of_start():
    definition = compile_(
        {
            "name": "hello",
            "tasks": [
                {
                    "ref": "hi",
                    "type": "EVENT",
                    "subject": "events.hi",
                    "input": {"id": "${workflow.id}"},
                },
                {"ref": "work", "type": "SIMPLE", "task": "w.x"},
            ],
        }
    )
    first = decide(definition, None, started(definition, data={}))
    hi = PublishEvent(msg_id=f"{WF}:hi:1", subject="events.hi", data={"id": WF})
    assert first.commands[0] == hi
    assert isinstance(first.commands[1], RunTask)
    second = decide(definition, first.state, completed("work", {}, 1))
    assert second.state is not None
    assert second.state.status == "COMPLETED"
    again = decide(definition, second.state, started(definition, data={}, second=9))
    assert again.state is second.state
    assert again.commands == (hi,)


def test_a_result_applied_twice_gives_the_same_state_object_and_commands():
    _, agenda = run(PLAN_DAY, [started(), completed("agenda", {"activity": "free"}, 1)])
    again = decide(PLAN_DAY, agenda.state, completed("agenda", {"activity": "free"}, 1))
    assert again.state is agenda.state
    assert again.commands == agenda.commands == (run_weather(),)


def test_redelivered_agenda_result_after_the_weather_changes_nothing():
    decisions = run(
        PLAN_DAY,
        [
            started(),
            completed("agenda", {"activity": "free"}, 1),
            completed("weather", weather(True, False), 2),
        ],
    )
    state = decisions[-1].state
    assert state is not None
    caused = commands_caused_by(PLAN_DAY, state, "agenda#1")
    again = decide(PLAN_DAY, state, completed("agenda", {"activity": "free"}, 1))
    assert again.state is state
    # What agenda#1 caused, derived from the state now: the weather's request is
    # answered, so it is not asked again; nothing else came from agenda#1.
    assert again.commands == caused == ()
    # The weather's own redelivery gives back exactly its event, even though finished.
    weather_again = decide(PLAN_DAY, state, completed("weather", weather(True, False), 2))
    assert weather_again.state is state
    assert weather_again.commands == decisions[-1].commands == (notify("code_for_fun"),)


def test_redelivered_agenda_result_of_a_finished_busy_day_reemits_the_event():
    _, agenda = run(PLAN_DAY, [started(), completed("agenda", {"activity": "work"}, 1)])
    again = decide(PLAN_DAY, agenda.state, completed("agenda", {"activity": "work"}, 8))
    assert again.state is agenda.state
    assert again.commands == agenda.commands == (notify("work"),)


def test_a_different_result_for_a_finished_attempt_is_ignored():
    _, agenda = run(PLAN_DAY, [started(), completed("agenda", {"activity": "work"}, 1)])
    late = decide(PLAN_DAY, agenda.state, completed("agenda", {"activity": "free"}, 4))
    assert late.state is agenda.state
    assert late.commands == agenda.commands


@pytest.mark.parametrize(
    "fact",
    [
        completed("agenda", {"activity": "free"}, 1, attempt=2),
        completed("agenda", {"activity": "free"}, 1, attempt=0),
        failed("agenda", 1, attempt=2),
        completed("nope", {}, 1),
        completed("weather", weather(False, False), 1),  # in the definition, not scheduled
        failed("nope", 1),
    ],
    ids=["stale", "attempt-0", "stale-failure", "unknown", "not-scheduled", "unknown-failure"],
)
def test_stale_attempts_and_unknown_refs_change_nothing(fact):
    state = decide(PLAN_DAY, None, started()).state
    decision = decide(PLAN_DAY, state, fact)
    assert decision.state is state
    assert decision.commands == ()


def test_results_for_a_workflow_that_does_not_exist_change_nothing():
    assert decide(PLAN_DAY, None, completed("agenda", {}, 1)) == Decision(None, ())
    assert decide(PLAN_DAY, None, failed("agenda", 1)) == Decision(None, ())


def test_decide_is_deterministic():
    facts = [started(), completed("agenda", {"activity": "free"}, 1)]
    assert run(PLAN_DAY, facts) == run(PLAN_DAY, facts)


# --- failures -----------------------------------------------------------------------------


def test_a_failed_task_fails_the_workflow():
    _, failure = run(PLAN_DAY, [started(), failed("agenda", 1, message="calendar is down")])
    state = failure.state
    assert state is not None
    assert failure.commands == ()
    assert state.status == "FAILED"
    assert state.output is None
    assert state.error is not None
    assert state.error.task == "agenda"
    assert state.error.type == "task_failed"
    assert "'agenda'" in state.error.message
    assert "calendar is down" in state.error.message
    agenda = record(state, "agenda")
    assert agenda.status == "FAILED"
    assert agenda.error == Failure(type="boom", message="calendar is down", code=500)
    assert agenda.ended_at == at(1)
    assert [t.ref for t in state.tasks] == ["agenda"]


def test_a_failed_weather_fails_the_workflow_and_nothing_follows():
    decisions = run(
        PLAN_DAY,
        [started(), completed("agenda", {"activity": "free"}, 1), failed("weather", 2)],
    )
    state = decisions[-1].state
    assert state is not None
    assert state.status == "FAILED"
    assert state.error is not None
    assert state.error.task == "weather"
    assert decisions[-1].commands == ()
    assert "notify" not in {t.ref for t in state.tasks}
    # Anything after that changes nothing and asks for nothing new.
    for fact in (
        completed("weather", weather(False, False), 3, attempt=2),
        completed("agenda", {"activity": "work"}, 3, attempt=2),
        started(second=3),
    ):
        later = decide(PLAN_DAY, state, fact)
        assert later.state is state
        assert later.commands == ()


OPTIONAL = {
    "name": "optional_step",
    "tasks": [
        {"ref": "a", "type": "SIMPLE", "task": "steps.a", "optional": True},
        {"ref": "b", "type": "SIMPLE", "task": "steps.b", "input": {"a": "${a.status}"}},
    ],
    "output": {"a": "${a.status}", "b": "${b.output.x}"},
}


def test_an_optional_task_failure_lets_the_workflow_continue():
    definition = compile_(OPTIONAL)
    _, a_failed, b_done = run(
        definition, [started(definition, data={}), failed("a", 1), completed("b", {"x": 1}, 2)]
    )
    assert a_failed.state is not None
    assert a_failed.state.status == "RUNNING"
    assert a_failed.state.error is None
    assert a_failed.commands == (
        RunTask(
            msg_id=f"{WF}:b:1",
            workflow_id=WF,
            workflow="optional_step",
            ref="b",
            task="steps.b",
            attempt=1,
            input={"a": "FAILED"},
        ),
    )
    assert record(a_failed.state, "a").status == "FAILED"
    assert b_done.state is not None
    assert b_done.state.status == "COMPLETED"
    assert b_done.state.output == {"a": "FAILED", "b": 1}


def test_a_required_task_failure_after_an_optional_one_fails_the_workflow():
    definition = compile_(OPTIONAL)
    decisions = run(definition, [started(definition, data={}), failed("a", 1), failed("b", 2)])
    state = decisions[-1].state
    assert state is not None
    assert state.status == "FAILED"
    assert state.error is not None
    assert state.error.task == "b"


# --- TERMINATE, SWITCH, expressions, EVENT -------------------------------------------------


def terminating(status, reason=""):
    stop = {
        "ref": "stop",
        "type": "TERMINATE",
        "status": status,
        "output": {"why": "${workflow.input.why}", "n": "${a.output.n}"},
    }
    if reason:
        stop["reason"] = reason
    return compile_(
        {
            "name": "stopper",
            "tasks": [
                {"ref": "a", "type": "SIMPLE", "task": "steps.a"},
                {
                    "ref": "check",
                    "type": "SWITCH",
                    "expression": "${a.output.stop}",
                    "cases": {"true": [stop]},
                },
                {"ref": "after", "type": "EVENT", "subject": "events.after"},
            ],
            "output": {"normal": True},
        }
    )


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED"])
def test_terminate_ends_the_workflow_with_its_status_and_output(status):
    definition = terminating(status)
    _, done = run(
        definition,
        [started(definition, data={"why": "enough"}), completed("a", {"stop": True, "n": 3}, 1)],
    )
    state = done.state
    assert state is not None
    assert done.commands == ()  # the EVENT after the TERMINATE never runs
    assert state.status == status
    assert state.output == {"why": "enough", "n": 3}
    assert "after" not in {t.ref for t in state.tasks}
    assert record(state, "stop").output == {"why": "enough", "n": 3}
    if status == "FAILED":
        assert state.error == Failure(
            type="terminated", message="terminated by task 'stop'", task="stop"
        )
    else:
        assert state.error is None


def test_terminate_reason_becomes_the_error_message():
    definition = terminating("FAILED", reason="no money")
    _, done = run(definition, [started(definition, data={}), completed("a", {"stop": True}, 1)])
    assert done.state is not None
    assert done.state.error is not None
    assert done.state.error.message == "no money"
    assert done.state.output == {"why": None, "n": None}


def test_no_terminate_runs_on():
    definition = terminating("FAILED")
    _, done = run(definition, [started(definition, data={}), completed("a", {"stop": False}, 1)])
    assert done.state is not None
    assert done.state.status == "COMPLETED"
    assert done.state.output == {"normal": True}
    assert done.commands == (PublishEvent(msg_id=f"{WF}:after:1", subject="events.after", data={}),)


SWITCHING = compile_(
    {
        "name": "switching",
        "input": {"x": "any?"},
        "tasks": [
            {
                "ref": "pick",
                "type": "SWITCH",
                "expression": "${workflow.input.x}",
                "cases": {
                    "true": [{"ref": "t", "type": "SET_VARIABLE", "input": {"branch": "true"}}],
                    "3": [{"ref": "three", "type": "SET_VARIABLE", "input": {"branch": "3"}}],
                    "1.5": [{"ref": "half", "type": "SET_VARIABLE", "input": {"branch": "1.5"}}],
                    "ok": [{"ref": "ok", "type": "SET_VARIABLE", "input": {"branch": "ok"}}],
                    "null": [{"ref": "none", "type": "SET_VARIABLE", "input": {"branch": "null"}}],
                    "empty": [],
                },
                "default": [
                    {"ref": "other", "type": "SET_VARIABLE", "input": {"branch": "default"}}
                ],
            },
            {"ref": "done", "type": "SET_VARIABLE", "input": {"done": True}},
        ],
        "output": {"branch": "${workflow.variables.branch}", "done": "${workflow.variables.done}"},
    }
)


@pytest.mark.parametrize(
    ("x", "branch", "case"),
    [
        (True, "true", "true"),
        ("true", "true", "true"),
        (3, "3", "3"),
        ("3", "3", "3"),
        (1.5, "1.5", "1.5"),
        ("ok", "ok", "ok"),
        (None, "null", "null"),
        ("empty", None, "empty"),
        (False, "default", "default"),
        (4, "default", "default"),
        ("OK", "default", "default"),
        ([1], "default", "default"),
    ],
)
def test_switch_matches_the_json_text_of_its_value(x, branch, case):
    decision = decide(SWITCHING, None, started(SWITCHING, data={"x": x}))
    state = decision.state
    assert state is not None
    assert decision.commands == ()
    assert state.status == "COMPLETED"
    assert state.output == {"branch": branch, "done": True}
    assert record(state, "pick").output == {"case": case}
    assert record(state, "pick").input == {"value": x}


def test_switch_on_a_missing_value_takes_the_null_case():
    decision = decide(SWITCHING, None, started(SWITCHING, data={}))
    assert decision.state is not None
    assert decision.state.output == {"branch": "null", "done": True}


NESTED = compile_(
    {
        "name": "nested",
        "input": {"a": "str", "b": "str"},
        "tasks": [
            {
                "ref": "outer",
                "type": "SWITCH",
                "expression": "${workflow.input.a}",
                "cases": {
                    "x": [
                        {
                            "ref": "inner",
                            "type": "SWITCH",
                            "expression": "${workflow.input.b}",
                            "cases": {
                                "y": [
                                    {"ref": "xy", "type": "SET_VARIABLE", "input": {"path": "x/y"}}
                                ]
                            },
                            "default": [
                                {
                                    "ref": "xd",
                                    "type": "SET_VARIABLE",
                                    "input": {"path": "x/default"},
                                }
                            ],
                        },
                        {"ref": "x_after", "type": "SET_VARIABLE", "input": {"x_after": True}},
                    ]
                },
                "default": [{"ref": "d", "type": "SET_VARIABLE", "input": {"path": "default"}}],
            },
            {
                "ref": "tell",
                "type": "EVENT",
                "subject": "events.nested.done",
                "input": {"path": "${workflow.variables.path}"},
            },
        ],
        "output": {
            "path": "${workflow.variables.path}",
            "x_after": "${workflow.variables.x_after}",
        },
    }
)


@pytest.mark.parametrize(
    ("a", "b", "path", "refs"),
    [
        ("x", "y", "x/y", ["outer", "inner", "xy", "x_after", "tell"]),
        ("x", "z", "x/default", ["outer", "inner", "xd", "x_after", "tell"]),
        ("q", "y", "default", ["outer", "d", "tell"]),
    ],
)
def test_nested_switch_continues_after_each_level(a, b, path, refs):
    decision = decide(NESTED, None, started(NESTED, data={"a": a, "b": b}))
    state = decision.state
    assert state is not None
    assert [t.ref for t in state.tasks] == refs
    assert state.status == "COMPLETED"
    assert state.output == {"path": path, "x_after": True if a == "x" else None}
    assert decision.commands == (
        PublishEvent(msg_id=f"{WF}:tell:1", subject="events.nested.done", data={"path": path}),
    )


def test_workflow_output_expressions_keep_types_and_interpolate():
    definition = compile_(
        {
            "name": "outputs",
            "tasks": [{"ref": "a", "type": "SIMPLE", "task": "steps.a"}],
            "output": {
                "user": "${workflow.input.user}",
                "n": "${a.output.n}",
                "flag": "${a.output.flag}",
                "obj": "${a.output.obj}",
                "text": "${workflow.input.user} has ${a.output.n} (${a.output.flag})",
                "nested": {"list": ["${a.output.n}", 1, "${workflow.id}"], "c": "const"},
                "id": "${workflow.id}",
                "name": "${workflow.name}",
                "missing": "${a.output.nope}",
                "item": "${a.output.items.1}",
                "status": "${a.status}",
                "attempt": "${a.attempt}",
                "escaped": "$${literal}",
            },
        }
    )
    output = {"n": 7, "flag": False, "obj": {"k": [1, 2]}, "items": ["p", "q"]}
    _, done = run(
        definition, [started(definition, data={"user": "ann"}), completed("a", output, 1)]
    )
    assert done.state is not None
    assert done.state.output == {
        "user": "ann",
        "n": 7,
        "flag": False,
        "obj": {"k": [1, 2]},
        "text": "ann has 7 (false)",
        "nested": {"list": [7, 1, WF], "c": "const"},
        "id": WF,
        "name": "outputs",
        "missing": None,
        "item": "q",
        "status": "COMPLETED",
        "attempt": 1,
        "escaped": "${literal}",
    }


def test_workflow_id_in_task_input():
    definition = compile_(
        {
            "name": "ids",
            "tasks": [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "steps.a",
                    "input": {"id": "${workflow.id}", "key": "order-${workflow.id}"},
                }
            ],
        }
    )
    decision = decide(definition, None, started(definition, data={}))
    (command,) = decision.commands
    assert isinstance(command, RunTask)
    assert command.input == {"id": WF, "key": f"order-{WF}"}
    assert command.msg_id == f"{WF}:a:1"


def test_event_input_with_nested_objects_and_lists():
    definition = compile_(
        {
            "name": "events_nested",
            "tasks": [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "steps.a",
                },
                {
                    "ref": "tell",
                    "type": "EVENT",
                    "subject": "events.order.placed",
                    "input": {
                        "order": {
                            "id": "${workflow.id}",
                            "lines": [
                                {"sku": "${a.output.sku}", "qty": "${a.output.qty}"},
                                "${a.output.extra}",
                                "sku-${a.output.sku}",
                                3,
                            ],
                        },
                        "const": {"c": [1, {"d": None}]},
                        "who": "${workflow.input.user}",
                    },
                },
            ],
        }
    )
    output = {"sku": "X1", "qty": 2, "extra": {"gift": True}}
    _, done = run(
        definition, [started(definition, data={"user": "ann"}), completed("a", output, 1)]
    )
    assert done.commands == (
        PublishEvent(
            msg_id=f"{WF}:tell:1",
            subject="events.order.placed",
            data={
                "order": {
                    "id": WF,
                    "lines": [{"sku": "X1", "qty": 2}, {"gift": True}, "sku-X1", 3],
                },
                "const": {"c": [1, {"d": None}]},
                "who": "ann",
            },
        ),
    )
    assert done.state is not None
    (event,) = done.commands
    assert isinstance(event, PublishEvent)
    assert record(done.state, "tell").input == event.data


def test_a_definition_without_simple_tasks_completes_at_start():
    definition = compile_(
        {
            "name": "instant",
            "tasks": [{"ref": "e", "type": "EVENT", "subject": "events.x", "input": {"v": 1}}],
            "output": {"v": 1},
        }
    )
    decision = decide(definition, None, started(definition, data={}))
    assert decision.state is not None
    assert decision.state.status == "COMPLETED"
    assert decision.state.output == {"v": 1}
    assert decision.commands == (
        PublishEvent(msg_id=f"{WF}:e:1", subject="events.x", data={"v": 1}),
    )
