"""The price and carbon intensity of a kWh at any moment: a default plus time-of-use periods.

Periods are windows (cron + duration, local wall time) with their own price. Where periods
overlap, the one listed first in the config wins, so a specific period ("Sunday nights")
goes above a general one ("every night").
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

from broker.config import EnergySection
from broker.scheduling.windows import Interval, Recurrence


@dataclass(frozen=True)
class Rate:
    price_per_kwh: float
    carbon_g_per_kwh: float
    period: int | None  # index into [[energy.tariff]]; None for the default rate


@dataclass(frozen=True)
class RateSegment:
    interval: Interval
    rate: Rate


class TariffSchedule:
    def __init__(self, default: Rate, periods: Sequence[tuple[Recurrence, Rate]]) -> None:
        self.default = default
        self.periods = list(periods)

    @classmethod
    def from_config(cls, energy: EnergySection, tz: ZoneInfo) -> TariffSchedule:
        default = Rate(energy.price_per_kwh, energy.carbon_g_per_kwh, None)
        periods = [
            (
                Recurrence(t.cron, t.duration, tz),
                Rate(
                    t.price_per_kwh,
                    energy.carbon_g_per_kwh if t.carbon_g_per_kwh is None else t.carbon_g_per_kwh,
                    index,
                ),
            )
            for index, t in enumerate(energy.tariff)
        ]
        return cls(default, periods)

    def rate_at(self, t: datetime) -> Rate:
        for recurrence, rate in self.periods:
            if t in recurrence.last_started(t):
                return rate
        return self.default

    def segments(self, start: datetime, end: datetime) -> list[RateSegment]:
        """[start, end) cut wherever the rate changes, each piece with its rate.

        Each period's occurrences are listed once; the rate of a piece is then found as
        `rate_at` would (the latest-started occurrence of the first period containing it)
        by bisection, not by asking croniter again at every cut: a year of a daily
        night rate is a few hundred cron steps instead of thousands.
        """
        if end <= start:
            return []
        cuts = {start, end}
        found: list[tuple[list[datetime], list[Interval], Rate]] = []
        for recurrence, rate in self.periods:
            occurrences: list[Interval] = []
            for interval in recurrence.occurrences(start):
                if interval.start >= end:
                    break
                occurrences.append(interval)
                cuts.update(t for t in (interval.start, interval.end) if start < t < end)
            found.append(([i.start for i in occurrences], occurrences, rate))

        def rate_at(t: datetime) -> Rate:
            for starts, occurrences, rate in found:
                k = bisect.bisect_right(starts, t) - 1
                if k >= 0 and t < occurrences[k].end:
                    return rate
            return self.default

        out: list[RateSegment] = []
        for a, b in pairwise(sorted(cuts)):
            rate = rate_at(a)
            if out and out[-1].rate == rate:
                out[-1] = RateSegment(Interval(out[-1].interval.start, b), rate)
            else:
                out.append(RateSegment(Interval(a, b), rate))
        return out

    def upcoming(self, t: datetime, count: int) -> list[RateSegment]:
        """The next `count` spans with a non-default rate not over by `t` (for `windows`)."""
        out: list[RateSegment] = []
        span = timedelta(days=8)
        # A period in force now is shown from its real start, not from `t`.
        start = min(
            (r.last_started(t).start for r, _ in self.periods if t in r.last_started(t)),
            default=t,
        )
        while len(out) < count and start < t + timedelta(days=366):
            out.extend(s for s in self.segments(start, start + span) if s.rate.period is not None)
            start += span
        merged: list[RateSegment] = []
        for segment in out:
            if merged and merged[-1].rate == segment.rate and (
                merged[-1].interval.end == segment.interval.start
            ):
                merged[-1] = RateSegment(
                    Interval(merged[-1].interval.start, segment.interval.end), segment.rate
                )
            else:
                merged.append(segment)
        return merged[:count]
