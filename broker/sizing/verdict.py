"""The verdict: how many GPUs the measured demand needs, the rule of thumb beside it, which
services should get a GPU of their own, and what each GPU could be rented more. Pure.

- A service that was used needs its p95 of busy GPUs, at least one (one application per
  GPU: two services on a card evict each other's models); its peak above that waits.
- The rule of thumb for second-hand RTX 3090s: 2 GPUs for 1-10 users, 3 for 11-30, 4 for
  31-50; beyond 50 it says nothing.
- A service should get its own GPU when it shares a configured GPU with another service and
  either both were used in one hour of the week, or that GPU reloaded models at least
  `RELOADS_PER_DAY_LIMIT` times a day.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from broker.ledger.base import ModelLoad
from broker.sizing.usage import ServiceUsage
from broker.sizing.week import HOURS_PER_WEEK
from broker.sizing.windows import DEFAULT_MIN_HOURS, free_runs

RELOADS_PER_DAY_LIMIT = 1.0

# (most users, GPUs): the first row whose limit the team fits under.
RULE_OF_THUMB: tuple[tuple[int, int], ...] = ((10, 2), (30, 3), (50, 4))


def rule_of_thumb(team_size: int | None) -> int | None:
    if team_size is None:
        return None
    for most, gpus in RULE_OF_THUMB:
        if team_size <= most:
            return gpus
    return None


def needs(usage: ServiceUsage) -> int:
    """GPUs one service needs: its p95 of busy GPUs, at least one if it was used at all."""
    if usage.requests == 0:
        return 0
    return max(1, math.ceil(usage.busy.p95))


def reloads_per_day(
    loads: Sequence[ModelLoad], days: float, *, gpu: int | None = None, service: str | None = None
) -> float:
    if days <= 0:
        return 0.0
    count = sum(
        1
        for load in loads
        if (gpu is None or gpu in load.gpus) and (service is None or load.service == service)
    )
    return count / days


@dataclass(frozen=True)
class GpuSizing:
    index: int
    services: tuple[str, ...]  # configured on it
    reloads_per_day: float
    used_hours_per_week: int  # hours of the week one of its services used
    rentable_hours_per_week: int  # in runs of unused hours long enough for a window
    extra_rentable_hours_per_week: int  # of those, hours the configured windows leave out


@dataclass(frozen=True)
class SharedGpu:
    index: int
    services: tuple[str, ...]
    reloads_per_day: float
    overlap_hours_per_week: int  # hours of the week in which two of them were used


@dataclass(frozen=True)
class OwnGpu:
    service: str
    reason: str


def per_gpu(
    gpus: Sequence[int],
    service_gpus: Mapping[str, Sequence[int]],
    usages: Mapping[str, ServiceUsage],
    loads: Sequence[ModelLoad],
    days: float,
    configured: Collection[int],
    min_hours: int = DEFAULT_MIN_HOURS,
    unseen: Collection[int] = (),
) -> list[GpuSizing]:
    """Each GPU's figures; hours of the week the span does not hold count as used."""
    out: list[GpuSizing] = []
    for index in gpus:
        names = tuple(sorted(n for n, g in service_gpus.items() if index in g))
        used: set[int] = set(unseen)
        for name in names:
            if name in usages:
                used |= usages[name].used_hours
        rentable = {
            (run.start + k) % HOURS_PER_WEEK
            for run in free_runs(used, min_hours)
            for k in range(run.hours)
        }
        out.append(
            GpuSizing(
                index, names, reloads_per_day(loads, days, gpu=index), len(used), len(rentable),
                len(rentable - set(configured)),
            )
        )  # fmt: skip
    return out


def shared_gpus(
    gpus: Sequence[GpuSizing], usages: Mapping[str, ServiceUsage]
) -> list[SharedGpu]:
    out: list[SharedGpu] = []
    for gpu in gpus:
        if len(gpu.services) < 2:
            continue
        seen: dict[int, int] = {}
        for name in gpu.services:
            for how in usages[name].used_hours if name in usages else ():
                seen[how] = seen.get(how, 0) + 1
        overlap = sum(1 for n in seen.values() if n >= 2)
        out.append(SharedGpu(gpu.index, gpu.services, gpu.reloads_per_day, overlap))
    return out


def own_gpu(shared: Sequence[SharedGpu], usages: Mapping[str, ServiceUsage]) -> list[OwnGpu]:
    """Services to move to a GPU of their own: on a shared GPU that reloads models often or
    serves two services in one hour, every used service but the busiest."""
    out: dict[str, OwnGpu] = {}
    for gpu in shared:
        used = [n for n in gpu.services if n in usages and usages[n].requests > 0]
        if len(used) < 2:
            continue
        reasons: list[str] = []
        if gpu.reloads_per_day >= RELOADS_PER_DAY_LIMIT:
            reasons.append(f"GPU {gpu.index} reloads models {gpu.reloads_per_day:.1f} times a day")
        if gpu.overlap_hours_per_week:
            reasons.append(f"both in use in {gpu.overlap_hours_per_week} hours of the week")
        if not reasons:
            continue
        busiest = max(used, key=lambda n: usages[n].requests)
        for name in used:
            if name != busiest and name not in out:
                out[name] = OwnGpu(name, f"shares GPU {gpu.index} with {busiest}: "
                                   + "; ".join(reasons))  # fmt: skip
    return list(out.values())
