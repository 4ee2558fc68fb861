"""The hours of the week in the owner's local wall time: Monday 00:00-01:00 is hour 0,
Sunday 23:00-24:00 hour 167. Windows are read in wall time too (scheduling/windows.py),
so an hour of the week the team never used is the same wall-clock hour in a window.
Pure: no clock, no I/O."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from broker.scheduling.windows import to_instant

HOURS_PER_WEEK = 168
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def hour_of_week(t: datetime, tz: ZoneInfo) -> int:
    local = t.astimezone(tz)
    return local.weekday() * 24 + local.hour


def hour_of_week_at(t: float, tz: ZoneInfo) -> int:
    """`hour_of_week` of POSIX seconds."""
    return hour_of_week(datetime.fromtimestamp(t, UTC), tz)


def _next_hour(t: float, tz: ZoneInfo) -> float:
    """The instant the wall clock next reaches a full hour after `t`."""
    wall = datetime.fromtimestamp(t, tz).replace(minute=0, second=0, microsecond=0, tzinfo=None)
    nxt = to_instant(wall + timedelta(hours=1), tz).timestamp()
    # A fold (the same wall hour twice) maps back to its first occurrence: step past it.
    return nxt if nxt > t else t + 3600.0


def hours_between(start: float, end: float, tz: ZoneInfo) -> Iterator[tuple[int, float]]:
    """Every wall-clock hour that [start, end) touches (POSIX seconds), in order: its hour
    of the week, and the instant it ends (which tells one week's Monday 09:00 from the
    next's). A moment (start == end) touches its own hour."""
    t = start
    while True:
        how = hour_of_week(datetime.fromtimestamp(t, UTC), tz)
        t = _next_hour(t, tz)
        yield how, t
        if t >= end:
            return


def hour_starts(a: float, b: float, tz: ZoneInfo) -> Iterator[tuple[int, float]]:
    """(hour of the week, start) of each wall-clock hour that starts in [a, b)."""
    at = datetime.fromtimestamp(a, tz)
    t = a if (at.minute, at.second, at.microsecond) == (0, 0, 0) else _next_hour(a, tz)
    while t < b:
        yield hour_of_week_at(t, tz), t
        t = _next_hour(t, tz)


def hour_counts(start: datetime, end: datetime, tz: ZoneInfo) -> list[int]:
    """How many times each hour of the week begins in [start, end): the number of weeks the
    span holds of that hour (a partial hour at either edge counts)."""
    counts = [0] * HOURS_PER_WEEK
    if end <= start:
        return counts
    for how, _ in hours_between(start.timestamp(), end.timestamp(), tz):
        counts[how] += 1
    return counts


def grid(values: list[float]) -> list[list[float]]:
    """168 values as 7 rows (Monday first) of 24 hours."""
    return [values[d * 24 : (d + 1) * 24] for d in range(7)]
