"""Schedules' ticks and catch-up, decided without I/O (`kapellmeister.schedules.due`)."""

from __future__ import annotations

import datetime
from typing import Any

import msgspec
import pytest

from kapellmeister.checker import check
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.errors import BadRequest
from kapellmeister.schedules import (
    MAX_CATCH_UP,
    ON_TIME_S,
    Schedule,
    ScheduleSpec,
    due,
    from_definition,
    latest_ticks,
    next_tick,
    validate,
    workflow_id_of,
)

T0 = 1_794_999_600  # a multiple of 10, 60 and 100: 2026-11-18T11:00:00Z


def every(seconds: int, **fields) -> Schedule:
    return Schedule(name="s", workflow="plan_day", every_s=seconds, **fields)


def at(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text).timestamp())


def test_every_ticks_fall_on_multiples_since_the_epoch():
    spec = ScheduleSpec(name="s", workflow="w", every_s=60)
    assert next_tick(spec, T0) == T0 + 60
    assert next_tick(spec, T0 + 1) == T0 + 60
    assert next_tick(spec, T0 + 59) == T0 + 60


def test_cron_ticks_in_its_timezone_across_a_daylight_saving_change():
    spec = ScheduleSpec(name="s", workflow="w", cron="30 9 * * MON-FRI", timezone="Europe/Paris")
    # Friday 2026-03-27 10:00 Paris: the next is Monday 09:30, after the clocks went forward.
    friday = at("2026-03-27T10:00:00+01:00")
    assert next_tick(spec, friday) == at("2026-03-30T09:30:00+02:00")
    seconds = ScheduleSpec(name="s", workflow="w", cron="*/15 * * * * *")  # six fields
    assert next_tick(seconds, T0) == T0 + 15


def test_an_on_time_tick_runs_and_the_schedule_moves_on():
    firing = due(every(10, next_tick=T0), T0 + 2)
    assert firing is not None
    assert (firing.ticks, firing.last_tick, firing.next_tick) == ([T0], T0, T0 + 10)
    assert due(every(10, next_tick=T0), T0 - 1) is None
    assert due(every(10, next_tick=T0, paused=True), T0 + 2) is None


@pytest.mark.parametrize(
    ("catch_up", "started"),
    [("skip", []), ("once", [T0 + 200]), ("all", [T0, T0 + 100, T0 + 200])],
)
def test_missed_ticks_by_catch_up_policy(catch_up, started):
    # Every 100 s, down from before T0 until T0 + 290: three ticks missed, and even the
    # latest is 90 s late (past ON_TIME_S).
    assert ON_TIME_S < 290 - 200
    firing = due(every(100, next_tick=T0, catch_up=catch_up), T0 + 290)
    assert firing is not None
    assert firing.ticks == started
    assert (firing.last_tick, firing.next_tick) == (T0 + 200, T0 + 300)  # skipped, all


def test_a_skip_schedule_still_runs_its_latest_tick_while_it_is_on_time():
    firing = due(every(10, next_tick=T0), T0 + 35)
    assert firing is not None
    assert firing.ticks == [T0 + 30]  # the three before it were missed


def test_all_catches_up_at_most_so_many_ticks_the_newest():
    firing = due(every(1, next_tick=T0, catch_up="all"), T0 + 5 * MAX_CATCH_UP)
    assert firing is not None
    assert len(firing.ticks) == MAX_CATCH_UP
    assert firing.ticks[-1] == T0 + 5 * MAX_CATCH_UP


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({}, "either `cron` or `every_s`"),
        ({"cron": "* * * * *", "every_s": 5}, "either `cron` or `every_s`"),
        ({"cron": "61 * * * *"}, "cron '61 * * * *'"),
        ({"every_s": 5, "timezone": "Mars/Olympus"}, "unknown timezone"),
    ],
)
def test_a_bad_schedule_says_why(fields, says):
    with pytest.raises(BadRequest) as raised:
        validate(ScheduleSpec(name="s", workflow="w", **fields))
    assert says in raised.value.message


def test_the_spec_is_what_was_asked_and_the_id_is_name_and_tick():
    schedule = every(10, next_tick=T0, paused=True, last_tick=T0 - 10)
    assert schedule.spec() == ScheduleSpec(name="s", workflow="plan_day", every_s=10)
    assert workflow_id_of("nightly", T0) == f"nightly-{T0}"
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"name": "a.b", "workflow": "w", "every_s": 1}', type=ScheduleSpec)


