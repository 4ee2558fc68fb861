from __future__ import annotations

import bisect
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

from broker.config import EnergySection
from broker.scheduling.tariffs import TariffSchedule

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, fold: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN, fold=fold).astimezone(UTC)


def schedule(*tariffs: dict[str, object]) -> TariffSchedule:
    energy = EnergySection.model_validate(
        {"price_per_kwh": 0.30, "carbon_g_per_kwh": 380, "tariff": list(tariffs)}
    )
    return TariffSchedule.from_config(energy, BERLIN)


NIGHT = {"cron": "0 23 * * *", "duration": "7h", "price_per_kwh": 0.18}


def test_rate_at_follows_the_night_period() -> None:
    s = schedule(NIGHT)
    assert s.rate_at(at("2026-11-25 22:59")).price_per_kwh == 0.30
    assert s.rate_at(at("2026-11-25 23:00")).price_per_kwh == 0.18
    assert s.rate_at(at("2026-11-26 05:59")).price_per_kwh == 0.18
    assert s.rate_at(at("2026-11-26 06:00")).price_per_kwh == 0.30
    assert s.rate_at(at("2026-11-26 03:00")).carbon_g_per_kwh == 380  # inherited


def test_segments_cut_at_the_23_00_change() -> None:
    s = schedule(NIGHT)
    segments = s.segments(at("2026-11-25 22:00"), at("2026-11-26 01:00"))
    assert [(x.interval.start, x.interval.end, x.rate.price_per_kwh) for x in segments] == [
        (at("2026-11-25 22:00"), at("2026-11-25 23:00"), 0.30),
        (at("2026-11-25 23:00"), at("2026-11-26 01:00"), 0.18),
    ]


def test_a_whole_day_costs_what_a_hand_computation_says() -> None:
    s = schedule(NIGHT)
    day = s.segments(at("2026-11-26 00:00"), at("2026-11-27 00:00"))
    # 1 kW all day: 00-06 night (6h), 06-23 day (17h), 23-24 night (1h).
    cost = sum(x.rate.price_per_kwh * x.interval.duration / timedelta(hours=1) for x in day)
    assert round(cost, 6) == round(7 * 0.18 + 17 * 0.30, 6)


def test_dst_day_has_23_hours_and_the_night_rate_keeps_wall_times() -> None:
    s = schedule(NIGHT)
    day = s.segments(at("2026-03-29 00:00"), at("2026-03-30 00:00"))
    assert sum((x.interval.duration for x in day), timedelta()) == timedelta(hours=23)
    night = [x for x in day if x.rate.price_per_kwh == 0.18]
    # 00:00-06:00 wall is 5h of real time that night; 23:00-24:00 is 1h.
    assert [x.interval.duration for x in night] == [timedelta(hours=5), timedelta(hours=1)]


def test_first_listed_period_wins_where_periods_overlap() -> None:
    sunday = {
        "cron": "0 0 * * 0",
        "duration": "1d",
        "price_per_kwh": 0.05,
        "carbon_g_per_kwh": 20,
    }
    s = schedule(sunday, NIGHT)
    assert s.rate_at(at("2026-11-29 03:00")).price_per_kwh == 0.05  # Sunday night
    assert s.rate_at(at("2026-11-29 03:00")).carbon_g_per_kwh == 20
    assert s.rate_at(at("2026-11-30 03:00")).price_per_kwh == 0.18  # Monday night


def test_upcoming_lists_periods_merged() -> None:
    s = schedule(NIGHT)
    upcoming = s.upcoming(at("2026-11-26 12:00"), 3)
    assert [(x.interval.start, x.interval.end) for x in upcoming] == [
        (at("2026-11-26 23:00"), at("2026-11-27 06:00")),
        (at("2026-11-27 23:00"), at("2026-11-28 06:00")),
        (at("2026-11-28 23:00"), at("2026-11-29 06:00")),
    ]


def test_without_periods_one_default_segment() -> None:
    s = schedule()
    [only] = s.segments(at("2026-11-26 00:00"), at("2026-11-27 00:00"))
    assert only.rate.price_per_kwh == 0.30 and only.rate.period is None
    assert s.segments(at("2026-11-26 00:00"), at("2026-11-26 00:00")) == []


def test_segments_agree_with_rate_at_over_a_year_of_overlapping_periods() -> None:
    # Sunday 02:30 (in the spring gap on 03-29, twice on 10-25) above weekend middays above
    # the night rate above an early-morning rate that the night partly hides.
    sunday = {"cron": "30 2 * * 0", "duration": "30m", "price_per_kwh": 0.05}
    weekend = {"cron": "0 11 * * 6,0", "duration": "4h", "price_per_kwh": 0.12}
    early = {"cron": "30 5 * * *", "duration": "90m", "price_per_kwh": 0.15}
    s = schedule(sunday, weekend, NIGHT, early)
    start, end = at("2026-01-01 00:00"), at("2027-01-01 00:00")
    segments = s.segments(start, end)
    assert segments[0].interval.start == start and segments[-1].interval.end == end
    for before, after in pairwise(segments):
        assert before.interval.end == after.interval.start
        assert before.rate != after.rate
    second = timedelta(seconds=1)
    # rate_at asks croniter every time (a millisecond): check a sample, edges and insides.
    points = {x.interval.start + d for x in segments[::7] for d in (-second, second)}
    points.update(start + timedelta(minutes=1033 * n) for n in range(509))  # every 17h13
    for dst in (at("2026-03-28 12:00"), at("2026-10-24 12:00")):
        points.update(dst + timedelta(minutes=29 * n) for n in range(100))  # 2 days, 29 min
        points.update(
            x.interval.start + d
            for x in segments
            if dst <= x.interval.start < dst + timedelta(days=2)
            for d in (-second, second)
        )
    starts = [x.interval.start for x in segments]
    for t in sorted(p for p in points if start <= p < end):
        piece = segments[bisect.bisect_right(starts, t) - 1]
        assert t in piece.interval
        assert piece.rate == s.rate_at(t), t
