"""The team's weekly rhythm (rhythm.py): visits counted per hour of the day, weekdays and
weekends apart, and how far ahead an offer may end with a visit before it unlikely."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from broker.scheduling.rhythm import VISIT_GAP, WeeklyRhythm

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
