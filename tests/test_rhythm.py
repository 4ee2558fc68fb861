"""The team's weekly rhythm (rhythm.py): visits counted per hour of the day, weekdays and
weekends apart, and how far ahead an offer may end with a visit before it unlikely."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from broker.scheduling.rhythm import VISIT_GAP, WEEK, WeeklyRhythm

START = datetime(2026, 11, 2, 12, tzinfo=UTC)  # a Monday
T0 = START.timestamp()
H = 3600.0
DAY = 86400.0


def _risk(visits: float) -> float:
    """The risk whose budget is `visits` expected visits."""
    return 1 - math.exp(-visits)


def _daily(hour: float, days: int = 8) -> WeeklyRhythm:
    """Someone comes at `hour` (UTC) every day for `days` days before Monday 12:00."""
    rhythm = WeeklyRhythm(UTC)
    rhythm.start(T0 - days * DAY)
    for day in range(days):
        rhythm.request(T0 - (days - day) * DAY - 12 * H + hour * H)
    return rhythm


def test_a_visit_is_a_request_after_ten_quiet_minutes() -> None:
    rhythm = WeeklyRhythm(UTC)
    base = T0 + 2 * H  # Monday 14:00
    rhythm.request(base)
    rhythm.request(base + VISIT_GAP)  # exactly the gap: still the same visit
    rhythm.request(base + 2 * VISIT_GAP + 1)  # more than the gap after the last: a new one
    rhythm.request(base + 2 * VISIT_GAP)  # late, out of order: it cannot open a visit
    assert rhythm.visits[14] == 2
    assert sum(rhythm.visits) == 2


def test_the_rate_pools_the_hour_over_days_of_the_same_kind() -> None:
    rhythm = _daily(19.25)  # Sunday 1 Nov .. Sunday 8 Nov, then Monday's noon
    now = T0 + 6 * H  # Monday 18:00
    # Weekday 19h: Mon-Fri of the week before (5 visits) over 5 passes and one prior pass.
    assert rhythm.rate(19, now) == 5 / 6
    # Weekend 19h (hours 5*24+19 and 6*24+19): Sat, Sun and Sun again, over 3 passes + 1.
    assert rhythm.rate(6 * 24 + 19, now) == 3 / 4
    assert rhythm.rate(5 * 24 + 19, now) == 3 / 4
    assert rhythm.rate(18, now) == 0.0  # nobody at 18h


def test_it_needs_a_week_of_record_before_it_has_an_opinion() -> None:
    rhythm = WeeklyRhythm(UTC)
    assert not rhythm.learned(T0)
    assert rhythm.quiet_until(START, 0.3, timedelta(hours=2)) is None
    rhythm.start(T0 - 7 * DAY + 1)
    assert not rhythm.learned(T0)
    rhythm.start(T0 - 7 * DAY)  # an earlier start moves learning back; a later one does not
    rhythm.start(T0)
    assert rhythm.learned(T0)
    assert rhythm.first == T0 - 7 * DAY


def test_an_offer_ends_where_a_visit_before_its_end_becomes_that_likely() -> None:
    rhythm = _daily(19.25)
    now = START + timedelta(hours=6)  # Monday 18:00; 19h has 5/6 visits an hour
    two = timedelta(hours=2)
    # a budget of 5/12 visits is half an hour of the 19h rate: the offer ends at 19:30
    assert rhythm.quiet_until(now, _risk(5 / 12), two) == START + timedelta(hours=7.5)
    # at 19:10 this Monday's 19h has begun and counts as a (so far quiet) pass: 5/7 an
    # hour, so the same budget lasts 35 minutes
    later = now + timedelta(minutes=70)
    assert rhythm.quiet_until(later, _risk(5 / 12), two) == later + timedelta(minutes=35)
    # a budget the two hours cannot use up: on to the horizon
    assert rhythm.quiet_until(now, _risk(5 / 6 + 0.01), two) == now + two
    quiet = START + timedelta(hours=9)  # 21:00, nobody ever comes
    assert rhythm.quiet_until(quiet, 0.01, two) == quiet + two


def test_quiet_ish_hours_add_up_over_the_offer() -> None:
    rhythm = WeeklyRhythm(UTC)
    rhythm.start(T0 - 8 * DAY)
    for day in range(8):  # a visit at 18:30 and one at 19:30 every day
        for hour in (18.5, 19.5):
            rhythm.request(T0 - (8 - day) * DAY - 12 * H + hour * H)
    # Monday 18:00: 18h has begun (a sixth pass, 5/7 visits an hour), 19h has 5/6
    now = START + timedelta(hours=6)
    budget = 5 / 7 + 5 / 12  # all of 18h and half of 19h
    assert rhythm.quiet_until(now, _risk(budget), timedelta(hours=2)) == now + timedelta(
        hours=1.5
    )


def test_each_hour_of_the_week_has_its_own_count_in_the_teams_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    rhythm = WeeklyRhythm(berlin)
    monday = datetime(2026, 11, 2, tzinfo=berlin).timestamp()  # Monday 00:00 in Berlin
    for hour in range(168):
        rhythm.request(monday + hour * H + 60)
    assert rhythm.visits == [1] * 168
    # 23:30 UTC on a Monday is Tuesday 00:30 in Berlin (UTC+1 in November)
    late = WeeklyRhythm(berlin)
    late.request(datetime(2026, 11, 2, 23, 30, tzinfo=UTC).timestamp())
    assert late.visits[24] == 1


def test_an_out_of_order_request_does_not_move_the_visit_clock_back() -> None:
    rhythm = WeeklyRhythm(UTC)
    base = T0 + 2 * H
    rhythm.request(base)
    rhythm.request(base - 300)  # recorded late: the last request stays `base`
    rhythm.request(base + VISIT_GAP - 100)  # within the gap of `base`: the same visit
    assert sum(rhythm.visits) == 1


def test_passes_count_from_the_hour_learning_began_in() -> None:
    # Learning began Monday 12:20:30: that Monday's 12h counts as gone by (the visits of
    # its first twenty minutes were not seen, but it is the hour learning began in).
    first = T0 + 20.5 * 60
    rhythm = WeeklyRhythm(UTC)
    rhythm.start(first)
    rhythm.visits[12] = 6  # six visits on weekdays at 12h
    # the next Monday at 11:59:50: five weekday 12h passes (Mon-Fri) + the prior
    assert rhythm.rate(12, T0 + 7 * DAY - 10) == 6 / 6
    # at 12:00:00 exactly, the new Monday's 12h has begun: a sixth pass
    assert rhythm.rate(12, T0 + 7 * DAY) == 6 / 7
    # read at 12:00:00 of the Monday learning began in, that 12h has not begun to pass:
    # no pass yet, the prior alone
    assert rhythm.rate(12, T0) == 6 / 1
    # an hour learning has not reached yet has no pass: Tuesday 12h read on Monday
    assert rhythm.rate(24 + 12, T0 + 30 * 60) == 6 / 2  # Monday's pass only, + prior


def test_saturday_midnight_starts_the_weekend() -> None:
    rhythm = WeeklyRhythm(UTC)
    rhythm.start(T0 - 8 * DAY)
    rhythm.visits[5 * 24] = 4  # Saturdays at 00h
    rhythm.visits[4 * 24] = 9  # Fridays at 00h
    now = T0
    # Saturday 00h is pooled with Sunday's (one of each gone by since Sunday 25 Oct noon),
    # not with the weekdays' (Friday's 9 visits)
    assert rhythm.rate(5 * 24, now) == rhythm.rate(6 * 24, now) == 4 / (2 + 1)


def test_a_certain_risk_still_gives_an_offer_end() -> None:
    rhythm = _daily(19.25)
    now = START + timedelta(hours=6)
    # risk 1 (out of the config's range, clamped): a huge budget, the horizon is reached
    assert rhythm.quiet_until(now, 1.0, timedelta(hours=2)) == now + timedelta(hours=2)


def test_the_budget_is_spent_hour_by_hour_from_a_time_inside_an_hour() -> None:
    rhythm = WeeklyRhythm(UTC)
    rhythm.start(T0 - 8 * DAY)
    for day in range(8):  # visits at 18:30 and 19:30 every day
        for hour in (18.5, 19.5):
            rhythm.request(T0 - (8 - day) * DAY - 12 * H + hour * H)
    now = START + timedelta(hours=6.5)  # Monday 18:30: 18h at 5/7, 19h at 5/6
    budget = 0.5 * 5 / 7 + 0.25 * 5 / 6  # the rest of 18h, a quarter of 19h
    assert rhythm.quiet_until(now, _risk(budget), timedelta(hours=2)) == START + timedelta(
        hours=7.25
    )


def test_passes_are_counted_in_the_teams_zone_not_the_machines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The broker's machine may run in another zone than the team's windows (a server kept
    # on UTC, or elsewhere): an hour of the week is the team's hour.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        berlin = ZoneInfo("Europe/Berlin")
        rhythm = WeeklyRhythm(berlin)
        monday = datetime(2026, 11, 2, tzinfo=berlin).timestamp()  # Monday 00:00 in Berlin
        rhythm.start(monday)
        assert rhythm._passes(0, monday + 1) == 1  # Monday 00h has begun once
        assert rhythm._passes(1, monday + 1) == 0  # Monday 01h not yet
        assert rhythm._passes(0, monday + WEEK + 1) == 2
    finally:
        monkeypatch.undo()
        time.tzset()
