"""Properties of GRAPH scheduling over random DAGs (hypothesis), against a reference."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kapellmeister.decider import decide
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.messages import RerunRequested, RunTask, Saga, Started, TaskCompleted

T0 = "2026-11-23T10:00:00.000Z"


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, Any]:
    """Members m0..mN; m<i> produces a<i> and requires artefacts of lower-numbered
    members (so it is acyclic), some optionally; some have a false `when`, some are
    switched off; the members are written in a shuffled order."""
    count = draw(st.integers(2, 8))
    members = []
    for i in range(count):
        upstream = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        requires = [
            f"a{j}" + ("?" if draw(st.booleans()) and draw(st.booleans()) else "") for j in upstream
        ]
        member: dict[str, Any] = {
            "ref": f"m{i}",
            "type": "SIMPLE",
            "task": f"t.m{i}",
            "requires": requires,
            "produces": [f"a{i}"],
        }
        if draw(st.integers(0, 4)) == 0:
            member["when"] = {"any": []}  # never holds
        members.append(member)
    order = draw(st.permutations(members))
    off = draw(st.lists(st.sampled_from([m["ref"] for m in members]), unique=True, max_size=2))
    return {"members": list(order), "off": off}


def reference_skipped(members: list[dict[str, Any]], off: list[str]) -> set[str]:
    by_ref = {m["ref"]: m for m in members}
    skipped: set[str] = set()
    for i in range(len(members)):  # m<i> depends on lower numbers only
        m = by_ref[f"m{i}"]
        hard = [r for r in m["requires"] if not r.endswith("?")]
        if m["ref"] in off or "when" in m or any(f"m{r[1:]}" in skipped for r in hard):
            skipped.add(m["ref"])
    return skipped


def downstream(members: list[dict[str, Any]], ref: str) -> set[str]:
    found = {ref}
    changed = True
    while changed:
        changed = False
        for m in members:
            if m["ref"] not in found and any(
                f"m{r.rstrip('?')[1:]}" in found for r in m["requires"]
            ):
                found.add(m["ref"])
                changed = True
    return found


def run(
    d: Any, state: Saga, order: list[str], data: st.DataObject, ran: list[str], produced: set[str]
) -> Saga:
    """Complete dispatched tasks in a random order, checking each decision."""
    pending = [t.ref for t in state.tasks if t.status == "SCHEDULED"]
    while pending:
        ref = data.draw(st.sampled_from(sorted(pending)))
        record = next(t for t in state.tasks if t.ref == ref)
        fact = TaskCompleted(
            workflow_id="w1", ref=ref, attempt=record.attempt, output={f"a{ref[1:]}": ref}, at=T0
        )
        decision = decide(d, state, fact)
        assert decision.state is not None
        produced.add(f"a{ref[1:]}")
        again = decide(d, decision.state, fact)  # a redelivery changes nothing
        assert again.state is decision.state and again.commands == decision.commands
        state = decision.state
        for command in decision.commands:
            if isinstance(command, RunTask):
                ran.append(command.ref)
                node = d.nodes[command.ref]
                hard = [r for r in node.task.requires if not r.endswith("?")]
                assert set(hard) <= produced, (command.ref, hard, produced)  # inputs exist
        pending = [t.ref for t in state.tasks if t.status == "SCHEDULED"]
    return state


@settings(max_examples=150, deadline=None)
@given(graph=graphs(), data=st.data())
def test_random_graphs_run_each_task_once_after_its_inputs_and_skip_the_right_ones(graph, data):
    members, off = graph["members"], graph["off"]
    d = compile_definition(
        parse_definition({"name": "g", "tasks": [{"ref": "g", "type": "GRAPH", "tasks": members}]})
    )
    started = decide(
        d,
        None,
        Started(workflow_id="w1", workflow="g", version=1, input={}, at=T0, switched_off=off),
    )
    assert started.state is not None
    ran = [c.ref for c in started.commands if isinstance(c, RunTask)]
    # Everything whose inputs are settled runs at once, in the first decision (parallel):
    # what needs nothing, or only optional artefacts whose producers are skipped. (A
    # `when` or a tenant switch is looked at once a member's inputs are settled.)
    skipped = reference_skipped(members, off)
    by_ref = {m["ref"]: m for m in members}
    gone: set[str] = set()
    ready: set[str] = set()
    for i in range(len(members)):
        m = by_ref[f"m{i}"]
        producers = [f"m{r.rstrip('?')[1:]}" for r in m["requires"]]
        hard = [f"m{r[1:]}" for r in m["requires"] if not r.endswith("?")]
        if any(p in gone for p in hard):
            gone.add(m["ref"])
        elif all(p in gone for p in producers):
            (gone if m["ref"] in off or "when" in m else ready).add(m["ref"])
    assert set(ran) == ready
    state = run(d, started.state, [], data, ran, set())
    statuses = {t.ref: t.status for t in state.tasks}
    assert state.status == "COMPLETED"
    assert {r for r, s in statuses.items() if s == "SKIPPED"} == skipped
    assert sorted(ran) == sorted({m["ref"] for m in members} - skipped)  # each once
    if not ran:
        return  # everything was skipped: nothing to rerun from
    # A rerun from any member that ran re-runs exactly its non-skipped downstream.
    target = data.draw(st.sampled_from(sorted(set(ran))))
    rerun = decide(d, state, RerunRequested(workflow_id="w1", task=target, at=T0))
    assert rerun.state is not None
    again = [c.ref for c in rerun.commands if isinstance(c, RunTask)]
    state = run(
        d,
        rerun.state,
        [],
        data,
        again,
        {f"a{r[1:]}" for r in set(ran) - downstream(members, target)},
    )
    assert sorted(again) == sorted(downstream(members, target) - skipped)
    assert state.status == "COMPLETED"
