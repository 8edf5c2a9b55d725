"""The agenda handler, called directly: the weekly schedule hour by hour, and bad input."""

from datetime import date

import msgspec
import pytest

from kapellmeister.errors import BadRequest
from services.agenda.handlers import Activity, ActivityRequest, activity

MONDAY = "2026-11-23"
SATURDAY = "2026-11-28"
SUNDAY = "2026-11-29"

# Written out hour by hour, independently of the handler's range tables (DESIGN.md).
WEEKDAY_HOURS = ["sleep"] * 7 + ["kids"] * 2 + ["work"] * 9 + ["kids"] * 3 + ["sleep"] * 3
WEEKEND_HOURS = ["sleep"] * 9 + ["kids"] * 2 + ["free"] * 5 + ["kids"] * 3 + ["free"] * 5


async def activity_at(day: str, hour: int, suffix: str = "") -> str:
    reply = await activity(ActivityRequest(datetime=f"{day}T{hour:02d}:00:00{suffix}"))
    return reply.activity


def test_fixture_days_are_what_they_claim():
    assert date.fromisoformat(MONDAY).weekday() == 0
    assert date.fromisoformat(SATURDAY).weekday() == 5
    assert date.fromisoformat(SUNDAY).weekday() == 6
    assert len(WEEKDAY_HOURS) == len(WEEKEND_HOURS) == 24


@pytest.mark.parametrize("day", [MONDAY, "2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27"])
@pytest.mark.parametrize("hour", range(24))
async def test_every_weekday_hour(day, hour):
    assert await activity_at(day, hour) == WEEKDAY_HOURS[hour]


@pytest.mark.parametrize("day", [SATURDAY, SUNDAY])
@pytest.mark.parametrize("hour", range(24))
async def test_every_weekend_hour(day, hour):
    assert await activity_at(day, hour) == WEEKEND_HOURS[hour]


@pytest.mark.parametrize(
    ("hour", "expected"),
    [
        (6, "sleep"),
        (7, "kids"),
        (8, "kids"),
        (9, "work"),
        (17, "work"),
        (18, "kids"),
        (20, "kids"),
        (21, "sleep"),
        (23, "sleep"),
        (0, "sleep"),
    ],
)
async def test_weekday_boundaries(hour, expected):
    assert await activity_at(MONDAY, hour) == expected


@pytest.mark.parametrize(
    ("hour", "expected"),
    [
        (8, "sleep"),
        (9, "kids"),
        (10, "kids"),
        (11, "free"),
        (15, "free"),
        (16, "kids"),
        (18, "kids"),
        (19, "free"),
        (23, "free"),
    ],
)
async def test_weekend_boundaries(hour, expected):
    assert await activity_at(SUNDAY, hour) == expected


async def test_minutes_and_seconds_do_not_move_the_hour():
    reply = await activity(ActivityRequest(datetime=f"{MONDAY}T08:59:59.999999"))
    assert reply == Activity(activity="kids")


@pytest.mark.parametrize("suffix", ["Z", "+14:00", "-12:00", ".5+02:00"])
async def test_offset_is_ignored_hour_as_written(suffix):
    # The hour is the user's wall clock as written, never converted to UTC.
    assert await activity_at(MONDAY, 8, suffix) == "kids"
    assert await activity_at(SATURDAY, 12, suffix) == "free"


async def test_seed_example_from_design():
    reply = await activity(ActivityRequest(datetime="2019-04-06T12:00:00"))
    assert reply == Activity(activity="free")


@pytest.mark.parametrize(
    "text", ["2026-13-45T00:00:00", "2026-02-30T10:00:00", "2026-01-01T24:00:00"]
)
async def test_bad_calendar_date_is_bad_request(text):
    with pytest.raises(BadRequest) as info:
        await activity(ActivityRequest(datetime=text))
    assert "datetime" in info.value.message
    assert text in info.value.message
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("text", ["2026-11-23", "20261123T100000", "2026-11-23T10:00:00\n"])
async def test_handler_rechecks_the_pattern_when_called_directly(text):
    # Constructing a struct does not validate, and msgspec's `$` lets a final newline in.
    with pytest.raises(BadRequest) as info:
        await activity(ActivityRequest(datetime=text))
    assert "datetime" in info.value.message


@pytest.mark.parametrize(
    "text", ["tomorrow", "2026-11-23", "2026-11-23 10:00:00", "2026-11-23T10:00", "10:00:00"]
)
def test_pattern_violation_is_rejected_on_decode(text):
    body = msgspec.json.encode({"datetime": text})
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(body, type=ActivityRequest)
    assert "$.datetime" in str(info.value)


def test_tomorrow_is_rejected_on_decode():
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"datetime":"tomorrow"}', type=ActivityRequest)


def test_unknown_fields_are_ignored():
    req = msgspec.json.decode(
        b'{"datetime":"2026-11-23T10:00:00","user":"ada","x":1}', type=ActivityRequest
    )
    assert req == ActivityRequest(datetime="2026-11-23T10:00:00")


def test_reply_encodes_as_in_design():
    assert msgspec.json.encode(Activity(activity="free")) == b'{"activity":"free"}'
