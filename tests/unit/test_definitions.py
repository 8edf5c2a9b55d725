"""The definitions language: YAML and JSON, Conductor's aliases, errors with paths, inputs."""

import json
from pathlib import Path

import msgspec
import pytest
import yaml

import services.conductor
from kapellmeister.definitions import (
    Definition,
    EventTask,
    RetryPolicy,
    SetVariableTask,
    SimpleTask,
    SwitchTask,
    TerminateTask,
    WaitTask,
    WorkflowDef,
    compile_definition,
    load_definition,
    load_definitions,
    parse_definition,
)
from kapellmeister.errors import BadRequest, InvalidDefinition

DEFINITIONS = Path(services.conductor.__file__).parent / "definitions"
PLAN_DAY_FILE = DEFINITIONS / "plan_day.yaml"

# Copied from DESIGN.md, "A definition, as JSON".
RAIN_CHECK_JSON = """
{"name": "rain_check", "version": 1,
 "input": {"date": "str"},
 "tasks": [
   {"ref": "report", "type": "SIMPLE", "task": "weather.report",
    "input": {"date": "${workflow.input.date}"},
    "retry": {"count": 2, "logic": "EXPONENTIAL", "delay_s": 1}, "timeout_s": 30},
   {"ref": "wet", "type": "SWITCH", "expression": "${report.output.rain}",
    "cases": {"true": [{"ref": "stay_in", "type": "TERMINATE", "status": "COMPLETED",
                        "output": {"advice": "umbrella"}}]},
    "default": [{"ref": "tell", "type": "EVENT", "subject": "events.weather.dry",
                 "input": {"t": "${report.output.temperature}"}}]}],
 "output": {"temperature": "${report.output.temperature}"}}
"""

# The same tree as YAML, written by hand (a quoted "true" key; unquoted is tested below).
RAIN_CHECK_YAML = """
name: rain_check
version: 1
input:
  date: str
tasks:
  - ref: report
    type: SIMPLE
    task: weather.report
    input:
      date: ${workflow.input.date}
    retry: {count: 2, logic: EXPONENTIAL, delay_s: 1}
    timeout_s: 30
  - ref: wet
    type: SWITCH
    expression: ${report.output.rain}
    cases:
      "true":
        - ref: stay_in
          type: TERMINATE
          status: COMPLETED
          output:
            advice: umbrella
    default:
      - ref: tell
        type: EVENT
        subject: events.weather.dry
        input:
          t: ${report.output.temperature}
output:
  temperature: ${report.output.temperature}
"""


def simple(ref="a", **extra):
    return {"ref": ref, "type": "SIMPLE", "task": "steps.a", **extra}


def workflow(*tasks, **extra):
    return {"name": "w", "tasks": list(tasks), **extra}


def parse_error(data) -> str:
    with pytest.raises(InvalidDefinition) as info:
        compile_definition(parse_definition(data))
    return info.value.message


# --- YAML and JSON -----------------------------------------------------------------------


def test_rain_check_from_design_parses_and_compiles():
    spec = parse_definition(RAIN_CHECK_JSON)
    definition = compile_definition(spec)
    assert (definition.name, definition.version, definition.first) == ("rain_check", 1, "report")
    assert set(definition.nodes) == {"report", "wet", "stay_in", "tell"}
    report = definition.nodes["report"].task
    assert isinstance(report, SimpleTask)
    assert report.task == "weather.report"
    assert report.retry == RetryPolicy(count=2, logic="EXPONENTIAL", delay_s=1.0)
    assert report.timeout_s == 30
    wet = definition.nodes["wet"].task
    assert isinstance(wet, SwitchTask)
    assert set(wet.cases) == {"true"}
    assert isinstance(wet.cases["true"][0], TerminateTask)
    assert wet.default is not None
    assert isinstance(wet.default[0], EventTask)
    assert wet.default[0].subject == "events.weather.dry"
    assert definition.nodes["wet"].path == "tasks[1]"
    assert definition.nodes["stay_in"].path == "tasks[1].cases.true[0]"
    assert definition.nodes["tell"].path == "tasks[1].default[0]"
    assert {ref: n.successor for ref, n in definition.nodes.items()} == {
        "report": "wet",
        "wet": None,
        "stay_in": None,
        "tell": None,
    }


def test_yaml_and_json_forms_parse_to_the_same_thing():
    assert parse_definition(RAIN_CHECK_YAML) == parse_definition(RAIN_CHECK_JSON)


