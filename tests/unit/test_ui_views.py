"""What the web UI computes from a saga and from its query strings; no I/O."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from starlette.datastructures import FormData

from kapellmeister.messages import Saga
from kapellmeister.ui.app import _list_query
from kapellmeister.ui.client import ApiError
from kapellmeister.ui.schedule_pages import spec_of, tick_text
from kapellmeister.ui.views import SHOWN_CHARS, clock, input_example, pretty, timeline, waiting


def _task(ref: str, status: str, **times: Any) -> dict[str, Any]:
    return {
        "ref": ref,
        "name": ref,
        "type": times.pop("type", "SIMPLE"),
        "status": status,
        "attempt": times.pop("attempt", 1),
        "input": {},
        "output": None,
        "error": None,
        "scheduled_at": times.pop("scheduled_at", None),
        "started_at": times.pop("started_at", None),
        "ended_at": times.pop("ended_at", None),
        **times,
    }


def _saga(status: str, tasks: list[dict[str, Any]], updated: str) -> Saga:
    return msgspec.convert(
        {
            "workflow_id": "w",
            "workflow": "flow",
            "version": 1,
            "status": status,
            "input": {},
            "output": None,
            "tenant": "",
            "created_at": "2026-11-23T10:00:00.000Z",
            "updated_at": updated,
            "trace_id": "t",
            "error": None,
            "tasks": tasks,
        },
        Saga,
    )


def test_bars_sit_on_the_workflows_span_with_queued_time_and_earlier_attempts():
    saga = _saga(
        "COMPLETED",
        [
            _task(
                "a",
                "COMPLETED",
                scheduled_at="2026-11-23T10:00:00.000Z",
                started_at="2026-11-23T10:00:01.000Z",
                ended_at="2026-11-23T10:00:04.000Z",
            ),
            _task(
                "b",
                "COMPLETED",
                attempt=2,
                scheduled_at="2026-11-23T10:00:08.000Z",
                started_at="2026-11-23T10:00:08.000Z",
                ended_at="2026-11-23T10:00:10.000Z",
                history=[
                    {
                        "attempt": 1,
                        "status": "FAILED",
                        "started_at": "2026-11-23T10:00:05.000Z",
                        "ended_at": "2026-11-23T10:00:06.000Z",
                    }
                ],
            ),
        ],
        updated="2026-11-23T10:00:10.000Z",
    )
    a, b = timeline(saga, now="2026-11-23T11:00:00.000Z")  # finished: `now` is not used
    (bar,) = a.bars
    assert (bar.left, bar.queued, bar.width) == (0.0, 10.0, 40.0)
    assert bar.title == "attempt 1: COMPLETED, 3,000 ms"
    earlier, last = b.bars
    assert (earlier.attempt, earlier.status, earlier.left, earlier.width) == (1, "FAILED", 50, 10)
    assert (last.attempt, last.left, last.width) == (2, 80.0, 20.0)


def test_a_running_task_reaches_now_and_a_waiting_one_is_offered_a_signal():
    saga = _saga(
        "RUNNING",
        [
            _task(
                "approve",
                "IN_PROGRESS",
                type="WAIT",
                scheduled_at="2026-11-23T10:00:00.000Z",
                started_at="2026-11-23T10:00:00.000Z",
            ),
            _task("later", "SCHEDULED", scheduled_at="2026-11-23T10:00:02.000Z"),
        ],
        updated="2026-11-23T10:00:02.000Z",
    )
    approve, later = timeline(saga, now="2026-11-23T10:00:04.000Z")
    assert (approve.bars[0].left, approve.bars[0].width) == (0.0, 100.0)
    assert (later.bars[0].left, later.bars[0].queued) == (50.0, 50.0)  # queued until now
    assert [task.ref for task in waiting(saga)] == ["approve"]
    assert waiting(msgspec.structs.replace(saga, status="TERMINATED")) == []


def test_the_start_form_offers_each_required_input_field():
    example = msgspec.json.decode(
        input_example({"user": "str", "money": "int", "when": "datetime", "note": "str?"})
    )
    assert example == {"user": "", "money": 0, "when": "YYYY-MM-DDTHH:MM:SS"}


def test_list_filters_become_the_apis_query_and_empty_ones_are_left_out():
    assert _list_query({}) == {"limit": 50}
    assert _list_query(
        {
            "status": "RUNNING",
            "workflow": "",
            "tenant": "acme",
            "since": "2026-11-23T10:00",
            "until": "2026-11-23T11:00:30",
            "limit": "5",
        }
    ) == {
        "status": "RUNNING",
        "tenant": "acme",
        "since": "2026-11-23T10:00:00",
        "until": "2026-11-23T11:00:30",
        "limit": 5,
    }
    assert _list_query({"limit": "-3"}) == {"limit": 50}
    assert _list_query({"limit": "²"}) == {"limit": 50}  # a digit to str.isdigit, not to int
    assert _list_query({"limit": "0"}) == {"limit": 1}
    assert _list_query({"limit": "50000"}) == {"limit": 1_000}


def test_a_time_is_shown_as_the_time_of_day_with_the_stamp_on_hover():
    assert str(clock("2026-11-23T16:38:05.215Z")) == (
        '<time datetime="2026-11-23T16:38:05.215Z" title="2026-11-23T16:38:05.215Z">'
        "16:38:05.215</time>"
    )
    assert str(clock(None)) == "&ndash;"
    assert "&lt;" in str(clock("<script>"))


def test_a_huge_value_is_cut_and_says_so():
    text = pretty({"blob": "x" * 50_000})
    assert len(text) < SHOWN_CHARS + 100
    assert text.endswith("… cut: 50,016 characters in all (conductor.get has them)")
    assert pretty({"small": 1}) == '{\n  "small": 1\n}'


def test_the_schedule_form_becomes_the_apis_request():
    form = FormData(
        [
            ("name", " nightly "),
            ("workflow", "plan_day"),
            ("timing", "cron"),
            ("cron", "0 6 * * *"),
            ("timezone", ""),
            ("every_s", "5"),
            ("input", '{"user": "ann"}'),
            ("catch_up", "once"),
            ("tenant", ""),
        ]
    )
    assert spec_of(form) == {
        "name": "nightly",
        "workflow": "plan_day",
        "cron": "0 6 * * *",
        "timezone": "UTC",
        "input": {"user": "ann"},
        "catch_up": "once",
    }
    every = FormData([("name", "n"), ("workflow", "w"), ("timing", "every"), ("every_s", "60")])
    assert spec_of(every)["every_s"] == 60 and "cron" not in spec_of(every)
    with pytest.raises(ApiError) as raised:
        spec_of(FormData([("name", "n"), ("input", "{nope")]))
    assert raised.value.code == 400 and "not JSON" in raised.value.message
    assert tick_text(1_794_999_600) == "2026-11-18 11:00:00" and tick_text(None) == "-"
