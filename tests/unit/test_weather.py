"""The weather handler, called directly: determinism, seasons, the seed's odds, bad input.

The reports are random but seeded by the date, so the statistical checks below are
deterministic: they either always pass or always fail, and the tolerances are several
standard deviations wide so that a correct implementation passes them with any seeding.
"""

from datetime import date, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kapellmeister.errors import BadRequest
from services.weather.handlers import Report, ReportRequest, report, season_of

# round(base + 5r - 3) for r in [0, 1) lands in [base - 3, base + 2].
TEMPERATURES = {
    "spring": range(12, 18),
    "summer": range(22, 28),
    "fall": range(9, 15),
    "winter": range(2, 8),
}
YEARS = range(2000, 2031)
# DESIGN.md's calendar, half-open; every other day is winter.
SEASONS = {"spring": ((3, 21), (6, 21)), "summer": ((6, 21), (9, 21)), "fall": ((9, 21), (12, 21))}


def expected_season(day: date) -> str:
    month_day = (day.month, day.day)
    return next((s for s, (a, b) in SEASONS.items() if a <= month_day < b), "winter")


def days(start: date, end: date) -> list[date]:
    return [start + timedelta(n) for n in range((end - start).days)]


def in_season(season: str) -> list[date]:
    """Every day of `season` across YEARS."""
    every_day = days(date(YEARS[0], 1, 1), date(YEARS[-1] + 1, 1, 1))
    return [d for d in every_day if expected_season(d) == season]


async def report_on(day: date | str) -> Report:
    text = day if isinstance(day, str) else day.isoformat()
    return await report(ReportRequest(date=text))


async def reports(season: str) -> list[Report]:
    return [await report_on(d) for d in in_season(season)]


async def test_same_date_same_report():
    assert await report_on("2019-04-02") == await report_on("2019-04-02")


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        # Computed once by this implementation; they pin the seeding (sha256 of the ISO
        # date, first 8 bytes big-endian, random.Random) across processes and versions.
        ("2019-04-02", Report(rain=False, temperature=15, snow=False)),
        ("2019-07-14", Report(rain=False, temperature=25, snow=False)),
        ("2019-12-25", Report(rain=False, temperature=3, snow=True)),
    ],
)
async def test_pinned_reports(day, expected):
    assert await report_on(day) == expected


@pytest.mark.parametrize(
    ("month_day", "season"),
    [
        ((1, 1), "winter"),
        ((3, 20), "winter"),
        ((3, 21), "spring"),
        ((6, 20), "spring"),
        ((6, 21), "summer"),
        ((9, 20), "summer"),
        ((9, 21), "fall"),
        ((12, 20), "fall"),
        ((12, 21), "winter"),
        ((12, 31), "winter"),
    ],
)
async def test_season_boundaries(month_day, season):
    month, day_of_month = month_day
    for year in YEARS:
        day = date(year, month, day_of_month)
        assert season_of(day) == season
        # Adjacent seasons have disjoint temperature ranges, so this sees the season the
        # handler actually used.
        assert (await report_on(day)).temperature in TEMPERATURES[season], day


async def test_summer_and_fall_never_snow_over_a_whole_year():
    for day in days(date(2024, 1, 1), date(2025, 1, 1)):
        reply = await report_on(day)
        if expected_season(day) in ("summer", "fall"):
            assert not reply.snow, day


@pytest.mark.parametrize(
    ("season", "rain", "snow"),
    [("spring", 0.7, 0.2), ("summer", 0.2, 0.0), ("fall", 0.8, 0.0), ("winter", 0.1, 0.8)],
)
async def test_season_odds(season, rain, snow):
    replies = await reports(season)
    assert len(replies) > 2500
    rain_fraction = sum(r.rain for r in replies) / len(replies)
    snow_fraction = sum(r.snow for r in replies) / len(replies)
    # About 2,800 days: one standard deviation is under 0.01.
    assert rain_fraction == pytest.approx(rain, abs=0.05)
    assert snow_fraction == pytest.approx(snow, abs=0.05)
    # Separate draws: rain and snow together about as often as independence predicts.
    both = sum(r.rain and r.snow for r in replies) / len(replies)
    assert both == pytest.approx(rain * snow, abs=0.04)


@pytest.mark.parametrize(
    ("season", "base"), [("spring", 15), ("summer", 25), ("fall", 12), ("winter", 5)]
)
async def test_season_temperatures(season, base):
    temperatures = [r.temperature for r in await reports(season)]
    # Every value of round(base + 5r - 3) shows up, and nothing else does.
    assert set(temperatures) == set(TEMPERATURES[season])
    # Its mean is base - 0.5: the ends of the range are half as likely as the middle.
    assert sum(temperatures) / len(temperatures) == pytest.approx(base - 0.5, abs=0.15)


@pytest.mark.parametrize(
    "suffix", ["T00:00:00", "T23:59:59", "T12:00:00.123Z", "T23:30:00-05:00", "T01:00:00+14:00"]
)
async def test_datetime_gives_its_date_part(suffix):
    assert await report_on(f"2019-04-02{suffix}") == await report_on("2019-04-02")


@pytest.mark.parametrize(
    "text",
    ["2019-13-45", "2019-02-29", "2019-04-31", "2019-04-02T25:00:00", "2019-04-02T10:00:00+24:00"],
)
async def test_bad_date_is_bad_request(text):
    with pytest.raises(BadRequest) as info:
        await report(ReportRequest(date=text))
    assert "date" in info.value.message
    assert text in info.value.message
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("text", ["2019-04-02\n", "2019/04/02", "tomorrow"])
async def test_handler_rechecks_the_pattern_when_called_directly(text):
    with pytest.raises(BadRequest) as info:
        await report(ReportRequest(date=text))
    assert "date" in info.value.message


@pytest.mark.parametrize(
    "text", ["tomorrow", "2019/04/02", "19-04-02", "2019-04-02T10:00", "2019-4-2"]
)
def test_pattern_violation_is_rejected_on_decode(text):
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(msgspec.json.encode({"date": text}), type=ReportRequest)
    assert "$.date" in str(info.value)


def test_unknown_fields_are_ignored():
    req = msgspec.json.decode(b'{"date":"2019-04-02","city":"Lyon"}', type=ReportRequest)
    assert req == ReportRequest(date="2019-04-02")


def test_reply_encodes_as_in_design():
    body = msgspec.json.encode(Report(rain=True, temperature=12, snow=False))
    assert body == b'{"rain":true,"temperature":12,"snow":false}'


@given(st.dates())
async def test_any_date_reports_within_its_season(day):
    reply = await report_on(day)
    season = expected_season(day)
    assert season_of(day) == season
    assert reply.temperature in TEMPERATURES[season]
    if season in ("summer", "fall"):
        assert not reply.snow
    assert reply == await report_on(day)