def test_plan_day_as_json_is_the_same_as_as_yaml():
    text = PLAN_DAY_FILE.read_text()
    as_json = json.dumps(yaml.safe_load(text))
    assert parse_definition(as_json) == parse_definition(text)
    assert parse_definition(as_json.encode()) == parse_definition(text.encode())
    assert parse_definition(json.loads(as_json)) == parse_definition(text)


def test_unquoted_yaml_case_keys_are_their_json_text():
    text = RAIN_CHECK_YAML.replace('"true":', "true:")
    assert parse_definition(text) == parse_definition(RAIN_CHECK_JSON)
    numbers = parse_definition(
        """
name: w
tasks:
  - ref: s
    type: SWITCH
    expression: ${workflow.input.x}
    cases:
      3: []
"""
    )
    switch = numbers.tasks[0]
    assert isinstance(switch, SwitchTask)
    assert set(switch.cases) == {"3"}


def test_not_yaml_at_all():
    with pytest.raises(InvalidDefinition) as info:
        parse_definition("name: [unclosed")
    assert "not YAML or JSON" in info.value.message


def test_a_heartbeat_longer_than_the_task_timeout_is_refused():
    with pytest.raises(InvalidDefinition) as info:
        parse_definition(
            "name: t\ntasks:\n  - {ref: a, type: SIMPLE, task: x.y,"
            " timeout_s: 5, response_timeout_s: 10}\n"
        )
    assert "response_timeout_s (10.0) is longer than timeout_s (5.0)" in info.value.message
    assert "$.tasks[0]" in info.value.message


def test_a_list_is_not_a_definition():
    with pytest.raises(InvalidDefinition) as info:
        parse_definition("[1, 2]")
    assert "Expected `object`" in info.value.message


def test_load_definitions_reads_the_shipped_directory():
    definitions = load_definitions(DEFINITIONS)
    assert [d.name for d in definitions] == ["approval", "drinks", "plan_day"]
    assert all(isinstance(d, Definition) for d in definitions)
    assert repr(definitions[2]) == "Definition('plan_day', version=1)"


