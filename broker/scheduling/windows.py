"""Calendar maths for availability windows and tariff periods. Pure: no clock, no I/O.

A window is a cron expression plus a duration, read in the owner's local wall time:
`cron = "0 22 * * *", duration = "9h"` means 22:00 to 07:00 on the wall clock, every night,
including the nights the clocks change (the night is then 8h or 10h of real time). The owner
thinks in wall time: the team arrives at 07:00 whatever the season.

Wall times that do not exist or exist twice are resolved so the broker stays on the safe side:
- a start in the spring-forward gap (02:30 on a night that jumps 02:00 -> 03:00) opens at the
  moment of the jump, once;
- an end in the gap closes at the moment of the jump;
- an ambiguous wall time (02:30 twice on the autumn night) means its first occurrence, so a
  window never runs past the owner's intended end.

Cron matching runs on naive wall times, where it is plain calendar arithmetic; only the
result is mapped to instants. All instants returned are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Protocol
from zoneinfo import ZoneInfo

from croniter import croniter

_TINY = timedelta(microseconds=1)


class WindowSpec(Protocol):
    """What a `[[windows]]` or `[[energy.tariff]]` entry provides."""

    @property
    def cron(self) -> str: ...

    @property
    def duration(self) -> timedelta: ...


@dataclass(frozen=True, order=True)
class Interval:
    """A half-open span [start, end) of real time, in UTC.

    `open_ended` marks an end that is only a lower bound: the window was still open at the
    horizon the calculation looked to.
    """

    start: datetime
    end: datetime
    open_ended: bool = False

    def __contains__(self, t: datetime) -> bool:
        return self.start <= t < self.end

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


def to_instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of a naive local wall time, resolving DST gaps and folds (see module)."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first == second:
        return first
    lo, hi = min(first, second), max(first, second)
    if _wall(lo, tz) == wall:
        return lo  # exists twice: the first occurrence
    # In a gap: the earliest instant whose wall time has reached `wall`, i.e. the jump.
    lo_s, hi_s = int(lo.timestamp()), int(hi.timestamp()) + 1
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if _wall(datetime.fromtimestamp(mid, UTC), tz) >= wall:
            hi_s = mid
        else:
            lo_s = mid
    return datetime.fromtimestamp(hi_s, UTC)


def _wall(t: datetime, tz: ZoneInfo) -> datetime:
    return t.astimezone(tz).replace(tzinfo=None)


class Recurrence:
    """One cron expression plus a duration, in one time zone."""

    def __init__(self, cron: str, duration: timedelta, tz: ZoneInfo) -> None:
        if duration <= timedelta(0):
            raise ValueError("a window needs a positive duration")
        self.cron = cron
        self.duration = duration
        self.tz = tz

    def __repr__(self) -> str:
        return f"Recurrence({self.cron!r}, {self.duration}, {self.tz.key})"

    def _interval(self, start_wall: datetime) -> Interval:
        return Interval(
            to_instant(start_wall, self.tz), to_instant(start_wall + self.duration, self.tz)
        )

    def last_started(self, t: datetime) -> Interval:
        """The occurrence with the latest start at or before `t` (possibly long over)."""
        local = t.astimezone(self.tz)
        search = local.replace(tzinfo=None, fold=0)
        if local.fold == 1:
            # `t` is in the repeated hour; starts written later on the wall may precede it.
            offset_first = local.replace(fold=0).utcoffset() or timedelta(0)
            offset_now = local.utcoffset() or timedelta(0)
            search += offset_first - offset_now
        it = croniter(self.cron, search + _TINY)
        while True:
            interval = self._interval(it.get_prev(datetime))
            if interval.start <= t:
                return interval

    def occurrences(self, t: datetime) -> Iterator[Interval]:
        """Every non-empty occurrence that has not ended by `t`, in start order, forever."""
        current = self.last_started(t)
        if current.end > t and current.end > current.start:
            yield current
        local = t.astimezone(self.tz)
        search = local.replace(tzinfo=None, fold=0)
        it = croniter(self.cron, search)
        while True:
            interval = self._interval(it.get_next(datetime))
            if interval.start <= t or interval.end <= interval.start:
                continue  # the repeated hour, or swallowed whole by a spring-forward gap
            yield interval


class Calendar:
    """The union of several recurrences: when any is open, the calendar is open.

    Overlapping or touching occurrences merge into one interval. `horizon` bounds how far
    ahead an end is looked for, so a calendar that never closes (`* * * * *` for 2h) still
    answers, with `open_ended` set.
    """

    def __init__(
        self, recurrences: Sequence[Recurrence], horizon: timedelta = timedelta(days=31)
    ) -> None:
        self.recurrences = list(recurrences)
        self.horizon = horizon

    @classmethod
    def from_config(
        cls, windows: Sequence[WindowSpec], tz: ZoneInfo, horizon: timedelta = timedelta(days=31)
    ) -> Calendar:
        return cls([Recurrence(w.cron, w.duration, tz) for w in windows], horizon)

    def is_open(self, t: datetime) -> bool:
        return any(t in r.last_started(t) for r in self.recurrences)

    def current(self, t: datetime) -> Interval | None:
        """The merged interval containing `t`, or None when closed at `t`."""
        containing = [i for i in (r.last_started(t) for r in self.recurrences) if t in i]
        if not containing:
            return None
        end, open_ended = self._merged_end(t, max(i.end for i in containing))
        start = min(i.start for i in containing)
        changed = True
        while changed and start >= t - self.horizon:
            changed = False
            for r in self.recurrences:
                # The earliest occurrence reaching `start` began at most one duration
                # before it: jump there, not one cron step back (`* * * * *` would take
                # 44,640 steps to cover the horizon).
                for earlier in r.occurrences(start - r.duration - _TINY):
                    if earlier.start >= start:
                        break
                    if earlier.end >= start:
                        start, changed = earlier.start, True
                        break
        return Interval(start, end, open_ended=open_ended)

    def end_of(self, t: datetime) -> datetime | None:
        """When the window open at `t` closes; None when closed at `t`. (Cheaper than
        `current`: the start is not looked for.)"""
        ends = [i.end for i in (r.last_started(t) for r in self.recurrences) if t in i]
        return self._merged_end(t, max(ends))[0] if ends else None

    def _merged_end(self, t: datetime, end: datetime) -> tuple[datetime, bool]:
        """Extend `end` through every occurrence that overlaps or touches it."""
        limit = t + self.horizon
        changed = True
        while changed and end <= limit:
            changed = False
            for r in self.recurrences:
                later = r.last_started(end)
                if later.end > end:
                    end, changed = later.end, True
        return end, end > limit

    def openings(self, t: datetime, count: int) -> list[Interval]:
        """The next `count` merged intervals not over by `t`; the first may contain `t`."""
        return list(islice(self._merged(t), count))

    def intervals(self, start: datetime, end: datetime) -> list[Interval]:
        """Merged intervals overlapping [start, end), clipped to it."""
        out: list[Interval] = []
        for interval in self._merged(start):
            if interval.start >= end:
                break
            out.append(Interval(max(interval.start, start), min(interval.end, end)))
            if interval.end >= end:
                break
        return out

    def _merged(self, t: datetime) -> Iterator[Interval]:
        heap: list[tuple[datetime, datetime, int]] = []
        sources = [r.occurrences(t) for r in self.recurrences]
        for index, source in enumerate(sources):
            first = next(source, None)
            if first:
                heapq.heappush(heap, (first.start, first.end, index))

        def pop() -> tuple[datetime, datetime]:
            start, end, index = heapq.heappop(heap)
            following = next(sources[index], None)
            if following:
                heapq.heappush(heap, (following.start, following.end, index))
            return start, end

        while heap:
            start, end = pop()
            limit = max(start, t) + self.horizon
            while heap and heap[0][0] <= end and end <= limit:
                end = max(end, pop()[1])
            yield Interval(start, end, open_ended=end > limit)
            if end > limit:
                return
