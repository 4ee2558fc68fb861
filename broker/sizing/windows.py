"""Suggested `[[windows]]` from the hours of the week the team never used. Pure.

A run of free hours becomes a window: a cron at its first hour on each weekday it starts,
and its length. Runs of the same start hour and length on several days share one entry
(`0 22 * * 1-4` with `9h`). The week wraps: Sunday night runs on into Monday morning.
Runs shorter than `min_hours` are left out: a renter wants some hours, and the broker
spends `idle_window` and a drain before it lists.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from broker.scheduling.windows import Calendar, WindowSpec
from broker.sizing.week import HOURS_PER_WEEK, hour_starts

DEFAULT_MIN_HOURS = 2


@dataclass(frozen=True)
class Run:
    start: int  # hour of the week (0 = Monday 00:00)
    hours: int


@dataclass(frozen=True)
class SuggestedWindow:
    cron: str
    duration: str  # as the config writes it: "9h", "2d7h"
    hour: int  # the hour of the day it starts at
    hours: int  # its length, in hours
    days: tuple[int, ...]  # the weekdays it starts on (0 = Monday)

    @property
    def hours_per_week(self) -> int:
        return self.hours * len(self.days)

    def hours_of_week(self) -> set[int]:
        starts = [day * 24 + self.hour for day in self.days]
        return {(start + k) % HOURS_PER_WEEK for start in starts for k in range(self.hours)}


def free_runs(used: Collection[int], min_hours: int = DEFAULT_MIN_HOURS) -> list[Run]:
    """Maximal runs of consecutive unused hours around the (cyclic) week, at least
    `min_hours` long, by start hour."""
    free = [h not in used for h in range(HOURS_PER_WEEK)]
    if all(free):
        return [Run(0, HOURS_PER_WEEK)]
    # Start scanning just after a used hour, so no run is cut at the week's end.
    first_used = free.index(False)
    runs: list[Run] = []
    length = 0
    start = 0
    for k in range(1, HOURS_PER_WEEK + 1):
        h = (first_used + k) % HOURS_PER_WEEK
        if free[h]:
            if length == 0:
                start = h
            length += 1
        else:
            if length >= min_hours:
                runs.append(Run(start, length))
            length = 0
    return sorted(runs, key=lambda run: run.start)


def _cron_days(days: Iterable[int]) -> str:
    """Weekdays (0 = Monday) as a cron day-of-week field (0 = Sunday), ranges folded."""
    numbers = sorted((d + 1) % 7 for d in days)
    if len(numbers) == 7:
        return "*"
    parts: list[str] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{numbers[i]}-{numbers[j]}")
        else:
            parts.extend(str(n) for n in numbers[i : j + 1])
        i = j + 1
    return ",".join(parts)


def _duration_text(hours: int) -> str:
    days, rest = divmod(hours, 24)
    if days and rest:
        return f"{days}d{rest}h"
    return f"{days}d" if days else f"{rest}h"


def suggest(used: Collection[int], min_hours: int = DEFAULT_MIN_HOURS) -> list[SuggestedWindow]:
    """Windows covering exactly the free runs of at least `min_hours`."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for run in free_runs(used, min_hours):
        day, hour = divmod(run.start, 24)
        by_shape.setdefault((hour, run.hours), []).append(day)
    out = [
        SuggestedWindow(f"0 {hour} * * {_cron_days(days)}", _duration_text(hours), hour, hours,
                        tuple(sorted(days)))
        for (hour, hours), days in by_shape.items()
    ]  # fmt: skip
    return sorted(out, key=lambda w: (w.days[0] * 24 + w.hour, w.hours))


def window_hours(windows: Iterable[WindowSpec], tz: ZoneInfo, week_start: datetime) -> set[int]:
    """Hours of the week that `windows` cover wholly, on the week from `week_start` (a local
    Monday 00:00 is best; any instant works)."""
    calendar = Calendar.from_config(list(windows), tz)
    end = week_start + timedelta(days=7)
    covered: set[int] = set()
    for interval in calendar.intervals(week_start, end):
        a, b = interval.start.timestamp(), min(interval.end, end).timestamp()
        for how, t in hour_starts(a, b, tz):
            if t + 3600 <= b + 1e-6:  # the whole hour inside
                covered.add(how)
    return covered