def test_load_definition_names_the_file_in_errors(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\ntasks:\n  - ref: a\n    type: SIMPLE\n")
    with pytest.raises(InvalidDefinition) as info:
        load_definition(bad)
    assert info.value.message.startswith("broken.yaml: ")
    assert "`task`" in info.value.message
    assert "$.tasks[0]" in info.value.message


# --- Conductor's aliases ------------------------------------------------------------------

CONDUCTOR_STYLE = {
    "name": "plan_day_conductor",
    "version": 2,
    "schemaVersion": 2,
    "tasks": [
        {
            "name": "agenda.activity",
            "taskReferenceName": "agenda",
            "type": "SIMPLE",
            "inputParameters": {"datetime": "${workflow.input.datetime}"},
            "timeoutSeconds": 10,
            "responseTimeoutSeconds": 5,
            "timeoutPolicy": "RETRY",
        },
        {
            "taskReferenceName": "is_free",
            "type": "DECISION",
            "caseValueParam": "activity",
            "inputParameters": {"activity": "${agenda.output.activity}"},
            "decisionCases": {
                "free": [
                    {
                        "name": "weather.report",
                        "taskReferenceName": "weather",
                        "type": "SIMPLE",
                        "inputParameters": {"date": "${workflow.input.datetime}"},
                    }
                ]
            },
            "defaultCase": [
                {
                    "taskReferenceName": "stop",
                    "type": "TERMINATE",
                    "outputParameters": {"activity": "${agenda.output.activity}"},
                }
            ],
        },
    ],
    "outputParameters": {"weather": "${weather.output}"},
}

OURS = {
    "name": "plan_day_conductor",
    "version": 2,
    "tasks": [
        {
            "ref": "agenda",
            "type": "SIMPLE",
            "task": "agenda.activity",
            "input": {"datetime": "${workflow.input.datetime}"},
            "timeout_s": 10,
            "response_timeout_s": 5,
            "timeout_policy": "RETRY",
        },
        {
            "ref": "is_free",
            "type": "SWITCH",
            "expression": "${agenda.output.activity}",
            "cases": {
                "free": [
                    {
                        "ref": "weather",
                        "type": "SIMPLE",
                        "task": "weather.report",
                        "input": {"date": "${workflow.input.datetime}"},
                    }
                ]
            },
            "default": [
                {
                    "ref": "stop",
                    "type": "TERMINATE",
                    "output": {"activity": "${agenda.output.activity}"},
                }
            ],
        },
    ],
    "output": {"weather": "${weather.output}"},
}


def test_conductor_aliases_mean_our_fields():
    spec = parse_definition(CONDUCTOR_STYLE)
    assert spec == parse_definition(OURS)
    compile_definition(spec)
    agenda = spec.tasks[0]
    assert isinstance(agenda, SimpleTask)
    assert (agenda.ref, agenda.task) == ("agenda", "agenda.activity")
    assert (agenda.timeout_s, agenda.response_timeout_s, agenda.timeout_policy) == (10, 5, "RETRY")
    decision = spec.tasks[1]
    assert isinstance(decision, SwitchTask)
    assert decision.expression == "${agenda.output.activity}"
    assert decision.default is not None
    assert isinstance(decision.default[0], TerminateTask)
    assert decision.default[0].output == {"activity": "${agenda.output.activity}"}


def test_name_is_the_workflow_name_at_the_top_and_ours_without_task_reference_name():
    spec = parse_definition(workflow(simple()))
    assert spec.name == "w"
    # Without taskReferenceName, a task's `name` is not ours: an unknown field.
    with pytest.raises(InvalidDefinition) as info:
        parse_definition(workflow({**simple(), "name": "x"}))
    assert "`name`" in info.value.message
    assert "$.tasks[0]" in info.value.message


def test_task_reference_name_without_name_keeps_task():
    spec = parse_definition(workflow({"taskReferenceName": "a", "type": "SIMPLE", "task": "t.x"}))
    task = spec.tasks[0]
    assert isinstance(task, SimpleTask)
    assert (task.ref, task.task) == ("a", "t.x")


def test_conductor_decision_with_a_name_parses():
    agenda, decision = json.loads(json.dumps(CONDUCTOR_STYLE["tasks"]))
    named = {**CONDUCTOR_STYLE, "tasks": [agenda, {**decision, "name": "is_free"}]}
    assert parse_definition(named) == parse_definition(OURS)


def test_set_variable_task():
    spec = parse_definition(workflow({"ref": "v", "type": "SET_VARIABLE", "input": {"k": 1}}))
    assert spec.tasks[0] == SetVariableTask(ref="v", input={"k": 1})


def test_defaults():
    spec = parse_definition(workflow(simple()))
    assert spec == WorkflowDef(name="w", tasks=[SimpleTask(ref="a", task="steps.a")])
    assert spec.version == 1
    task = spec.tasks[0]
    assert isinstance(task, SimpleTask)
    assert task.retry == RetryPolicy(count=0, logic="FIXED", delay_s=1.0)
    assert (task.optional, task.timeout_policy, task.input) == (False, "TIME_OUT_WF", {})


# --- errors carry their path --------------------------------------------------------------


def test_typo_names_the_field_and_the_task():
    message = parse_error(
        workflow(simple(), {"ref": "s", "type": "SWITCH", "expresion": "${a.output.x}"})
    )
    assert "`expresion`" in message
    assert "$.tasks[1]" in message


def test_typo_in_a_branch_names_the_field_and_the_place():
    message = parse_error(
        workflow(
            {
                "ref": "s",
                "type": "SWITCH",
                "expression": "x",
                "cases": {"k": [simple("t", inptu={})]},
            }
        )
    )
    assert "`inptu`" in message
    assert "$.tasks[0].cases" in message


def test_typo_at_the_top_level():
    message = parse_error({**workflow(simple()), "ouptut": {}})
    assert "`ouptut`" in message


def test_unknown_type():
    message = parse_error(workflow({"ref": "a", "type": "SIMPEL", "task": "x"}))
    assert "'SIMPEL'" in message
    assert "$.tasks[0].type" in message


def test_missing_task_on_simple():
    message = parse_error(workflow(simple(), {"ref": "b", "type": "SIMPLE"}))
    assert "missing required field `task`" in message
    assert "$.tasks[1]" in message


def test_no_tasks():
    message = parse_error({"name": "w", "tasks": []})
    assert "$.tasks" in message


def test_duplicate_ref():
    message = parse_error(
        workflow(
            simple("a"),
            {"ref": "s", "type": "SWITCH", "expression": "x", "default": [simple("a")]},
        )
    )
    assert "duplicate ref 'a'" in message
    assert "tasks[1].default[0].ref" in message


@pytest.mark.parametrize("ref", ["workflow", "event"])
def test_reserved_ref(ref):
    message = parse_error(workflow(simple(ref)))
    assert f"ref {ref!r} is reserved" in message
    assert "tasks[0].ref" in message


@pytest.mark.parametrize("ref", ["1a", "a-b", "a.b", "", "x" * 65])
def test_bad_ref(ref):
    message = parse_error(workflow(simple(ref)))
    assert "$.tasks[0].ref" in message


def test_expression_naming_an_unknown_ref():
    message = parse_error(workflow(simple("a"), simple("b", input={"x": "${nope.output.x}"})))
    assert "unknown task ref 'nope'" in message
    assert "tasks[1].input" in message


def test_output_naming_an_unknown_ref():
    message = parse_error(workflow(simple(), output={"x": "${agenda.output.activity}"}))
    assert "unknown task ref 'agenda'" in message
    assert "output" in message


def test_switch_expression_naming_an_unknown_ref():
    message = parse_error(workflow({"ref": "s", "type": "SWITCH", "expression": "${b.output}"}))
    assert "unknown task ref 'b'" in message
    assert "tasks[0].expression" in message


@pytest.mark.parametrize(
    "template", ["${workflow.input.x", "${}", "${a..b}", "${a.items[0]}", "x ${ a b }"]
)
def test_malformed_expression(template):
    message = parse_error(workflow(simple(input={"x": {"deep": [template]}})))
    assert "tasks[0]" in message


def test_malformed_expression_in_the_output():
    message = parse_error(workflow(simple(), output={"x": "${workflow.input"}))
    assert "unclosed '${'" in message
    assert "`output`" in message


def test_unknown_input_type_name():
    message = parse_error(workflow(simple(), input={"user": "string"}))
    assert "unknown type 'string'" in message
    assert "$.input.user" in message


@pytest.mark.parametrize("subject", ["foo.bar", "events", "events.", "events.a b", "events.>"])
def test_bad_subject_for_event(subject):
    message = parse_error(workflow({"ref": "e", "type": "EVENT", "subject": subject}))
    assert "$.tasks[0].subject" in message


@pytest.mark.parametrize("name", ["plan.day", "plan day", "", "x" * 65])
def test_bad_workflow_name(name):
    message = parse_error({**workflow(simple()), "name": name})
    assert "$.name" in message


def test_bad_retry_logic():
    message = parse_error(workflow(simple(retry={"count": 1, "logic": "RANDOM"})))
    assert "$.tasks[0].retry.logic" in message


def test_bad_terminate_status():
    message = parse_error(workflow({"ref": "t", "type": "TERMINATE", "status": "RUNNING"}))
    assert "$.tasks[0].status" in message


def test_invalid_definition_is_a_bad_request():
    with pytest.raises(BadRequest) as info:
        parse_definition(workflow())
    assert info.value.status == 400
    assert info.value.code == "invalid_definition"


# --- input validation ---------------------------------------------------------------------

PLAN_DAY = load_definition(PLAN_DAY_FILE)


@pytest.mark.parametrize(
    "data",
    [
        {"user": "ann", "datetime": "2019-04-06T12:00:00"},
        {"user": "", "datetime": "2019-04-06T12:00:00Z"},
        {"user": "ann", "datetime": "2019-04-06T12:00:00.250+02:00"},
    ],
)
def test_plan_day_good_input(data):
    PLAN_DAY.validate_input(data)  # raises on bad input; see below


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"user": "ann", "datetime": "2019-13-06T12:00:00"}, "datetime"),
        ({"user": "ann", "datetime": "2019-04-06T25:00:00"}, "datetime"),
        ({"user": "ann", "datetime": "2019-04-06"}, "datetime"),
        ({"user": "ann", "datetime": "tomorrow"}, "datetime"),
        ({"user": "ann", "datetime": 20190406}, "datetime"),
        ({"user": "ann"}, "datetime"),
        ({"datetime": "2019-04-06T12:00:00"}, "user"),
        ({"user": "ann", "datetime": "2019-04-06T12:00:00", "mood": "ok"}, "mood"),
        ({"user": 3, "datetime": "2019-04-06T12:00:00"}, "user"),
        ({"user": None, "datetime": "2019-04-06T12:00:00"}, "user"),
    ],
)
def test_plan_day_bad_input_names_the_field(data, field):
    with pytest.raises(BadRequest) as info:
        PLAN_DAY.validate_input(data)
    assert f"`{field}`" in info.value.message or f"`$.{field}`" in info.value.message
    assert "plan_day" in info.value.message
    assert info.value.status == 400


