"""The `${...}` expressions: syntax, evaluation, and the text SWITCH compares."""

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kapellmeister.expressions import (
    Constant,
    ExpressionError,
    Interpolation,
    Json,
    Reference,
    compile_value,
    parse,
    paths,
    references,
    resolve,
    switch_key,
)

CONTEXT: dict[str, Json] = {
    "workflow": {
        "id": "wf-1",
        "input": {
            "user": "ann",
            "money": 300,
            "ok": True,
            "nothing": None,
            "ratio": 1.5,
            "where": {"a": 1},
            "tags": ["x", "y"],
        },
        "variables": {"activity": "run"},
    },
    "agenda": {"input": {"user": "ann"}, "output": {"activity": "free"}},
    "report": {"output": {"items": [{"name": "rain"}, {"name": "snow"}], "rain": False}},
}


def evaluate(template, context=CONTEXT):
    return parse(template).evaluate(context)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${workflow.input.money}", 300),
        ("${workflow.input.ok}", True),
        ("${workflow.input.nothing}", None),
        ("${workflow.input.ratio}", 1.5),
        ("${workflow.input.where}", {"a": 1}),
        ("${workflow.input.tags}", ["x", "y"]),
        ("${workflow.input.user}", "ann"),
        ("${workflow.id}", "wf-1"),
        ("${workflow.variables.activity}", "run"),
        ("${agenda.output.activity}", "free"),
        ("${report.output.rain}", False),
    ],
)
def test_whole_expression_keeps_the_json_type(template, expected):
    result = evaluate(template)
    assert result == expected
    assert type(result) is type(expected)


def test_whole_expression_is_a_reference():
    assert parse("${workflow.input.x}") == Reference(("workflow", "input", "x"))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("hi ${workflow.input.user}!", "hi ann!"),
        ("${workflow.input.money} EUR", "300 EUR"),
        ("ok=${workflow.input.ok}", "ok=true"),
        ("n=${workflow.input.nothing}", "n=null"),
        ("r=${workflow.input.ratio}", "r=1.5"),
        ("w=${workflow.input.where}", 'w={"a":1}'),
        ("t=${workflow.input.tags}", 't=["x","y"]'),
        ("${workflow.input.user}${workflow.input.money}", "ann300"),
        ("${workflow.id}/${agenda.output.activity}", "wf-1/free"),
    ],
)
def test_interpolation_is_text(template, expected):
    assert evaluate(template) == expected


def test_a_string_without_expressions_is_a_constant():
    assert parse("plain text") == Constant("plain text")
    assert parse("") == Constant("")
    assert parse("a $ b { } $x }") == Constant("a $ b { } $x }")


def test_interpolation_parts():
    assert parse("a ${x.y} b") == Interpolation(("a ", Reference(("x", "y")), " b"))


@pytest.mark.parametrize(
    "template",
    [
        "${workflow.input.absent}",
        "${workflow.input.absent.deeper}",
        "${weather.output.temperature}",  # a task that did not run
        "${workflow.input.money.digits}",  # a step into a number
        "${workflow.input.user.0}",  # strings are not lists
        "${workflow.input.tags.2}",  # out of range
        "${workflow.input.tags.x}",  # a list has no keys
        "${workflow.input.tags.-1}",  # no negative indices
        "${report.output.items.0.name.more}",
    ],
)
def test_a_missing_path_is_none(template):
    assert evaluate(template) is None


def test_a_missing_path_interpolates_as_null():
    assert evaluate("t=${weather.output.t}") == "t=null"


def test_an_empty_context_resolves_to_none():
    assert evaluate("${workflow.id}", {}) is None


def test_list_indexing():
    assert evaluate("${report.output.items.0.name}") == "rain"
    assert evaluate("${report.output.items.1.name}") == "snow"
    assert evaluate("${report.output.items.1}") == {"name": "snow"}
    assert evaluate("${workflow.input.tags.0}-${workflow.input.tags.1}") == "x-y"


def test_a_digit_segment_on_an_object_is_a_key():
    assert resolve({"cases": {"0": "zero"}}, ("cases", "0")) == "zero"


def test_a_digit_segment_must_be_ascii():
    # "²".isdigit() is True but int("²") fails: such a segment names nothing.
    assert resolve({"a": [1, 2, 3]}, ("a", "²")) is None


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$${workflow.id}", "${workflow.id}"),
        ("cost: $${x} for ${workflow.id}", "cost: ${x} for wf-1"),
        ("$${", "${"),
        ("$$${workflow.id}", "$${workflow.id}"),
        ("$$", "$$"),
        ("$x", "$x"),
    ],
)
def test_escape(template, expected):
    assert evaluate(template) == expected


def test_an_escaped_expression_is_a_constant():
    assert parse("$${a.b}") == Constant("${a.b}")


@pytest.mark.parametrize(
    "template", ["${ workflow.id }", "${workflow.id }", "${\tworkflow.id\n}", "${  workflow.id}"]
)
def test_whitespace_inside_is_trimmed(template):
    assert parse(template) == Reference(("workflow", "id"))
    assert evaluate(template) == "wf-1"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("${workflow.id", "unclosed '${' at position 0"),
        ("abc ${x", "unclosed '${' at position 4"),
        ("${a} ${b", "unclosed '${' at position 5"),
        ("${}", "empty path"),
        ("x ${   }", "empty path"),
        ("${a..b}", "empty segment in path 'a..b'"),
        ("${.a}", "empty segment"),
        ("${a.}", "empty segment"),
        ("${a b}", "bad segment 'a b'"),
        ("${a.b c}", "bad segment 'b c'"),
        ("${a.${b}}", "bad segment '${b'"),
        ("${items[0]}", "items.0, not items[0]"),
        ("${a.$b}", "bad segment '$b'"),
    ],
)
def test_malformed_templates_raise(template, message):
    with pytest.raises(ExpressionError) as caught:
        parse(template)
    assert message in str(caught.value)
    assert repr(template) in str(caught.value)


