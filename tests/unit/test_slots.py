"""Concurrency limits without a server: the semaphore's transitions, the decider's QUEUED
workflows and slotted tasks, and which saga writes give slots back."""

from __future__ import annotations

import msgspec
import pytest

from kapellmeister.decider import commands_caused_by, decide, task_msg_id
from kapellmeister.definitions import compile_definition, parse_definition, slot_name
from kapellmeister.errors import InvalidDefinition
from kapellmeister.limits import released_slots
from kapellmeister.messages import (
    AcquireSlot,
    RerunRequested,
    RunTask,
    SlotGranted,
    Started,
    TaskCompleted,
    TerminateRequested,
)
from kapellmeister.slots import MAX_WAITING, Holder, Semaphore, Waiter, give_back, holder_of, take

NOW = "2026-11-23T10:00:00.000Z"


def waiter(id: str, priority: int = 0) -> Waiter:
    return Waiter(id=id, priority=priority, since=NOW)


def fill(limit: int, *ids: str, priorities: dict[str, int] | None = None) -> Semaphore:
    semaphore: Semaphore | None = None
    for id in ids:
        semaphore, _, _ = take(semaphore, waiter(id, (priorities or {}).get(id, 0)), limit, NOW, 60)
    assert semaphore is not None
    return semaphore


# --- the semaphore -------------------------------------------------------------------


def test_slots_go_to_the_first_comers_then_the_rest_wait_in_order():
    semaphore = fill(2, "a", "b", "c", "d")
    assert list(semaphore.holders) == ["a", "b"]
    assert [w.id for w in semaphore.waiting] == ["c", "d"]
    assert semaphore.holders["a"].until == "2026-11-23T10:01:00.000Z"


def test_a_waiter_asking_again_changes_nothing_and_a_holder_renews_its_lease():
    semaphore = fill(1, "a", "b")
    again, taken, granted = take(semaphore, waiter("b"), 1, NOW, 60)
    assert (again, taken, granted) == (semaphore, "waits", [])
    later = "2026-11-23T10:00:30.000Z"
    again, taken, granted = take(semaphore, waiter("a"), 1, later, 60)
    assert (taken, granted) == ("holds", [])
    assert again.holders["a"] == Holder(since=NOW, until="2026-11-23T10:01:30.000Z")
    assert again.waiting == semaphore.waiting


def test_a_full_queue_takes_no_one_more():
    queue = [waiter(f"w{n}") for n in range(MAX_WAITING)]
    semaphore = Semaphore(limit=1, holders=fill(1, "a").holders, waiting=queue)
    assert len(semaphore.waiting) == MAX_WAITING
    again, taken, granted = take(semaphore, waiter("late"), 1, NOW, 60)
    assert (again, taken, granted) == (semaphore, "full", [])
    # Once one leaves, there is room again, at the back.
    after, _ = give_back(semaphore, "w5", NOW, 60)
    after, taken, _ = take(after, waiter("late"), 1, NOW, 60)
    assert taken == "waits" and after.waiting[-1].id == "late"


def test_a_semaphore_is_stored_compactly():
    semaphore = fill(1, "a", "b")
    text = msgspec.json.encode(semaphore)
    assert text == (
        b'{"limit":1,"holders":{"a":["2026-11-23T10:00:00.000Z","2026-11-23T10:01:00.000Z"]},'
        b'"waiting":[["b",0,"2026-11-23T10:00:00.000Z"]]}'
    )


def test_an_id_names_a_workflow_or_a_task_attempt():
    assert holder_of("w-1") == ("w-1", "", 0)
    assert holder_of(task_msg_id("w-1", "report[3]", 2)) == ("w-1", "report[3]", 2)


def test_higher_priorities_wait_ahead_and_equal_ones_keep_their_order():
    high = {"high1": 9, "high2": 9}
    semaphore = fill(1, "run", "low1", "high1", "low2", "high2", priorities=high)
    assert [w.id for w in semaphore.waiting] == ["high1", "high2", "low1", "low2"]


def test_a_freed_slot_goes_to_the_head_of_the_queue():
    semaphore = fill(1, "a", "b", "c")
    after, granted = give_back(semaphore, "a", NOW, 60)
    assert [w.id for w in granted] == ["b"]
    assert list(after.holders) == ["b"] and [w.id for w in after.waiting] == ["c"]