@pytest.mark.parametrize("data", [None, [], "x", 3])
def test_input_must_be_an_object(data):
    with pytest.raises(BadRequest) as info:
        PLAN_DAY.validate_input(data)
    assert "JSON object" in info.value.message


@pytest.mark.parametrize(
    ("type_name", "good", "bad"),
    [
        ("str", "x", 1),
        ("int", 3, "3"),
        ("float", 1.5, "1.5"),
        ("bool", True, "true"),
        ("date", "2019-04-06", "2019-04-06T12:00:00"),
        ("list", [1, "a"], {"a": 1}),
        ("object", {"a": [1]}, [1]),
        ("int?", None, "3"),
    ],
)
def test_input_types(type_name, good, bad):
    definition = compile_definition(parse_definition(workflow(simple(), input={"v": type_name})))
    definition.validate_input({"v": good})
    with pytest.raises(BadRequest) as info:
        definition.validate_input({"v": bad})
    assert "$.v" in info.value.message


def test_optional_input_may_be_left_out_and_any_takes_anything():
    definition = compile_definition(
        parse_definition(workflow(simple(), input={"v": "int?", "w": "any"}))
    )
    definition.validate_input({"w": {"x": [None]}})
    with pytest.raises(BadRequest) as info:
        definition.validate_input({"v": 1})
    assert "`w`" in info.value.message


