"""Report periods in the owner's local time: calendar days, ISO weeks, calendar months.

A day is a local calendar day, so the day the clocks change is 23 or 25 hours of real time;
a week starts on Monday (ISO 8601, labelled `2026-W48`); a month is a calendar month. All
instants are timezone-aware; boundaries are local midnights mapped to UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from broker.scheduling.windows import to_instant

By = Literal["day", "week", "month"]
BY_CHOICES: tuple[By, ...] = ("day", "week", "month")

When = date | datetime
"""What `--since` / `--until` take: a local date, or a date-time (local unless it has an
offset)."""


@dataclass(frozen=True)
class Period:
    label: str  # 2026-11-25, 2026-W48 or 2026-11
    start: datetime  # inclusive
    end: datetime  # exclusive


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """The instant a local calendar day begins (where midnight is skipped, when it opens)."""
    return to_instant(datetime.combine(day, time()), tz)


def _bounds(day: date, by: By) -> tuple[date, date, str]:
    """The period containing `day`: its first day, the first day after it, its label."""
    if by == "day":
        return day, day + timedelta(days=1), day.isoformat()
    if by == "week":
        monday = day - timedelta(days=day.weekday())
        year, week, _ = day.isocalendar()
        return monday, monday + timedelta(days=7), f"{year}-W{week:02d}"
    first = day.replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return first, following, f"{first.year}-{first.month:02d}"


def periods(since: datetime, until: datetime, by: By, tz: ZoneInfo) -> list[Period]:
    """The periods covering [since, until), the first and last clipped to it."""
    out: list[Period] = []
    day = since.astimezone(tz).date()
    while True:
        first, following, label = _bounds(day, by)
        start, end = local_midnight(first, tz), local_midnight(following, tz)
        if start >= until:
            return out
        if end > since:
            out.append(Period(label, max(start, since), min(end, until)))
        day = following


def default_since(now: datetime, by: By, tz: ZoneInfo) -> datetime:
    """The start of the default range: the last 7 days, 8 weeks or 12 months, counting the
    current one."""
    today = now.astimezone(tz).date()
    if by == "day":
        first = today - timedelta(days=6)
    elif by == "week":
        first = today - timedelta(days=today.weekday(), weeks=7)
    else:
        months = today.year * 12 + today.month - 1 - 11
        first = date(months // 12, months % 12 + 1, 1)
    return local_midnight(first, tz)


def parse_when(text: str) -> When:
    """`2026-11-25` (a local date) or an ISO date-time such as `2026-11-25T18:00`,
    `2026-11-25 18:00+01:00` or `2026-11-25T17:00Z`."""
    value = text.strip()
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f'expected a date like 2026-11-25 or a date-time like 2026-11-25T18:00, got "{text}"'
        ) from None


def resolve_when(when: When, tz: ZoneInfo, *, end: bool = False) -> datetime:
    """The instant `when` names. A date is its local midnight, or with `end` (for
    `--until`) the midnight after it, so the day itself is included."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            return to_instant(when, tz)
        return when.astimezone(UTC)
    return local_midnight(when + timedelta(days=1) if end else when, tz)