def test_expression_error_is_a_value_error():
    assert issubclass(ExpressionError, ValueError)


def test_compile_value_nested():
    compiled = compile_value(
        {
            "user": "${workflow.input.user}",
            "money": "${workflow.input.money}",
            "line": "to ${workflow.input.user}",
            "fixed": 7,
            "flag": False,
            "none": None,
            "list": ["${workflow.input.ok}", 1, {"deep": "${report.output.items.0.name}"}],
            "plain": {"a": ["b", 2]},
            "${workflow.id}": "keys are not templates",
        }
    )
    assert compiled.evaluate(CONTEXT) == {
        "user": "ann",
        "money": 300,
        "line": "to ann",
        "fixed": 7,
        "flag": False,
        "none": None,
        "list": [True, 1, {"deep": "rain"}],
        "plain": {"a": ["b", 2]},
        "${workflow.id}": "keys are not templates",
    }


def test_compile_value_without_expressions_returns_the_value_itself():
    value: Json = {"a": [1, "two", {"three": None}], "b": True}
    compiled = compile_value(value)
    assert isinstance(compiled, Constant)
    assert compiled.evaluate(CONTEXT) is value


def test_compile_value_shares_constant_subtrees():
    plain: Json = {"a": [1, 2]}
    compiled = compile_value({"x": "${workflow.id}", "plain": plain})
    result = compiled.evaluate(CONTEXT)
    assert isinstance(result, dict)
    assert result["plain"] is plain


def test_compile_value_unescapes_inside_trees():
    compiled = compile_value({"a": ["$${x}", 1]})
    assert isinstance(compiled, Constant)
    assert compiled.evaluate({}) == {"a": ["${x}", 1]}


def test_compile_value_raises_on_a_malformed_string_deep_inside():
    with pytest.raises(ExpressionError) as caught:
        compile_value({"a": [{"b": "${oops"}]})
    assert "unclosed" in str(caught.value)


def test_compile_value_evaluates_to_fresh_containers():
    compiled = compile_value({"a": ["${workflow.id}"]})
    first = compiled.evaluate(CONTEXT)
    second = compiled.evaluate(CONTEXT)
    assert first == second == {"a": ["wf-1"]}
    assert first is not second


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ok", "ok"),
        ("", ""),
        ("true", "true"),
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (-7, "-7"),
        (None, "null"),
        (1.5, "1.5"),
        ([1, "a"], '[1,"a"]'),
        ({"a": 1}, '{"a":1}'),
    ],
)
def test_switch_key(value, expected):
    assert switch_key(value) == expected


def test_references_and_paths():
    compiled = compile_value(
        {
            "a": "${workflow.input.x}",
            "b": ["${agenda.output.activity} and ${workflow.id}", "${ workflow.input.x }"],
            "c": "no refs",
            "d": "$${escaped.ref}",
        }
    )
    assert references(compiled) == {"workflow", "agenda"}
    assert paths(compiled) == (
        ("workflow", "input", "x"),
        ("agenda", "output", "activity"),
        ("workflow", "id"),
    )


def test_references_of_one_template():
    assert references(parse("${report.output.rain}")) == {"report"}
    assert references(parse("plain")) == frozenset()
    assert Reference(("report", "output", "rain")).text == "${report.output.rain}"


class _Task(msgspec.Struct):
    input: dict[str, Json] = {}


def test_structs_can_type_fields_with_json():
    # msgspec cannot decode through the recursive alias; at run time Json is Any.
    task = msgspec.json.decode(b'{"input": {"a": [1, {"b": null}], "c": "${x.y}"}}', type=_Task)
    assert compile_value(task.input).evaluate({"x": {"y": 2}}) == {"a": [1, {"b": None}], "c": 2}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)


@given(st.text().filter(lambda text: "${" not in text))
def test_text_without_expressions_evaluates_to_itself(text):
    assert parse(text).evaluate(CONTEXT) == text
    assert compile_value(text).evaluate(CONTEXT) == text


@given(json_values)
def test_whole_expression_gives_back_any_value(value):
    context: dict[str, Json] = {"workflow": {"input": {"x": value}}}
    assert parse("${workflow.input.x}").evaluate(context) == value


@given(json_values)
def test_interpolation_of_any_value(value):
    context: dict[str, Json] = {"workflow": {"input": {"x": value}}}
    result = parse("a ${workflow.input.x} b").evaluate(context)
    assert isinstance(result, str)
    assert result.startswith("a ")
    assert result.endswith(" b")
    middle = result[2:-2]
    if isinstance(value, str):
        assert middle == value
    else:
        assert middle == switch_key(value)
        assert json.loads(middle) == value


@given(json_values.filter(lambda value: "${" not in json.dumps(value)))
def test_compile_value_without_expressions_is_identity(value):
    assert compile_value(value).evaluate({}) is value
