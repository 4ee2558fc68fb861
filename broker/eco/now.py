"""`gpu-broker eco`: every card judged on its idle samples over the last days (the ledger),
beside one live reading; a card the ledger has not seen idle is judged on the reading."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from broker.clock import Clock
from broker.config import Config
from broker.eco.advice import Flag, flags
from broker.eco.history import IdleSummary, idle_sample, summarize
from broker.gpu import create_backend
from broker.gpu.base import GpuDevice, GpuProcess, GpuSample, ProcessMap
from broker.ledger import IdleRecord, ledger_exists, open_ledger

# A process is said to keep a card awake when it held it this share of its idle samples:
# a model kept loaded a few minutes after each request is normal, one held all day is not.
HOLDER_SHARE = 0.25


def eco_object(
    config: Config,
    devices: Sequence[GpuDevice],
    samples: Mapping[int, GpuSample],
    processes: ProcessMap,
    history: Mapping[str, IdleSummary] | None,
    days: float,
) -> dict[str, Any]:
    """The SPEC section 5 `eco --json` object. `history` by GPU UUID (None: no ledger)."""
    target = config.eco.idle_target_watts
    gpus: list[dict[str, Any]] = []
    for dev in devices:
        sample = samples.get(dev.index)
        held = processes.get(dev.index) or ()
        idle_now = sample is not None and idle_sample(sample, config.gpus.idle_utilization_pct)
        past = history.get(dev.uuid) if history is not None else None
        found: list[Flag] = []
        judged_on: str | None = None
        idle_w = pstate = mean_w = None
        live_held: Sequence[GpuProcess] = ()
        holders: list[tuple[str, float]] = []
        if past is not None and past.samples:
            judged_on, idle_w, pstate = "history", past.median_watts, past.pstate
            holders = [(n, s) for n, s in past.processes if s >= HOLDER_SHARE]
            mean_w = past.mean_watts
        elif idle_now and sample is not None:
            judged_on, idle_w, pstate = "live", sample.power_w, sample.pstate
            live_held = held
        if judged_on is not None:
            found = flags(
                dev,
                idle_w=idle_w,
                idle_pstate=pstate,
                idle_processes=live_held,
                idle_holders=holders,
                mean_idle_w=mean_w,
                target_w=target,
                tariff_per_kwh=config.energy.price_per_kwh,
                co2_g_per_kwh=config.energy.carbon_g_per_kwh,
            )
        gpus.append(
            {
                "index": dev.index,
                "uuid": dev.uuid,
                "name": dev.name,
                "judged_on": judged_on,
                "idle_watts": idle_w,
                "pstate": pstate if judged_on else (sample.pstate if sample else None),
                "persistence_mode": dev.persistence_mode,
                "power_limit_w": dev.power_limit_w,
                "power_default_w": dev.power_default_w,
                "power_min_w": dev.power_min_w,
                "power_max_w": dev.power_max_w,
                "idle": idle_now,
                "memory_used_mb": sample.memory_used_mb if sample is not None else None,
                "processes": [{"pid": p.pid, "name": p.name} for p in held],
                "now": {
                    "power_w": sample.power_w if sample is not None else None,
                    "pstate": sample.pstate if sample is not None else None,
                    "utilization_pct": sample.utilization_pct if sample is not None else None,
                },
                "history": _history(past, days),
                "flags": [
                    {
                        "kind": f.kind,
                        "cause": f.cause,
                        "yearly_kwh": round(f.yearly_kwh, 2),
                        "yearly_cost": round(f.yearly_cost, 2),
                        "yearly_co2_kg": round(f.yearly_co2_kg, 2),
                    }
                    for f in found
                ],
            }
        )
    return {
        "gpus": gpus,
        "idle_target_watts": target,
        "currency": config.energy.currency,
        "days": days,
    }


def _history(past: IdleSummary | None, days: float) -> dict[str, Any] | None:
    if past is None or not past.samples:
        return None
    return {
        "days": days,
        "idle_samples": past.samples,
        "idle_watts": past.median_watts,
        "mean_idle_watts": None if past.mean_watts is None else round(past.mean_watts, 1),
        "idle_pstate": past.pstate,
        "lowest_pstate_share": (
            None if past.lowest_pstate_share is None else round(past.lowest_pstate_share, 3)
        ),
        "memory_used_mb": past.median_memory_mb,
        "processes": [{"name": n, "share": round(s, 3)} for n, s in past.processes],
    }


def summaries(records: Sequence[IdleRecord]) -> dict[str, IdleSummary]:
    by_gpu: dict[str, list[IdleRecord]] = {}
    for r in records:
        by_gpu.setdefault(r.gpu_uuid, []).append(r)
    return {uuid: summarize(rs) for uuid, rs in by_gpu.items()}


async def read_history(config: Config, clock: Clock, days: float) -> dict[str, IdleSummary] | None:
    """Each card's idle samples over the last `days`, from the ledger; None when there is
    no ledger yet (nothing has been recorded)."""
    if not ledger_exists(config.broker):
        return None
    now = clock.now()
    ledger = await open_ledger(config.broker)
    try:
        records = await ledger.idle(now - timedelta(days=days), now)
    finally:
        await ledger.close()
    return summaries(records)


async def eco_now(config: Config, clock: Clock, days: float = 7.0) -> dict[str, Any]:
    """Read every card once, and the ledger's last `days`, and judge each card."""
    backend = await create_backend(config.gpus, clock)
    try:
        devices = await backend.start()
        samples = {s.index: s for s in await backend.sample()}
        procs = await backend.processes()
    finally:
        await backend.close()
    history = await read_history(config, clock, days)
    return eco_object(config, devices, samples, procs, history, days)
