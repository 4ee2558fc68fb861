"""`gpu-broker eco`: read every card once and judge it (live reading, not the ledger yet)."""

from __future__ import annotations

from typing import Any

from broker.clock import Clock
from broker.config import Config
from broker.eco.advice import flags
from broker.gpu import create_backend


async def eco_now(config: Config, clock: Clock) -> dict[str, Any]:
    """The SPEC section 5 `eco --json` object from one reading of every card."""
    backend = await create_backend(config.gpus, clock)
    try:
        devices = await backend.start()
        samples = {s.index: s for s in await backend.sample()}
        procs = await backend.processes()
    finally:
        await backend.close()
    target = config.eco.idle_target_watts
    gpus: list[dict[str, Any]] = []
    for dev in devices:
        sample = samples.get(dev.index)
        held = procs.get(dev.index) or ()
        # Only a card doing no work says anything about idle draw: a busy card is not judged.
        idle = sample is not None and not sample.lost and (sample.utilization_pct or 0) == 0
        found = (
            flags(
                dev,
                idle_w=sample.power_w,
                idle_pstate=sample.pstate,
                idle_processes=held,
                target_w=target,
                tariff_per_kwh=config.energy.price_per_kwh,
                co2_g_per_kwh=config.energy.carbon_g_per_kwh,
            )
            if idle and sample is not None
            else []
        )
        gpus.append(
            {
                "index": dev.index,
                "uuid": dev.uuid,
                "name": dev.name,
                "idle": idle,
                "idle_watts": sample.power_w if idle and sample is not None else None,
                "pstate": sample.pstate if sample is not None else None,
                "persistence_mode": dev.persistence_mode,
                "power_limit_w": dev.power_limit_w,
                "power_default_w": dev.power_default_w,
                "power_min_w": dev.power_min_w,
                "power_max_w": dev.power_max_w,
                "memory_used_mb": sample.memory_used_mb if sample is not None else None,
                "processes": [{"pid": p.pid, "name": p.name} for p in held],
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
    return {"gpus": gpus, "idle_target_watts": target, "currency": config.energy.currency}
