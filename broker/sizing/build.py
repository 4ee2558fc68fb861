"""Read what sizing needs from the ledger and put the figures together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from broker.config import Config
from broker.ledger.base import DemandRecord, Ledger, ModelLoad
from broker.scheduling.windows import to_instant
from broker.sizing.usage import Run, ServiceUsage, runs_of, usage_of, use_share
from broker.sizing.verdict import (
    GpuSizing,
    OwnGpu,
    SharedGpu,
    needs,
    own_gpu,
    per_gpu,
    reloads_per_day,
    rule_of_thumb,
    shared_gpus,
)
from broker.sizing.week import HOURS_PER_WEEK, grid, hour_counts
from broker.sizing.windows import DEFAULT_MIN_HOURS, SuggestedWindow, suggest, window_hours

DEFAULT_SPAN = timedelta(days=28)


@dataclass(frozen=True)
class ServiceSizing:
    usage: ServiceUsage
    gpus: tuple[int, ...]  # configured
    reloads_per_day: float
    needs_gpus: int


@dataclass(frozen=True)
class Sizing:
    start: datetime
    end: datetime
    timezone: str
    services: list[ServiceSizing]
    gpus: list[GpuSizing]
    shared: list[SharedGpu]
    own_gpu: list[OwnGpu]
    gpus_needed: int
    gpus_present: int
    team_size: int | None
    rule_of_thumb: int | None
    local_use: list[float]  # share of each hour of the week's occurrences with local use
    unseen_hours: int  # hours of the week the span does not hold (counted as used)
    suggested: list[SuggestedWindow]
    configured_hours: frozenset[int]  # hours of the week the configured windows cover
    used_hours: frozenset[int]  # hours of the week the windows leave out: used, or not seen
    max_use_share: float

    @property
    def suggested_hours(self) -> frozenset[int]:
        return frozenset(h for w in self.suggested for h in w.hours_of_week())

    @property
    def extra_rentable_hours(self) -> int:
        """Hours a week the suggested windows add to the configured ones."""
        return len(self.suggested_hours - self.configured_hours)

    @property
    def configured_hours_used(self) -> int:
        """Hours of the week inside a configured window in which the team used the GPUs."""
        return sum(1 for h in self.configured_hours if self.local_use[h] > 0)


def local_monday(t: datetime, tz: ZoneInfo) -> datetime:
    """The instant of the local Monday 00:00 at or before `t`."""
    local = t.astimezone(tz)
    monday = (local - timedelta(days=local.weekday())).replace(
        hour=0, minute=0, second=0, microsecond=0, tzinfo=None
    )
    return to_instant(monday, tz)


def compute(
    config: Config,
    start: datetime,
    end: datetime,
    runs: Sequence[Run],
    loads: Sequence[ModelLoad],
    gpu_indices: Sequence[int] = (),
    min_hours: int = DEFAULT_MIN_HOURS,
    max_use_share: float = 0.0,
) -> Sizing:
    """Every figure of `gpu-broker sizing` over [start, end) from requests and loads.

    The suggested windows cover the hours of the week whose share of weeks with local use is
    at most `max_use_share` (0: hours never used), in runs of `min_hours` or more."""
    tz = config.broker.tz
    hour_weeks = hour_counts(start, end, tz)
    days = (end - start).total_seconds() / 86400
    service_gpus = {s.name: tuple(s.gpus) for s in config.services}
    names = list(service_gpus) + sorted({r.service for r in runs} - set(service_gpus))
    usages = {
        name: usage_of(name, [r for r in runs if r.service == name], hour_weeks, tz)
        for name in names
    }
    unseen = {h for h in range(HOURS_PER_WEEK) if hour_weeks[h] == 0}
    local_use = use_share(runs, hour_weeks, tz)
    used = unseen | {h for h, share in enumerate(local_use) if share > max_use_share}
    configured = window_hours(config.windows, tz, local_monday(start, tz))
    fake = len(config.gpus.fake) if config.gpus.backend == "fake" else 0
    indices = sorted(
        set(gpu_indices) | {g for gs in service_gpus.values() for g in gs} | set(range(fake))
    )
    gpus = per_gpu(indices, service_gpus, usages, loads, days, configured, min_hours, unseen)
    shared = shared_gpus(gpus, usages)
    services = [
        ServiceSizing(
            usages[name], service_gpus.get(name, ()),
            reloads_per_day(loads, days, service=name), needs(usages[name]),
        )
        for name in names
    ]  # fmt: skip
    team = config.broker.team_size
    return Sizing(
        start=start,
        end=end,
        timezone=str(tz.key),
        services=services,
        gpus=gpus,
        shared=shared,
        own_gpu=own_gpu(shared, usages),
        gpus_needed=sum(s.needs_gpus for s in services),
        gpus_present=len(indices),
        team_size=team,
        rule_of_thumb=rule_of_thumb(team),
        local_use=local_use,
        unseen_hours=len(unseen),
        suggested=suggest(used, min_hours),
        configured_hours=frozenset(configured),
        used_hours=frozenset(used),
        max_use_share=max_use_share,
    )


async def first_record(
    ledger: Ledger, start: datetime, end: datetime, demand: Sequence[DemandRecord]
) -> datetime | None:
    """When the ledger's record begins within [start, end): its first state interval or
    local request (`demand`: the ledger's over the same span); None when it holds neither."""
    firsts: list[datetime] = []
    intervals = await ledger.state_intervals(start, end, scope="pool")
    if intervals:
        firsts.append(max(intervals[0].start, start))
    if demand:
        firsts.append(demand[0].arrival)
    return min(firsts) if firsts else None


async def read_sizing(
    ledger: Ledger,
    config: Config,
    start: datetime,
    end: datetime,
    max_use_share: float = 0.0,
    *,
    from_record: bool = False,
) -> tuple[Sizing, datetime]:
    """Sizing from the ledger over [start, end); with `from_record`, begun where the record
    begins if that is later (hours before it would otherwise look unused). Returns the
    figures and the start used."""
    # Read once: a later start from the record is never after its first request.
    records = await ledger.demand(start, end)
    if from_record:
        first = await first_record(ledger, start, end, records)
        if first is not None and first > start:
            start = first
    loads = await ledger.model_loads(start, end)
    # GPU intervals are keyed by UUID: the GPUs the ledger saw, as indices 0..n-1.
    seen = {i.subject for i in await ledger.state_intervals(start, end, scope="gpu")}
    indices = list(range(len(seen)))
    runs = runs_of(records)
    return compute(config, start, end, runs, loads, indices, max_use_share=max_use_share), start


def to_json(s: Sizing) -> dict[str, Any]:
    def r(x: float) -> float:
        return round(x, 3)

    return {
        "from": s.start.astimezone(ZoneInfo(s.timezone)).isoformat(),
        "to": s.end.astimezone(ZoneInfo(s.timezone)).isoformat(),
        "timezone": s.timezone,
        "services": [
            {
                "name": x.usage.name,
                "gpus": list(x.gpus),
                "requests": x.usage.requests,
                "requests_per_hour_of_week": grid([r(v) for v in x.usage.per_hour_of_week]),
                "busy_gpus": {
                    "p50": x.usage.busy.p50, "p95": x.usage.busy.p95, "peak": x.usage.busy.peak,
                },
                "busy_minutes": x.usage.busy_minutes,
                "waited": {
                    "held": x.usage.waits.held,
                    "refused": x.usage.waits.refused,
                    "p50_s": r(x.usage.waits.p50_s),
                    "p95_s": r(x.usage.waits.p95_s),
                    "max_s": r(x.usage.waits.max_s),
                    "total_h": r(x.usage.waits.total_h),
                },
                "model_reloads_per_day": r(x.reloads_per_day),
                "needs_gpus": x.needs_gpus,
            }
            for x in s.services
        ],
        "gpus": [
            {
                "index": g.index,
                "services": list(g.services),
                "model_reloads_per_day": r(g.reloads_per_day),
                "used_hours_per_week": g.used_hours_per_week,
                "rentable_hours_per_week": g.rentable_hours_per_week,
                "extra_rentable_hours_per_week": g.extra_rentable_hours_per_week,
            }
            for g in s.gpus
        ],
        "shared_gpus": [
            {
                "index": g.index,
                "services": list(g.services),
                "model_reloads_per_day": r(g.reloads_per_day),
                "overlap_hours_per_week": g.overlap_hours_per_week,
            }
            for g in s.shared
        ],
        "gpus_needed": s.gpus_needed,
        "gpus_present": s.gpus_present,
        "team_size": s.team_size,
        "rule_of_thumb_gpus": s.rule_of_thumb,
        "own_gpu": [{"service": o.service, "reason": o.reason} for o in s.own_gpu],
        "suggested_windows": [
            {"cron": w.cron, "duration": w.duration, "hours_per_week": w.hours_per_week}
            for w in s.suggested
        ],
        "suggested_hours_per_week": len(s.suggested_hours),
        "configured_hours_per_week": len(s.configured_hours),
        "configured_hours_used_by_team": s.configured_hours_used,
        "extra_rentable_hours_per_week": s.extra_rentable_hours,
        "unseen_hours_per_week": s.unseen_hours,
        "max_use_share": s.max_use_share,
        "local_use": grid([r(v) for v in s.local_use]),
    }