# --- compiled structure ---------------------------------------------------------------------


def test_plan_day_successors():
    assert {ref: node.successor for ref, node in PLAN_DAY.nodes.items()} == {
        "agenda": "is_free",
        "is_free": "notify",
        "weather": "is_wet",
        "is_wet": "notify",
        "run": "notify",
        "code_for_fun": "notify",
        "busy": "notify",
        "notify": None,
    }
    assert PLAN_DAY.first == "agenda"


def test_plan_day_structure():
    nodes = PLAN_DAY.nodes
    assert PLAN_DAY.name == "plan_day"
    assert PLAN_DAY.version == 1
    assert PLAN_DAY.spec.input == {"user": "str", "datetime": "datetime"}
    kinds = {ref: type(node.task).__name__ for ref, node in nodes.items()}
    assert kinds == {
        "agenda": "SimpleTask",
        "is_free": "SwitchTask",
        "weather": "SimpleTask",
        "is_wet": "SwitchTask",
        "run": "SetVariableTask",
        "code_for_fun": "SetVariableTask",
        "busy": "SetVariableTask",
        "notify": "EventTask",
    }
    agenda, weather, notify = (nodes[r].task for r in ("agenda", "weather", "notify"))
    assert isinstance(agenda, SimpleTask)
    assert isinstance(weather, SimpleTask)
    assert isinstance(notify, EventTask)
    assert (agenda.task, weather.task) == ("agenda.activity", "weather.report")
    assert notify.subject == "events.activity.chosen"
    assert set(notify.input) == {"user", "activity", "workflow_id"}
    assert nodes["weather"].path == "tasks[1].cases.free[0]"
    assert nodes["busy"].path == "tasks[1].default[0]"


def test_successors_in_nested_branches():
    definition = compile_definition(
        parse_definition(
            workflow(
                {
                    "ref": "outer",
                    "type": "SWITCH",
                    "expression": "x",
                    "cases": {
                        "k": [
                            {
                                "ref": "inner",
                                "type": "SWITCH",
                                "expression": "y",
                                "default": [simple("deep1"), simple("deep2")],
                            }
                        ]
                    },
                },
                simple("last"),
            )
        )
    )
    successors = {ref: node.successor for ref, node in definition.nodes.items()}
    assert successors == {
        "outer": "last",
        "inner": "last",
        "deep1": "deep2",
        "deep2": "last",
        "last": None,
    }


def test_a_compiled_definition_is_json_friendly():
    spec = parse_definition(RAIN_CHECK_JSON)
    again = parse_definition(msgspec.json.encode(spec))
    assert again == spec


def test_more_conductor_names_are_understood():
    spec = parse_definition(
        {
            "name": "c",
            "tasks": [
                {"name": "ask", "taskReferenceName": "ask", "type": "HUMAN"},
                {
                    "name": "tell",
                    "taskReferenceName": "tell",
                    "type": "EVENT",
                    "sink": "nats:events.asked",
                    "inputParameters": {"x": 1},
                },
                {
                    "name": "stop",
                    "taskReferenceName": "stop",
                    "type": "TERMINATE",
                    "terminationStatus": "FAILED",
                    "workflowOutput": {"y": 2},
                    "terminationReason": "no",
                },
            ],
        }
    )
    ask, tell, stop = spec.tasks
    assert isinstance(ask, WaitTask)
    assert isinstance(tell, EventTask) and tell.subject == "events.asked"
    assert isinstance(stop, TerminateTask)
    assert (stop.status, stop.output, stop.reason) == ("FAILED", {"y": 2}, "no")