def test_a_waiter_leaving_frees_nothing_and_an_unknown_id_changes_nothing():
    semaphore = fill(1, "a", "b", "c")
    after, granted = give_back(semaphore, "b", NOW, 60)
    assert granted == [] and [w.id for w in after.waiting] == ["c"]
    assert give_back(after, "zzz", NOW, 60) == (after, [])


def test_a_raised_limit_grants_the_waiters_it_makes_room_for():
    semaphore = fill(1, "a", "b", "c")
    after, taken, granted = take(semaphore, waiter("d"), 3, NOW, 60)
    assert taken == "waits"
    assert [w.id for w in granted] == ["b", "c"]
    assert after.limit == 3 and [w.id for w in after.waiting] == ["d"]


def test_a_newcomer_does_not_jump_the_queue_when_a_slot_is_free():
    # A release that a crash lost its grant for: the slot goes to who waited first.
    stuck = Semaphore(limit=1, waiting=[waiter("first")])
    after, taken, granted = take(stuck, waiter("late"), 1, NOW, 60)
    assert taken == "waits" and [w.id for w in granted] == ["first"]
    assert [w.id for w in after.waiting] == ["late"]


def test_slot_names_per_key_value():
    assert slot_name("wf", "orders", "", None) == "wf.orders"
    acme = slot_name("task", "mail.send", "${workflow.input.customer}", "acme")
    assert acme.startswith("task.mail.send.k.") and len(acme.rsplit(".", 1)[1]) == 16
    assert acme == slot_name("task", "mail.send", "${x}", "acme")
    assert acme != slot_name("task", "mail.send", "${x}", "globex")
    assert slot_name("task", "t", "${x}", 1) != slot_name("task", "t", "${x}", "1")


# --- definitions ---------------------------------------------------------------------


def definition(**extra):
    task = {"ref": "work", "type": "SIMPLE", "task": "jobs.run", **extra.pop("task", {})}
    return compile_definition(
        parse_definition({"name": "jobs", "input": {"customer": "str"}, "tasks": [task], **extra})
    )


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"concurrency": {"limit": 0}}, "concurrency.limit"),
        ({"priority": 100}, "priority"),
        ({"concurrency": {"limit": 1, "key": "${work.output.x}"}}, "concurrency.key"),
        ({"concurrency": {"limit": 1, "limt": 2}}, "concurrency"),
        ({"task": {"priority": -1}}, "priority"),
        ({"task": {"concurrency": {"limit": 1, "key": "${nowhere.output}"}}}, "tasks[0]"),
    ],
)
def test_bad_limits_are_refused_with_their_path(extra, where):
    with pytest.raises(InvalidDefinition, match=f"{where}".replace("[", r"\[")):
        definition(**extra)


# --- the decider ---------------------------------------------------------------------


def start(definition, priority=None, workflow_id="w1"):
    fact = Started(
        workflow_id=workflow_id,
        workflow="jobs",
        version=1,
        input={"customer": "acme"},
        at=NOW,
        priority=priority,
    )
    return decide(definition, None, fact)


def test_a_limited_workflow_starts_queued_and_asks_for_its_slot():
    limited = definition(concurrency={"limit": 2, "key": "${workflow.input.customer}"}, priority=7)
    decision = start(limited)
    state = decision.state
    assert state is not None and state.status == "QUEUED" and state.tasks == ()
    assert state.slot == slot_name("wf", "jobs", "${workflow.input.customer}", "acme")
    assert decision.commands == (
        AcquireSlot(msg_id="w1:slot:start", workflow_id="w1", slot=state.slot, limit=2, priority=7),
    )
    # The start's priority wins over the definition's.
    assert start(limited, priority=42).state.priority == 42


def test_a_grant_runs_the_workflow_once():
    limited = definition(concurrency={"limit": 1})
    state = start(limited).state
    granted = decide(limited, state, SlotGranted(workflow_id="w1", at=NOW))
    assert granted.state is not None and granted.state.status == "RUNNING"
    assert [type(c) for c in granted.commands] == [RunTask]
    again = decide(limited, granted.state, SlotGranted(workflow_id="w1", at=NOW))
    assert again.state is granted.state and again.commands == granted.commands


def test_a_queued_workflow_terminated_gives_its_place_back():
    limited = definition(concurrency={"limit": 1})
    state = start(limited).state
    assert state is not None
    ended = decide(limited, state, TerminateRequested(workflow_id="w1", reason="no", at=NOW))
    assert ended.state is not None and ended.state.status == "TERMINATED"
    assert released_slots(state, ended.state) == [("wf.jobs", "w1")]
    # A grant that comes after the end starts nothing.
    late = decide(limited, ended.state, SlotGranted(workflow_id="w1", at=NOW))
    assert late.state is ended.state and late.commands == ()