def test_a_definitions_schedules_are_named_after_it_and_checked():
    spec: dict[str, Any] = {
        "name": "report",
        "input": {"day": "str"},
        "tasks": [{"ref": "wait", "type": "WAIT"}],
        "schedules": [
            {"cron": "0 6 * * *", "input": {"day": "today"}, "catch_up": "once"},
            {"name": "hourly", "every_s": 3600, "input": {"day": "now"}},
            {"cron": "0 6 * * *", "every_s": 5, "input": {"day": "x"}},
            {"every_s": 60, "timezone": "Atlantis/Central", "input": {}},
        ],
    }
    definition = compile_definition(parse_definition(spec))
    named = from_definition(definition.spec)
    assert [s.name for s in named] == ["report-1", "hourly", "report-3", "report-4"]
    assert named[0] == ScheduleSpec(
        name="report-1",
        workflow="report",
        cron="0 6 * * *",
        input={"day": "today"},
        catch_up="once",
    )
    found = {(p.path, p.message.split(" (")[0]) for p in check(definition)}
    assert found == {
        ("schedules[2]", "a schedule has either `cron` or `every_s`, not both nor neither"),
        ("schedules[3]", "unknown timezone 'Atlantis/Central'"),
        ("schedules[3].input", "invalid input for report: Object missing required field `day`"),
    }
    one = parse_definition({**spec, "schedules": spec["schedules"][:1]})
    assert [s.name for s in from_definition(one)] == ["report"]  # one: the workflow's name


def test_a_year_down_costs_at_most_the_catch_up_limit():
    year = 366 * 86_400
    for spec in (
        every(1, next_tick=T0, catch_up="all"),
        Schedule(name="s", workflow="w", cron="* * * * *", next_tick=T0, catch_up="all"),
    ):
        firing = due(spec, T0 + year)
        assert firing is not None
        assert len(firing.ticks) == MAX_CATCH_UP
        assert firing.ticks == sorted(firing.ticks) and firing.ticks[-1] <= T0 + year
        assert firing.next_tick > T0 + year
    skip = due(Schedule(name="s", workflow="w", cron="0 6 * * *", next_tick=T0), T0 + year)
    assert skip is not None and skip.ticks == []  # the latest 06:00 was hours ago


def test_the_latest_ticks_of_a_cron_include_now_and_stop_at_since():
    spec = ScheduleSpec(name="s", workflow="w", cron="*/20 * * * * *")  # :00 :20 :40
    assert latest_ticks(spec, T0 + 40, T0, 10) == [T0 + 40, T0 + 20, T0]
    assert latest_ticks(spec, T0 + 59, T0 + 1, 10) == [T0 + 40, T0 + 20]
    assert latest_ticks(spec, T0 + 59, T0, 2) == [T0 + 40, T0 + 20]
    interval = ScheduleSpec(name="s", workflow="w", every_s=20)
    assert latest_ticks(interval, T0 + 59, T0 + 1, 10) == [T0 + 40, T0 + 20]


def test_a_stored_schedule_with_fields_this_version_does_not_know_is_read():
    stored = msgspec.json.encode({**msgspec.to_builtins(every(5, next_tick=T0)), "later": 1})
    assert msgspec.json.decode(stored, type=Schedule).next_tick == T0
    with pytest.raises(msgspec.ValidationError):  # but a request is checked strictly
        msgspec.json.decode(b'{"name":"s","workflow":"w","every_s":5,"later":1}', type=ScheduleSpec)


def test_a_definitions_schedule_names_must_be_names_and_distinct():
    spec = {
        "name": "w" * 64,
        "tasks": [{"ref": "wait", "type": "WAIT"}],
        "schedules": [{"every_s": 60}, {"name": "short", "every_s": 5}],
    }
    found = {p.path: p.message for p in check(compile_definition(parse_definition(spec)))}
    assert found["schedules[0]"].startswith(f"name '{'w' * 64}-1' is not 1-64")
    twice = {**spec, "name": "rep", "schedules": [{"every_s": 60}, {"name": "rep-1", "every_s": 5}]}
    found = {p.path: p.message for p in check(compile_definition(parse_definition(twice)))}
    assert found == {"schedules[1]": "name 'rep-1' is used twice"}
