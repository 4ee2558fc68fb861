"""Window maths, as tables of (moment, expected) in local wall time. No waiting anywhere."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.scheduling.windows import Calendar, Interval, Recurrence, to_instant

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def at(text: str, tz: ZoneInfo = BERLIN, fold: int = 0) -> datetime:
    """A local wall time as a UTC instant: at("2026-03-29 03:00")."""
    return datetime.fromisoformat(text).replace(tzinfo=tz, fold=fold).astimezone(UTC)


def local(t: datetime, tz: ZoneInfo = BERLIN) -> str:
    return t.astimezone(tz).strftime("%Y-%m-%d %H:%M%z")


def nightly(tz: ZoneInfo = BERLIN, cron: str = "0 22 * * *", hours: float = 9) -> Calendar:
    return Calendar([Recurrence(cron, timedelta(hours=hours), tz)])


@pytest.mark.parametrize(
    ("moment", "is_open", "end"),
    [
        ("2026-11-25 21:59", False, None),
        ("2026-11-25 22:00", True, "2026-11-26 07:00+0100"),  # opens on the minute
        ("2026-11-26 03:00", True, "2026-11-26 07:00+0100"),  # after midnight, same window
        ("2026-11-26 06:59", True, "2026-11-26 07:00+0100"),
        ("2026-11-26 07:00", False, None),  # half-open: closed at the end minute
        ("2026-11-26 12:00", False, None),
    ],
)
def test_midnight_spanning_window(moment: str, is_open: bool, end: str | None) -> None:
    calendar = nightly()
    t = at(moment)
    assert calendar.is_open(t) is is_open
    found = calendar.end_of(t)
    assert (local(found) if found else None) == end


def test_window_that_started_before_the_broker_counts_as_open() -> None:
    # A broker started at 05:00 is inside the window that opened at 22:00 the evening before.
    calendar = nightly()
    t = at("2026-11-26 05:00")
    current = calendar.current(t)
    assert current is not None
    assert (local(current.start), local(current.end)) == (
        "2026-11-25 22:00+0100",
        "2026-11-26 07:00+0100",
    )
    assert calendar.openings(t, 1)[0] == current


def test_next_openings_with_ends() -> None:
    openings = nightly().openings(at("2026-11-26 12:00"), 3)
    assert [(local(i.start), local(i.end)) for i in openings] == [
        ("2026-11-26 22:00+0100", "2026-11-27 07:00+0100"),
        ("2026-11-27 22:00+0100", "2026-11-28 07:00+0100"),
        ("2026-11-28 22:00+0100", "2026-11-29 07:00+0100"),
    ]


def test_overlapping_windows_merge() -> None:
    calendar = Calendar(
        [
            Recurrence("0 22 * * *", timedelta(hours=9), BERLIN),  # 22:00-07:00 nightly
            Recurrence("0 6 * * 6", timedelta(hours=4), BERLIN),  # Saturday 06:00-10:00
            Recurrence("0 10 * * 6", timedelta(hours=2), BERLIN),  # touches: 10:00-12:00
        ]
    )
    # 2026-11-28 is a Saturday.
    friday_night = at("2026-11-27 23:00")
    assert local(calendar.end_of(friday_night) or friday_night) == "2026-11-28 12:00+0100"
    openings = calendar.openings(at("2026-11-27 12:00"), 2)
    assert [(local(i.start), local(i.end)) for i in openings] == [
        ("2026-11-27 22:00+0100", "2026-11-28 12:00+0100"),
        ("2026-11-28 22:00+0100", "2026-11-29 07:00+0100"),
    ]


def test_window_spanning_days() -> None:
    weekend = Calendar([Recurrence("0 18 * * 5", timedelta(hours=62), BERLIN)])
    assert weekend.is_open(at("2026-11-29 12:00"))  # Sunday noon
    assert local(weekend.end_of(at("2026-11-28 00:00")) or at("2000-01-01")) == (
        "2026-11-30 08:00+0100"
    )
    assert not weekend.is_open(at("2026-11-30 08:00"))
    assert not weekend.is_open(at("2026-11-27 17:59"))


# -- daylight saving time (Europe/Berlin: 2026-03-29 02:00 -> 03:00, 2026-10-25 03:00 -> 02:00)


def test_spring_forward_window_in_the_gap_opens_once_at_the_jump() -> None:
    calendar = nightly(cron="30 2 * * *", hours=1)  # 02:30-03:30 every night
    openings = calendar.openings(at("2026-03-28 12:00"), 2)
    assert [(local(i.start), local(i.end)) for i in openings] == [
        # 02:30 does not exist that night: it opens when the clock jumps, 03:00 CEST.
        ("2026-03-29 03:00+0200", "2026-03-29 03:30+0200"),
        ("2026-03-30 02:30+0200", "2026-03-30 03:30+0200"),
    ]
    assert not calendar.is_open(at("2026-03-29 01:59"))
    assert calendar.is_open(at("2026-03-29 03:00"))
    assert calendar.is_open(at("2026-03-29 03:29"))
    assert not calendar.is_open(at("2026-03-29 03:30"))


def test_window_swallowed_by_the_gap_is_skipped() -> None:
    calendar = nightly(cron="10 2 * * *", hours=0.5)  # 02:10-02:40: all inside the gap
    opening = calendar.openings(at("2026-03-28 12:00"), 1)[0]
    assert local(opening.start) == "2026-03-30 02:10+0200"


def test_nightly_window_across_spring_forward_keeps_wall_clock_end() -> None:
    calendar = nightly()
    current = calendar.current(at("2026-03-29 01:00"))
    assert current is not None
    assert (local(current.start), local(current.end)) == (
        "2026-03-28 22:00+0100",
        "2026-03-29 07:00+0200",
    )
    assert current.duration == timedelta(hours=8)  # one hour less of real time


def test_nine_hour_window_across_the_autumn_change() -> None:
    calendar = nightly()
    current = calendar.current(at("2026-10-25 02:30", fold=1))  # in the repeated hour
    assert current is not None
    assert (local(current.start), local(current.end)) == (
        "2026-10-24 22:00+0200",
        "2026-10-25 07:00+0100",
    )
    assert current.duration == timedelta(hours=10)  # one hour more of real time
    for moment, fold in [("02:30", 0), ("02:30", 1), ("06:59", 0)]:
        assert calendar.is_open(at(f"2026-10-25 {moment}", fold=fold))
    assert not calendar.is_open(at("2026-10-25 07:00"))


def test_ambiguous_start_and_end_use_the_first_occurrence() -> None:
    # 02:30-02:45 on the autumn night happens twice on the wall; the window runs only once.
    calendar = nightly(cron="30 2 * * *", hours=0.25)
    opening = calendar.openings(at("2026-10-25 00:00"), 2)
    assert [(local(i.start), local(i.end)) for i in opening] == [
        ("2026-10-25 02:30+0200", "2026-10-25 02:45+0200"),
        ("2026-10-26 02:30+0100", "2026-10-26 02:45+0100"),
    ]
    assert calendar.is_open(at("2026-10-25 02:40", fold=0))
    assert not calendar.is_open(at("2026-10-25 02:40", fold=1))


def test_window_opening_in_the_repeated_hour_seen_from_the_second_pass() -> None:
    # At 02:15 CET (second pass) the 02:30 CEST start, an hour of real time ago... no:
    # 02:30 CEST is 00:30 UTC and 02:15 CET is 01:15 UTC, so the window opened 45 min ago.
    calendar = nightly(cron="30 2 * * *", hours=1)  # 02:30 CEST -> 03:30 CET wall
    t = at("2026-10-25 02:15", fold=1)
    current = calendar.current(t)
    assert current is not None
    assert local(current.start) == "2026-10-25 02:30+0200"
    assert local(current.end) == "2026-10-25 03:30+0100"


def test_new_york_dst_changes() -> None:
    calendar = Calendar([Recurrence("0 20 * * *", timedelta(hours=12), NEW_YORK)])
    spring = calendar.current(at("2026-03-08 04:00", NEW_YORK))
    autumn = calendar.current(at("2026-11-01 04:00", NEW_YORK))
    assert spring is not None and autumn is not None
    assert spring.duration == timedelta(hours=11)
    assert autumn.duration == timedelta(hours=13)
    assert local(spring.end, NEW_YORK) == "2026-03-08 08:00-0400"
    assert local(autumn.end, NEW_YORK) == "2026-11-01 08:00-0500"


@pytest.mark.parametrize(
    ("wall", "expected_utc"),
    [
        ("2026-03-29 01:59", "2026-03-29 00:59"),
        ("2026-03-29 02:00", "2026-03-29 01:00"),  # in the gap: the jump
        ("2026-03-29 02:59", "2026-03-29 01:00"),
        ("2026-03-29 03:00", "2026-03-29 01:00"),
        ("2026-10-25 02:30", "2026-10-25 00:30"),  # twice: the first
        ("2026-10-25 03:00", "2026-10-25 02:00"),
    ],
)
def test_to_instant(wall: str, expected_utc: str) -> None:
    result = to_instant(datetime.fromisoformat(wall), BERLIN)
    assert result == datetime.fromisoformat(expected_utc).replace(tzinfo=UTC)


def test_calendar_that_never_closes_answers_with_an_open_end() -> None:
    calendar = Calendar(
        [Recurrence("0 * * * *", timedelta(hours=2), BERLIN)], horizon=timedelta(days=2)
    )
    t = at("2026-11-26 12:30")
    current = calendar.current(t)
    assert current is not None and current.open_ended
    assert current.end >= t + timedelta(days=2)
    [only] = calendar.openings(t, 3)
    assert only.open_ended


def test_no_windows_is_never_open() -> None:
    calendar = Calendar([])
    t = at("2026-11-26 12:00")
    assert not calendar.is_open(t)
    assert calendar.current(t) is None
    assert calendar.openings(t, 5) == []


def test_intervals_are_clipped_to_the_range() -> None:
    calendar = nightly()
    got = calendar.intervals(at("2026-11-26 00:00"), at("2026-11-27 00:00"))
    assert got == [
        Interval(at("2026-11-26 00:00"), at("2026-11-26 07:00")),
        Interval(at("2026-11-26 22:00"), at("2026-11-27 00:00")),
    ]


CRONS = ["0 22 * * *", "30 2 * * *", "*/20 * * * *", "0 9 * * 6,0", "15 1 1 * *", "0 0 * * 1"]


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(CRONS), st.integers(min_value=5, max_value=60 * 30)),
        min_size=1,
        max_size=3,
    ),
    offset_minutes=st.integers(min_value=0, max_value=60 * 24 * 400),
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"]),
)
def test_is_open_agrees_with_openings_and_current(
    specs: list[tuple[str, int]], offset_minutes: int, zone: str
) -> None:
    tz = ZoneInfo(zone)
    calendar = Calendar(
        [Recurrence(cron, timedelta(minutes=m), tz) for cron, m in specs],
        horizon=timedelta(days=10),
    )
    t = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=offset_minutes, seconds=17)
    current = calendar.current(t)
    openings = calendar.openings(t, 3)
    assert (current is not None) == calendar.is_open(t)
    if current is not None:
        assert t in current
        assert openings[0].start <= t < openings[0].end
        assert openings[0].end == current.end or current.open_ended or openings[0].open_ended
        if not current.open_ended:
            assert not calendar.is_open(current.end)
            assert calendar.is_open(current.end - timedelta(seconds=1))
    for earlier, later in pairwise(openings):
        assert earlier.end < later.start  # merged: a real gap between openings
    for interval in openings:
        assert interval.end > t
        if interval.start > t:
            assert calendar.is_open(interval.start)
            assert not calendar.is_open(interval.start - timedelta(seconds=1))
