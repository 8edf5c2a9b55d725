"""The agenda service's handler: what the user is doing at a given hour of the week.

Owns the `agenda.activity` request and reply structs and the weekly schedule (seed 000,
read as half-open hour ranges, Saturday and Sunday being the weekend). The handler is a
plain async function; the agent runtime decodes the request and encodes the reply.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from kapellmeister.errors import BadRequest

__all__ = ["Activity", "ActivityName", "ActivityRequest", "activity"]

ActivityName = Literal["sleep", "kids", "work", "free"]

# ISO 8601 local date and time, optional fractional seconds and UTC offset. `$` rather
# than `\Z` keeps the pattern valid in JSON Schema; the handler re-checks with fullmatch,
# which also rejects the trailing newline `$` lets through.
_DATETIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$"
_DATETIME_RE = re.compile(_DATETIME_PATTERN)


class ActivityRequest(msgspec.Struct, frozen=True):
    """The body of an `agenda.activity` request."""

    datetime: Annotated[
        str,
        msgspec.Meta(
            pattern=_DATETIME_PATTERN,
            description=(
                "Local date and time, YYYY-MM-DDTHH:MM:SS with optional fractional seconds "
                "and Z or ±HH:MM offset. The hour is read as written; the offset is ignored."
            ),
            examples=["2019-04-06T12:00:00"],
        ),
    ]


class Activity(msgspec.Struct, frozen=True):
    """The reply to `agenda.activity`."""

    activity: ActivityName


_Schedule = tuple[tuple[int, int, ActivityName], ...]

# [start, end) hour ranges; together they must tile the day exactly.
_WEEKDAY: _Schedule = (
    (0, 7, "sleep"),
    (7, 9, "kids"),
    (9, 18, "work"),
    (18, 21, "kids"),
    (21, 24, "sleep"),
)
_WEEKEND: _Schedule = (
    (0, 9, "sleep"),
    (9, 11, "kids"),
    (11, 16, "free"),
    (16, 19, "kids"),
    (19, 24, "free"),
)


def _by_hour(schedule: _Schedule) -> tuple[ActivityName, ...]:
    """Expand a schedule to one entry per hour, failing at import if it does not tile 0-24."""
    hours: list[ActivityName] = []
    for start, end, name in schedule:
        if start != len(hours) or end <= start:
            raise ValueError(f"schedule range [{start}, {end}) leaves a gap or overlaps")
        hours.extend([name] * (end - start))
    if len(hours) != 24:
        raise ValueError(f"schedule covers {len(hours)} hours, not 24")
    return tuple(hours)


_WEEKDAY_HOURS = _by_hour(_WEEKDAY)
_WEEKEND_HOURS = _by_hour(_WEEKEND)
# Indexed by datetime.weekday(): Monday is 0, Saturday 5, Sunday 6.
_BY_WEEKDAY = (_WEEKDAY_HOURS,) * 5 + (_WEEKEND_HOURS,) * 2


async def activity(req: ActivityRequest) -> Activity:
    """Return what the schedule says the user does at the hour of `req.datetime`.

    Raises:
        BadRequest: `datetime` is not of the documented form or not a real date and time.
    """
    if not _DATETIME_RE.fullmatch(req.datetime):
        raise BadRequest(f"datetime: expected YYYY-MM-DDTHH:MM:SS, got {req.datetime!r}")
    try:
        when = datetime.fromisoformat(req.datetime)
    except ValueError as exc:
        raise BadRequest(f"datetime: {req.datetime!r} is not a valid date and time: {exc}") from exc
    return Activity(activity=_BY_WEEKDAY[when.weekday()][when.hour])
