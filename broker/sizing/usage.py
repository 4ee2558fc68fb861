"""What the ledger's demand record says about each service: requests per hour of the week,
how many GPUs its requests kept busy at once, how long requests waited, and which hours of
the week had any local use. Pure: no clock, no I/O.

"Busy GPUs" is the number of a service's requests running at once (held time excluded):
one request answering keeps one GPU busy; two at once want two GPUs to run without
queueing. It is taken per minute (the most at once in that minute) over the minutes in
which the service ran anything; p50, p95 and the peak are over those minutes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from broker.ledger.base import DemandOutcome, DemandRecord
from broker.sizing.week import HOURS_PER_WEEK, hour_of_week_at, hours_between

MINUTE = 60.0


@dataclass(frozen=True, slots=True)
class Run:
    """One request as it ran: arrival, when it started running (after any hold), end."""

    service: str
    arrival: float
    start: float
    end: float
    held_s: float
    outcome: DemandOutcome

    @property
    def refused(self) -> bool:
        return self.outcome == "refused"


def runs_of(records: Iterable[DemandRecord]) -> list[Run]:
    """Requests from the demand record. A folded record (`count` > 1) stands for `count`
    requests, spread from its first arrival one mean duration apart, each with the mean
    hold (as `gpu-broker simulate` replays them). A refused request never ran."""
    out: list[Run] = []
    for r in records:
        count = max(1, r.count)
        duration = max(0.0, r.duration_s) / count
        held = max(0.0, r.held_s) / count
        first = r.arrival.timestamp()
        for k in range(count):
            arrival = first + k * duration
            start = arrival + min(held, duration)
            end = start if r.outcome == "refused" else arrival + duration
            out.append(Run(r.service, arrival, start, end, held, r.outcome))
    out.sort(key=lambda run: run.arrival)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of `values` (0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def busy_per_minute(runs: Iterable[Run]) -> dict[int, int]:
    """Minute number -> the most requests running at once in it (minutes with none left
    out)."""
    events: list[tuple[float, int]] = []
    for run in runs:
        if run.end > run.start:
            events.append((run.start, 1))
            events.append((run.end, -1))
    events.sort()  # an end (-1) before a start (+1) at the same instant: no false overlap
    most: dict[int, int] = {}
    level = 0
    for i, (t, step) in enumerate(events):
        level += step
        if level <= 0:
            continue
        until = events[i + 1][0] if i + 1 < len(events) else t
        if until <= t:
            continue  # another event at the same instant: no time spent at this level
        for minute in range(int(t // MINUTE), math.ceil(until / MINUTE)):
            if most.get(minute, 0) < level:
                most[minute] = level
    return most


@dataclass(frozen=True)
class Busy:
    p50: float
    p95: float
    peak: int


@dataclass(frozen=True)
class Waits:
    held: int  # requests held at the gate, then passed
    refused: int  # answered 503
    p50_s: float  # over the requests that waited (held or refused)
    p95_s: float
    max_s: float
    total_h: float  # all the waiting, summed


@dataclass(frozen=True)
class ServiceUsage:
    name: str
    requests: int
    per_hour_of_week: list[float]  # mean requests in each hour of the week, Monday 00:00 first
    busy: Busy
    waits: Waits
    busy_minutes: int  # minutes in which it ran anything
    used_hours: frozenset[int]  # hours of the week in which it ran or was asked for anything


def touched_hours(runs: Iterable[Run], tz: ZoneInfo) -> set[tuple[int, float]]:
    """The wall-clock hours a request touched, from its arrival to its end, as (hour of the
    week, the hour's end): one entry per hour however many requests touched it."""
    hours: set[tuple[int, float]] = set()
    covered = -math.inf  # the end of the latest hour taken
    for run in sorted(runs, key=lambda r: r.arrival):  # runs_of's order: sorting is cheap
        end = max(run.end, run.arrival)
        # In arrival order, every hour from an earlier run's arrival to `covered` is taken:
        # a run inside them adds nothing (most do; converting each one's hours is slow).
        if run.arrival < covered and end <= covered:
            continue
        for how, hour_end in hours_between(run.arrival, end, tz):
            hours.add((how, hour_end))
            covered = max(covered, hour_end)
    return hours


def use_share(runs: Iterable[Run], hour_weeks: Sequence[int], tz: ZoneInfo) -> list[float]:
    """For each hour of the week, the share of its occurrences in the span with local use."""
    counts = [0] * HOURS_PER_WEEK
    for how, _ in touched_hours(runs, tz):
        counts[how] += 1
    return [min(1.0, n / w) if w else 0.0 for n, w in zip(counts, hour_weeks, strict=True)]


def arrivals_per_hour(
    runs: Iterable[Run], hour_weeks: Sequence[int], tz: ZoneInfo
) -> list[float]:
    """For each hour of the week, the mean number of requests that arrived in it."""
    counts = [0.0] * HOURS_PER_WEEK
    for run in runs:
        counts[hour_of_week_at(run.arrival, tz)] += 1
    return [n / w if w else 0.0 for n, w in zip(counts, hour_weeks, strict=True)]


def usage_of(
    name: str, runs: Sequence[Run], hour_weeks: Sequence[int], tz: ZoneInfo
) -> ServiceUsage:
    """`runs` are this service's; `hour_weeks[h]` how many times hour h is in the span."""
    per_hour = arrivals_per_hour(runs, hour_weeks, tz)
    minutes = busy_per_minute(runs)
    levels = list(minutes.values())
    busy = Busy(percentile(levels, 0.50), percentile(levels, 0.95), max(levels, default=0))
    waited = [run.held_s for run in runs if run.outcome != "passed"]
    waits = Waits(
        held=sum(1 for run in runs if run.outcome == "held"),
        refused=sum(1 for run in runs if run.refused),
        p50_s=percentile(waited, 0.50),
        p95_s=percentile(waited, 0.95),
        max_s=max(waited, default=0.0),
        total_h=sum(waited) / 3600,
    )
    return ServiceUsage(
        name, len(runs), per_hour, busy, waits, len(minutes),
        frozenset(how for how, _ in touched_hours(runs, tz)),
    )  # fmt: skip