def test_a_slotted_task_carries_its_slot_limit_and_priority():
    slotted = definition(
        priority=3,
        task={"concurrency": {"limit": 4, "key": "${workflow.input.customer}"}, "priority": 60},
    )
    decision = start(slotted)
    (run,) = [c for c in decision.commands if isinstance(c, RunTask)]
    assert run.slot == slot_name("task", "jobs.run", "${x}", "acme")
    assert (run.limit, run.priority) == (4, 60)
    assert decision.state is not None and decision.state.tasks[0].slot == run.slot
    plain = start(definition())
    (unslotted,) = [c for c in plain.commands if isinstance(c, RunTask)]
    assert (unslotted.slot, unslotted.limit) == ("", 0)


def test_an_ended_attempt_gives_its_slot_back_and_only_once():
    slotted = definition(task={"concurrency": {"limit": 1}})
    state = start(slotted).state
    assert state is not None
    done = decide(
        slotted, state, TaskCompleted(workflow_id="w1", ref="work", attempt=1, output={}, at=NOW)
    ).state
    assert done is not None and done.status == "COMPLETED"
    assert released_slots(state, done) == [("task.jobs.run", task_msg_id("w1", "work", 1))]
    assert released_slots(done, done) == []


def test_a_rerun_of_a_limited_workflow_waits_then_runs_from_its_task():
    limited = definition(concurrency={"limit": 1})
    state = start(limited).state
    state = decide(limited, state, SlotGranted(workflow_id="w1", at=NOW)).state
    state = decide(
        limited, state, TaskCompleted(workflow_id="w1", ref="work", attempt=1, output={}, at=NOW)
    ).state
    assert state is not None and state.status == "COMPLETED"
    rerun = RerunRequested(workflow_id="w1", task="work", at="2026-11-23T10:00:05.000Z")
    queued = decide(limited, state, rerun)
    assert queued.state is not None and queued.state.status == "QUEUED"
    assert [type(c) for c in queued.commands] == [AcquireSlot]
    assert queued.state.tasks == state.tasks  # nothing reruns before it has its slot
    running = decide(limited, queued.state, SlotGranted(workflow_id="w1", at=NOW))
    assert running.state is not None and running.state.status == "RUNNING"
    assert running.state.requeued is None
    assert running.state.tasks[0].attempt == 2
    assert [type(c) for c in running.commands] == [RunTask]
    assert running.commands == commands_caused_by(limited, running.state, running.state.last_fact)


def test_a_queued_saga_reads_back_as_it_was_written():
    limited = definition(concurrency={"limit": 1})
    state = start(limited).state
    text = msgspec.json.encode(state)
    assert b'"status":"QUEUED"' in text and b'"slot":"wf.jobs"' in text
    assert msgspec.json.decode(text, type=type(state)) == state


def test_terminating_a_waiting_rerun_calls_it_off_and_undoes_nothing():
    limited = definition(
        concurrency={"limit": 1},
        task={"compensate": {"ref": "undo", "type": "SIMPLE", "task": "jobs.undo"}},
    )
    state = start(limited).state
    state = decide(limited, state, SlotGranted(workflow_id="w1", at=NOW)).state
    done = decide(
        limited,
        state,
        TaskCompleted(workflow_id="w1", ref="work", attempt=1, output={"x": 1}, at=NOW),
    ).state
    assert done is not None and done.status == "COMPLETED"
    rerun = RerunRequested(workflow_id="w1", task="work", at="2026-11-23T10:00:05.000Z")
    queued = decide(limited, done, rerun).state
    assert queued is not None and queued.status == "QUEUED"
    stop = TerminateRequested(
        workflow_id="w1", reason="never mind", compensate=True, at="2026-11-23T10:00:06.000Z"
    )
    called_off = decide(limited, queued, stop)
    state = called_off.state
    assert state is not None and called_off.refusal is None
    assert (state.status, state.output, state.requeued) == ("COMPLETED", done.output, None)
    assert state.tasks == done.tasks and called_off.commands == ()
    assert released_slots(queued, state) == [("wf.jobs", "w1")]
    # A grant that comes later starts nothing.
    late = decide(limited, state, SlotGranted(workflow_id="w1", at=NOW))
    assert late.state is state and not any(isinstance(c, RunTask) for c in late.commands)
