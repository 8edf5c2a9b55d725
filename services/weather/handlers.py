"""The weather service's handler: a made-up but repeatable weather report for a date.

Owns the `weather.report` request and reply structs, the season calendar and each
season's odds (seed 000). The report is drawn from a random generator seeded by the date
alone, so the same date gives the same report on every replica, run and Python version.
The handler is a plain async function; the agent runtime decodes and encodes.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from datetime import date, datetime
from typing import Annotated, Literal, NamedTuple

import msgspec

from kapellmeister.errors import BadRequest

__all__ = ["Report", "ReportRequest", "Season", "report", "season_of"]

# A date, or a date and time as the agenda takes it. `$` rather than `\Z` keeps the
# pattern valid in JSON Schema; the handler re-checks with fullmatch.
_DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?)?$"
_DATE_RE = re.compile(_DATE_PATTERN)


class ReportRequest(msgspec.Struct, frozen=True):
    """The body of a `weather.report` request."""

    date: Annotated[
        str,
        msgspec.Meta(
            pattern=_DATE_PATTERN,
            description=(
                "The day to report on, YYYY-MM-DD. A date and time "
                "(YYYY-MM-DDTHH:MM:SS, optional fractional seconds and Z or ±HH:MM offset) "
                "is accepted too; only its date part, as written, is used."
            ),
            examples=["2019-04-02", "2019-04-06T12:00:00"],
        ),
    ]


class Report(msgspec.Struct, frozen=True):
    """The reply to `weather.report`."""

    rain: bool
    temperature: int
    snow: bool


Season = Literal["spring", "summer", "fall", "winter"]


class _Odds(NamedTuple):
    rain_above: float  # it rains when a uniform draw in [0, 1) exceeds this
    base: int  # temperature is round(base + 5 * r - 3)
    snow_above: float  # 1.0 means never: random() is always below 1


# (month, day) half-open ranges; any day outside them is winter.
_SEASONS: tuple[tuple[tuple[int, int], tuple[int, int], Season], ...] = (
    ((3, 21), (6, 21), "spring"),
    ((6, 21), (9, 21), "summer"),
    ((9, 21), (12, 21), "fall"),
)
_ODDS: dict[Season, _Odds] = {
    "spring": _Odds(rain_above=0.3, base=15, snow_above=0.8),
    "summer": _Odds(rain_above=0.8, base=25, snow_above=1.0),
    "fall": _Odds(rain_above=0.2, base=12, snow_above=1.0),
    "winter": _Odds(rain_above=0.9, base=5, snow_above=0.2),
}


def season_of(day: date) -> Season:
    """Return the season of `day`.

    The seed's Ruby uses inclusive ranges, so its boundary days (03-21, 06-21, 09-21,
    12-21) belong to two seasons and the first match wins. Here ranges are half-open:
    each boundary day starts the next season (06-21 is summer, 12-21 is winter).
    """
    month_day = (day.month, day.day)
    for start, end, season in _SEASONS:
        if start <= month_day < end:
            return season
    return "winter"


def _parse_day(text: str) -> date:
    if not _DATE_RE.fullmatch(text):
        raise BadRequest(f"date: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS, got {text!r}")
    try:
        # Parse the whole string so a bad time or offset is refused too, then keep the
        # date as written, whatever the offset.
        return datetime.fromisoformat(text).date() if "T" in text else date.fromisoformat(text)
    except ValueError as exc:
        raise BadRequest(f"date: {text!r} is not a valid date: {exc}") from exc


def _rng(day: date) -> random.Random:
    # hash() is salted per process; sha256 of the ISO date is stable everywhere, and
    # Random seeded with an int draws the same sequence on every CPython version.
    digest = hashlib.sha256(day.isoformat().encode("ascii")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


async def report(req: ReportRequest) -> Report:
    """Return the weather report for the date in `req.date`, the same every time.

    Three separate draws, in the seed's order: rain, temperature, snow.

    Raises:
        BadRequest: `date` is not of the documented form or not a real date.
    """
    day = _parse_day(req.date)
    odds = _ODDS[season_of(day)]
    rng = _rng(day)
    rain = rng.random() > odds.rain_above
    # Ruby's round goes half away from zero; the value is positive, so floor(x + 0.5).
    temperature = math.floor(odds.base + (5 * rng.random() - 3) + 0.5)
    snow = rng.random() > odds.snow_above
    return Report(rain=rain, temperature=temperature, snow=snow)
