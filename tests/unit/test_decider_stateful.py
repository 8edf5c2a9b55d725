"""The decider under Hypothesis: random fact streams keep the saga's invariants, and replay.

A `RuleBasedStateMachine` plays the conductor runtime's part: it delivers results for
scheduled tasks (outputs within each agent's types), failures, duplicates of any earlier
fact, stale attempts and refs no definition has, and after each step checks what must
always hold. Each run's fact history is then replayed from scratch, through the saga's
JSON as the KV store keeps it, and must give the same decisions (Temporal's `Replayer`).
"""

import datetime
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import services.conductor
from kapellmeister.decider import Decision, decide, fact_id, task_msg_id
from kapellmeister.definitions import compile_definition, load_definition, parse_definition
from kapellmeister.messages import (
    TERMINAL,
    Command,
    Fact,
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
CHAIN = compile_definition(
    parse_definition(
        {
            "name": "chain",
            "input": {"seed": "int"},
            "tasks": [
                {
                    "ref": "a",
                    "type": "SIMPLE",
                    "task": "steps.a",
                    "input": {"n": "${workflow.input.seed}"},
                },
                {
                    "ref": "b",
                    "type": "SIMPLE",
                    "task": "steps.b",
                    "input": {"n": "${a.output.n}"},
                    "optional": True,
                },
                {
                    "ref": "c",
                    "type": "SIMPLE",
                    "task": "steps.c",
                    "input": {"n": "${b.output.n}", "a": "${a.output.n}"},
                },
                {"ref": "d", "type": "SIMPLE", "task": "steps.d", "input": {"n": "${c.output.n}"}},
                {
                    "ref": "done",
                    "type": "EVENT",
                    "subject": "events.chain.done",
                    "input": {"d": "${d.output.n}", "id": "${workflow.id}"},
                },
            ],
            "output": {
                "a": "${a.output.n}",
                "b": "${b.output.n}",
                "c": "${c.output.n}",
                "d": "${d.output.n}",
            },
        }
    )
)
WF = "wf-prop"
EPOCH = datetime.datetime(2026, 11, 23, 10, tzinfo=datetime.UTC)
ACTIVITIES = ["sleep", "kids", "work", "free"]
SIMPLE_OUTPUTS = {
    "agenda.activity": st.fixed_dictionaries({"activity": st.sampled_from(ACTIVITIES)}),
    "weather.report": st.fixed_dictionaries(
        {"rain": st.booleans(), "temperature": st.integers(-30, 45), "snow": st.booleans()}
    ),
    **{f"steps.{x}": st.fixed_dictionaries({"n": st.integers(-(2**53), 2**53)}) for x in "abcd"},
}
FAILURES = st.builds(
    Failure,
    type=st.sampled_from(["boom", "bad_request", "timeout"]),
    message=st.text(max_size=20),
    code=st.sampled_from([400, 422, 500]),
    retryable=st.booleans(),
)


def at(tick: int) -> str:
    moment = EPOCH + datetime.timedelta(milliseconds=tick * 1500)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def start_input(definition):
    if definition is PLAN_DAY:
        return st.fixed_dictionaries(
            {"user": st.sampled_from(["ann", "bob"]), "datetime": st.just("2019-04-06T12:00:00")}
        )
    return st.fixed_dictionaries({"seed": st.integers(0, 100)})


def expected_output(definition, state):
    """What a COMPLETED saga's output must be, computed from its records independently."""
    outputs = {t.ref: t.output for t in state.tasks}
    if definition is PLAN_DAY:
        activity = outputs["agenda"]["activity"]
        if activity == "free":
            report = outputs["weather"]
            activity = "code_for_fun" if report["rain"] or report["snow"] else "run"
        return {"activity": activity}
    return {ref: (outputs.get(ref) or {}).get("n") for ref in "abcd"}


class DeciderMachine(RuleBasedStateMachine):
    """The runtime around one workflow, with a model of what each decision must do."""

    definition = PLAN_DAY

    def __init__(self):
        super().__init__()
        self.state: Saga | None = None
        self.tick = 0
        self.history: list[tuple[Fact, Decision]] = []
        # The commands of the decision that first applied each fact id.
        self.original: dict[str, tuple[Command, ...]] = {}
        # RunTask msg ids over every first application of a fact.
        self.run_ids: Counter[str] = Counter()
        self.terminal: str | None = None
        self.updated_at: list[str] = []

    # --- helpers ----------------------------------------------------------------------

    def next_at(self) -> str:
        self.tick += 1
        return at(self.tick)

    def pending(self):
        assert self.state is not None
        return [t for t in self.state.tasks if t.status in {"SCHEDULED", "IN_PROGRESS"}]

    def deliver(self, fact: Fact) -> Decision:
        before = self.state
        was_terminal = before is not None and before.status in TERMINAL
        key = fact_id(fact)
        seen = key in self.original
        answers = isinstance(fact, Started) or any(
            isinstance(fact, TaskCompleted | TaskFailed)
            and (t.ref, t.attempt, t.status) == (fact.ref, fact.attempt, "SCHEDULED")
            for t in (before.tasks if before is not None else ())
        )
        decision = decide(self.definition, before, fact)
        self.history.append((fact, decision))
        after = decision.state
        assert after is not None

        if seen:
            # A redelivery (or another result for a finished attempt): nothing changes, and
            # it re-emits what it caused the first time and is still to do.
            assert after is before
            assert decision.commands == self.still_caused(key)
        elif after is before:
            # A stale attempt or a ref this saga never scheduled.
            assert not answers, "a result for a scheduled task was ignored"
            assert decision.commands == ()
        else:
            assert not was_terminal, "a terminal workflow changed"
            assert answers, "a fact that answers nothing changed the saga"
            assert after.updated_at == fact.at
            self.original[key] = decision.commands
            self.run_ids.update(c.msg_id for c in decision.commands if isinstance(c, RunTask))
            # Every command of a first application is new: no msg id repeats an earlier one.
            new_ids = [c.msg_id for c in decision.commands]
            assert len(new_ids) == len(set(new_ids))
            earlier = {c.msg_id for cs in list(self.original.values())[:-1] for c in cs}
            assert not earlier & set(new_ids)
        if was_terminal:
            # Only a redelivered fact may emit on a finished workflow: its events again.
            assert seen or decision.commands == ()
            assert all(isinstance(c, PublishEvent) for c in decision.commands)
        self.state = after
        return decision

    def still_caused(self, key: str) -> tuple[Command, ...]:
        """The original commands of fact ``key`` still to do: events, unanswered requests."""
        assert self.state is not None
        records = {t.ref: t for t in self.state.tasks}
        return tuple(
            c
            for c in self.original[key]
            if isinstance(c, PublishEvent)
            or (
                isinstance(c, RunTask)
                and records[c.ref].status == "SCHEDULED"
                and records[c.ref].attempt == c.attempt
            )
        )

    # --- rules ------------------------------------------------------------------------

    @initialize(data=st.data())
    def start(self, data):
        fact = Started(
            workflow_id=WF,
            workflow=self.definition.name,
            version=self.definition.version,
            input=data.draw(start_input(self.definition), label="input"),
            at=self.next_at(),
            trace_id="0" * 32,
        )
        decision = self.deliver(fact)
        assert decision.state is not None
        assert decision.state.created_at == fact.at

    @precondition(lambda self: self.state is not None and self.pending())
    @rule(data=st.data())
    def complete(self, data):
        task = data.draw(st.sampled_from(self.pending()), label="task")
        output = data.draw(SIMPLE_OUTPUTS[task.name], label="output")
        started_at = data.draw(st.sampled_from([None, task.scheduled_at]), label="started_at")
        fact = TaskCompleted(
            workflow_id=WF,
            ref=task.ref,
            attempt=task.attempt,
            output=output,
            at=self.next_at(),
            started_at=started_at,
            worker="w-1",
        )
        decision = self.deliver(fact)
        assert decision.state is not None
        assert decision.state is not self.history[-2][1].state

    @precondition(lambda self: self.state is not None and self.pending())
    @rule(data=st.data())
    def fail(self, data):
        task = data.draw(st.sampled_from(self.pending()), label="task")
        fact = TaskFailed(
            workflow_id=WF,
            ref=task.ref,
            attempt=task.attempt,
            error=data.draw(FAILURES, label="error"),
            at=self.next_at(),
        )
        decision = self.deliver(fact)
        assert decision.state is not None
        record = next(t for t in decision.state.tasks if t.ref == task.ref)
        assert record.status == "FAILED"
        assert record.error == fact.error
        node = self.definition.nodes[task.ref].task
        if getattr(node, "optional", False):
            assert decision.state.status != "FAILED"
        else:
            assert decision.state.status == "FAILED"
            assert decision.state.error is not None
            assert decision.state.error.task == task.ref
            assert repr(task.ref) in decision.state.error.message
            assert decision.commands == ()

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def duplicate(self, data):
        fact, _ = data.draw(st.sampled_from(self.history), label="earlier")
        self.deliver(fact)

    @precondition(lambda self: self.state is not None)
    @rule(data=st.data())
    def stale(self, data):
        assert self.state is not None
        task = data.draw(st.sampled_from(list(self.state.tasks)), label="task")
        attempt = data.draw(st.integers(0, 5).filter(lambda n: n != task.attempt), label="attempt")
        kind = data.draw(st.sampled_from([TaskCompleted, TaskFailed]), label="kind")
        fact = self.result(kind, task.ref, attempt, data)
        before = self.state
        decision = self.deliver(fact)
        assert decision.state is before
        assert decision.commands == ()

    @precondition(lambda self: self.state is not None)
    @rule(data=st.data(), ref=st.sampled_from(["nope", "workflow", "event", "Agenda", "a_b"]))
    def unknown_ref(self, data, ref):
        kind = data.draw(st.sampled_from([TaskCompleted, TaskFailed]), label="kind")
        fact = self.result(kind, ref, data.draw(st.integers(1, 3), label="attempt"), data)
        before = self.state
        decision = self.deliver(fact)
        assert decision.state is before
        assert decision.commands == ()

    def result(self, kind, ref, attempt, data):
        if kind is TaskCompleted:
            return TaskCompleted(
                workflow_id=WF, ref=ref, attempt=attempt, output={}, at=self.next_at()
            )
        error = data.draw(FAILURES, label="error")
        return TaskFailed(workflow_id=WF, ref=ref, attempt=attempt, error=error, at=self.next_at())

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def no_task_both_finished_and_pending(self):
        if self.state is None:
            return
        refs = [t.ref for t in self.state.tasks]
        assert len(refs) == len(set(refs))
        for t in self.state.tasks:
            assert t.attempt >= 1
            assert t.ref in self.definition.nodes
            if t.status in {"SCHEDULED", "IN_PROGRESS"}:
                assert t.type == "SIMPLE"
                assert t.ended_at is None
                assert t.output is None
                assert t.error is None
            else:
                assert t.ended_at is not None
                assert t.started_at is not None
                assert t.scheduled_at is not None
                assert t.scheduled_at <= t.started_at <= t.ended_at
        pending = self.pending()
        assert len(pending) <= 1  # sequential definitions: one task at a time
        if self.state.status in TERMINAL:
            assert pending == []
        else:
            assert len(pending) == 1

    @invariant()
    def one_run_task_per_simple_attempt(self):
        if self.state is None:
            return
        assert all(n == 1 for n in self.run_ids.values()), self.run_ids
        simple_ids = {
            task_msg_id(WF, t.ref, t.attempt) for t in self.state.tasks if t.type == "SIMPLE"
        }
        assert set(self.run_ids) == simple_ids
        records = {t.ref: t for t in self.state.tasks}
        for commands in self.original.values():
            for c in commands:
                if isinstance(c, RunTask):
                    assert c.input == records[c.ref].input
                    assert c.task == records[c.ref].name
                    assert c.workflow == self.definition.name

    @invariant()
    def terminal_status_never_changes(self):
        if self.state is None:
            return
        if self.terminal is not None:
            assert self.state.status == self.terminal
        elif self.state.status in TERMINAL:
            self.terminal = self.state.status

    @invariant()
    def updated_at_never_goes_backwards(self):
        if self.state is None:
            return
        if self.updated_at:
            assert self.state.updated_at >= self.updated_at[-1]
        self.updated_at.append(self.state.updated_at)
        assert self.state.created_at <= self.state.updated_at

    @invariant()
    def completed_output_follows_from_the_records(self):
        if self.state is None or self.state.status != "COMPLETED":
            return
        assert self.state.output == expected_output(self.definition, self.state)
        events = [c for cs in self.original.values() for c in cs if isinstance(c, PublishEvent)]
        assert len(events) == 1

    def teardown(self):
        if self.state is not None:
            event(f"ended {self.state.status}")
        replay(self.definition, self.history)


def replay(definition, history):
    """Decide every recorded fact again from scratch, each time from the saga's JSON."""
    state = None
    for fact, recorded in history:
        loaded = (
            None if state is None else msgspec.json.decode(msgspec.json.encode(state), type=Saga)
        )
        decision = decide(definition, loaded, fact)
        assert decision.commands == recorded.commands
        assert decision.state == recorded.state
        if recorded.state is state:  # a no-op stays a no-op on the reloaded state
            assert decision.state is loaded
        state = recorded.state


class PlanDayMachine(DeciderMachine):
    definition = PLAN_DAY


class ChainMachine(DeciderMachine):
    definition = CHAIN


SETTINGS = settings(
    max_examples=120,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPlanDay = PlanDayMachine.TestCase
TestPlanDay.settings = SETTINGS
TestChain = ChainMachine.TestCase
TestChain.settings = SETTINGS


# --- replay of a recorded history ------------------------------------------------------------

FACT_LIST = msgspec.json.Encoder()
_decode_history = msgspec.json.Decoder(list[Started | TaskCompleted | TaskFailed])


@st.composite
def histories(draw, definition):
    """A plausible fact history: results for what was scheduled, duplicates, strays."""
    facts: list[Fact] = [
        Started(
            workflow_id=WF,
            workflow=definition.name,
            version=definition.version,
            input=draw(start_input(definition)),
            at=at(0),
        )
    ]
    state = decide(definition, None, facts[0]).state
    for tick in range(1, draw(st.integers(1, 12)) + 1):
        assert state is not None
        pending = [t for t in state.tasks if t.status == "SCHEDULED"]
        move = draw(st.sampled_from(["complete", "complete", "fail", "duplicate", "stray"]))
        if move in {"complete", "fail"} and pending:
            task = pending[0]
            if move == "complete":
                output = draw(SIMPLE_OUTPUTS[task.name])
                fact: Fact = TaskCompleted(
                    workflow_id=WF, ref=task.ref, attempt=1, output=output, at=at(tick)
                )
            else:
                fact = TaskFailed(
                    workflow_id=WF, ref=task.ref, attempt=1, error=draw(FAILURES), at=at(tick)
                )
        elif move == "stray":
            fact = TaskCompleted(
                workflow_id=WF,
                ref=draw(st.sampled_from(["nope", "agenda", "a"])),
                attempt=2,
                output={},
                at=at(tick),
            )
        else:
            fact = draw(st.sampled_from(facts))
        facts.append(fact)
        state = decide(definition, state, fact).state
    return facts


def record_history(definition, facts):
    state = None
    history = []
    for fact in facts:
        decision = decide(definition, state, fact)
        history.append((fact, decision))
        state = decision.state
    return history


@pytest.mark.parametrize("definition", [PLAN_DAY, CHAIN], ids=["plan_day", "chain"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_recorded_history_replays_to_the_same_decisions(definition, data):
    facts = data.draw(histories(definition))
    recorded = record_history(definition, facts)
    # The history is stored as JSON, as the RESULTS stream and a test fixture would keep it.
    stored = FACT_LIST.encode([fact for fact, _ in recorded])
    replayed = _decode_history.decode(stored)
    assert replayed == facts
    replay(definition, list(zip(replayed, (d for _, d in recorded), strict=True)))


def test_replay_catches_a_different_decision():
    """The replayer is not vacuous: a history recorded under other outputs does not match."""
    facts = [
        Started(
            workflow_id=WF,
            workflow="plan_day",
            version=1,
            input={"user": "ann", "datetime": "2019-04-06T12:00:00"},
            at=at(0),
        ),
        TaskCompleted(
            workflow_id=WF, ref="agenda", attempt=1, output={"activity": "free"}, at=at(1)
        ),
    ]
    recorded = record_history(PLAN_DAY, facts)
    changed = TaskCompleted(
        workflow_id=WF, ref="agenda", attempt=1, output={"activity": "work"}, at=at(1)
    )
    with pytest.raises(AssertionError):
        replay(PLAN_DAY, [recorded[0], (changed, recorded[1][1])])
