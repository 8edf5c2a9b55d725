"""What the web UI shows of a saga: its tasks' timeline bars and readable JSON.

Pure functions over the saga struct the conductor writes (`kapellmeister.messages.Saga`),
so the pages show exactly what ``nats kv get workflows <id>`` holds; no I/O here.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import msgspec
from markupsafe import Markup

from kapellmeister.expressions import Json
from kapellmeister.messages import TERMINAL, Saga, TaskRecord

__all__ = [
    "SHOWN_CHARS",
    "SHOWN_TASKS",
    "Bar",
    "Row",
    "clock",
    "input_example",
    "pretty",
    "timeline",
    "waiting",
]

# What the start form shows for each type of a definition's input schema.
_EXAMPLES: dict[str, Json] = {
    "str": "",
    "int": 0,
    "float": 0.0,
    "bool": False,
    "datetime": "YYYY-MM-DDTHH:MM:SS",
    "date": "YYYY-MM-DD",
    "list": [],
    "object": {},
    "any": None,
}

# A page shows this many tasks of a workflow, and this much of one JSON value.
SHOWN_TASKS = 1_000
SHOWN_CHARS = 20_000

# Task statuses a signal can still complete (a WAIT task the workflow has reached).
_OPEN = frozenset({"SCHEDULED", "IN_PROGRESS"})


class Bar(msgspec.Struct, frozen=True):
    """One attempt on the timeline: where it starts and how wide, in percent of the
    workflow's span; ``queued`` is the part before the attempt started."""

    attempt: int
    status: str
    left: float
    queued: float
    width: float
    title: str


class Row(msgspec.Struct, frozen=True):
    ref: str
    status: str
    bars: list[Bar]


def _moment(text: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(text) if text else None


def clock(stamp: str | None) -> Markup:
    """A saga time as the time of day (UTC, to the millisecond), the full stamp on hover."""
    if not stamp:
        return Markup("&ndash;")
    shown = stamp[11:23] if len(stamp) >= 23 else stamp
    return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(stamp, shown)


def pretty(value: Json) -> str:
    """JSON as a person reads it: indented, keys in their order; cut after `SHOWN_CHARS`
    (a page stays light whatever a task returned; ``conductor.get`` has it whole)."""
    text = msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}\n… cut: {len(text):,} characters in all (conductor.get has them)"


def timeline(saga: Saga, now: str) -> list[Row]:
    """A row per task (the first `SHOWN_TASKS`) with a bar per attempt (earlier attempts
    first), on a scale from the workflow's start to its end (or ``now`` while it runs)."""
    begin = _moment(saga.created_at)
    end = _moment(saga.updated_at if saga.status in TERMINAL else max(now, saga.updated_at))
    assert begin is not None and end is not None
    span = max((end - begin).total_seconds(), 1e-3)

    def percent(moment: datetime.datetime | None) -> float:
        if moment is None:
            return 100.0
        return round(min(max((moment - begin).total_seconds() / span, 0.0), 1.0) * 100, 2)

    rows: list[Row] = []
    for task in saga.tasks[:SHOWN_TASKS]:
        bars = [
            _bar(
                percent,
                earlier.attempt,
                earlier.status,
                None,
                earlier.started_at,
                earlier.ended_at or now,
            )
            for earlier in task.history
        ]
        finish = task.ended_at or (now if task.status in _OPEN else task.started_at)
        bars.append(
            _bar(percent, task.attempt, task.status, task.scheduled_at, task.started_at, finish)
        )
        rows.append(Row(ref=task.ref, status=task.status, bars=bars))
    return rows


def _bar(
    percent: Callable[[datetime.datetime | None], float],
    attempt: int,
    status: str,
    scheduled: str | None,
    started: str | None,
    ended: str | None,
) -> Bar:
    first = percent(_moment(scheduled or started))
    begun = percent(_moment(started)) if started else None
    last = percent(_moment(ended)) if ended else first
    queued = (begun if begun is not None else last) - first
    took = _took(started or scheduled, ended)
    return Bar(
        attempt=attempt,
        status=status,
        left=first,
        queued=max(queued, 0.0),
        width=max(last - first, 0.4),
        title=f"attempt {attempt}: {status}{took}",
    )


def _took(start: str | None, end: str | None) -> str:
    began, ended = _moment(start), _moment(end)
    if began is None or ended is None:
        return ""
    return f", {(ended - began).total_seconds() * 1000:,.0f} ms"


def waiting(saga: Saga) -> list[TaskRecord]:
    """The WAIT tasks a signal may complete now (as the saga says; the API decides)."""
    if saga.status in TERMINAL:
        return []
    return [task for task in saga.tasks if task.type == "WAIT" and task.status in _OPEN]


def input_example(schema: dict[str, str]) -> str:
    """A workflow input to edit: each required field of ``schema`` with a placeholder of
    its type (optional ones, ``type?``, left out)."""
    example = {
        field: _EXAMPLES.get(kind) for field, kind in schema.items() if not kind.endswith("?")
    }
    return pretty(example)
