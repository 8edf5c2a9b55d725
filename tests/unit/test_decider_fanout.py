"""Streamed dynamic FORKs in the pure decider: bounded records, items started as others
end, outputs handed to the runtime, one gather, redeliveries that change nothing."""

from __future__ import annotations

from kapellmeister.decider import (
    _bit,
    _bitmap,
    _with_bit,
    commands_caused_by,
    decide,
    fork_output_name,
    output_key,
)
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.messages import (
    PAYLOAD_MARKER,
    GatherOutputs,
    KeptOutput,
    RunTask,
    Started,
    TaskCompleted,
)

NOW = "2026-11-23T10:00:00.000Z"


def fork(**extra):
    spec = {
        "name": "wide",
        "input": {"numbers": "list"},
        "tasks": [
            {
                "ref": "each_number",
                "type": "FORK",
                "over": "${workflow.input.numbers}",
                "each": {
                    "ref": "sq",
                    "type": "SIMPLE",
                    "task": "fan.square",
                    "input": {"n": "${item}"},
                },
                **extra,
            },
            {
                "ref": "after",
                "type": "SIMPLE",
                "task": "fan.sum",
                "input": {"all": "${each_number.output}"},
            },
        ],
    }
    return compile_definition(parse_definition(spec))


def start(definition, numbers):
    fact = Started(workflow_id="w", workflow="wide", version=1, input={"numbers": numbers}, at=NOW)
    return decide(definition, None, fact)


def done(index, output=None):
    return TaskCompleted(
        workflow_id="w", ref=f"sq[{index}]", attempt=1, output=output or {"i": index}, at=NOW
    )


def test_bits():
    bitmap = _bitmap(20)
    assert bitmap == "000000" and not _bit(bitmap, 13)
    bitmap = _with_bit(_with_bit(bitmap, 13), 0)
    assert _bit(bitmap, 13) and _bit(bitmap, 0) and not _bit(bitmap, 12)
    assert _with_bit(bitmap, 13) == bitmap


def test_only_max_parallel_items_run_and_each_end_starts_the_next():
    definition = fork(max_parallel=3)
    decision = start(definition, list(range(10)))
    state = decision.state
    assert [c.ref for c in decision.commands if isinstance(c, RunTask)] == [
        "sq[0]",
        "sq[1]",
        "sq[2]",
    ]
    ended = decide(definition, state, done(1))
    assert ended.outputs == (KeptOutput(output_key("w", "each_number", 1, 1), {"i": 1}),)
    assert [c.ref for c in ended.commands if isinstance(c, RunTask)] == ["sq[3]"]
    assert ended.state is not None
    refs = {t.ref for t in ended.state.tasks}
    assert "sq[1]" not in refs and {"sq[0]", "sq[2]", "sq[3]"} <= refs
    # The same result again changes nothing and gives back the same commands.
    again = decide(definition, ended.state, done(1))
    assert again.state is ended.state and again.outputs == ()
    assert again.commands == ended.commands


def test_the_last_item_ends_the_fork_once_with_a_gather_first():
    definition = fork(max_parallel=2)
    state = start(definition, [5, 6, 7]).state
    for index in (0, 1, 2):
        decision = decide(definition, state, done(index))
        state = decision.state
    fork_record = next(t for t in state.tasks if t.ref == "each_number")
    assert fork_record.status == "COMPLETED"
    assert fork_record.output == {PAYLOAD_MARKER: fork_output_name("w", "each_number", 1)}
    kinds = [type(c) for c in decision.commands]
    assert kinds[0] is GatherOutputs and RunTask in kinds
    gather = decision.commands[0]
    assert isinstance(gather, GatherOutputs) and gather.items == 3
    after = next(c for c in decision.commands if isinstance(c, RunTask))
    assert after.ref == "after" and after.input == {"all": fork_record.output}
    # The redelivered last result gives back the gather and the next task, nothing else.
    assert decide(definition, state, done(2)).commands == decision.commands
    assert commands_caused_by(definition, state, "sq[2]#1") == decision.commands


def test_a_big_fork_is_streamed_without_max_parallel_and_a_small_one_is_not():
    big = start(fork(), list(range(1001))).state
    record = next(t for t in big.tasks if t.ref == "each_number")
    assert record.fanout is not None and record.fanout.parallel == 250
    assert len(big.tasks) == 1 + 250
    small = start(fork(), list(range(10))).state
    assert next(t for t in small.tasks if t.ref == "each_number").fanout is None
    assert len(small.tasks) == 11


def test_a_list_that_changes_while_items_run_fails_the_fork():
    import msgspec

    definition = fork(max_parallel=1)
    state = start(definition, [1, 2, 3]).state
    assert state is not None
    changed = msgspec.structs.replace(state, input={"numbers": [1, "two", 3]})
    decision = decide(definition, changed, done(0))
    assert decision.state is not None and decision.state.status == "FAILED"
    assert "its `over` list changed" in (
        decision.state.error.message if decision.state.error else ""
    )


def test_max_parallel_is_at_most_a_thousand():
    import pytest

    from kapellmeister.errors import InvalidDefinition

    with pytest.raises(InvalidDefinition, match="max_parallel"):
        fork(max_parallel=1001)


def test_an_each_with_compensate_is_refused_with_its_path():
    import pytest

    from kapellmeister.errors import InvalidDefinition

    each = {
        "ref": "sq",
        "type": "SIMPLE",
        "task": "fan.square",
        "input": {"n": "${item}"},
        "compensate": {"ref": "unsq", "type": "SIMPLE", "task": "fan.unsquare"},
    }
    spec = {
        "name": "undoable",
        "input": {"numbers": "list"},
        "tasks": [{"ref": "f", "type": "FORK", "over": "${workflow.input.numbers}", "each": each}],
    }
    with pytest.raises(InvalidDefinition, match=r"tasks\[0\]\.each\.compensate"):
        compile_definition(parse_definition(spec))
