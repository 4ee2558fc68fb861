"""Flags for one card from its static fields and its idle behaviour.

Pure: the caller measures (median idle draw, the P-state seen while idle, processes while
idle) and this module only judges, so the rules are tested without a clock or a ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from broker.gpu.base import GpuDevice, GpuProcess

HOURS_PER_YEAR = 8760.0
LOWEST_IDLE_PSTATE = 8  # what a consumer/datacenter NVIDIA card reaches idle with the driver loaded


@dataclass(frozen=True)
class Flag:
    kind: str  # "idle_draw", "pstate", "persistence", "process"
    cause: str
    excess_w: float  # the watts the flag costs: idle draw above target (0 when unknown)
    yearly_kwh: float
    yearly_cost: float
    yearly_co2_kg: float


def yearly(
    excess_w: float, tariff_per_kwh: float, co2_g_per_kwh: float
) -> tuple[float, float, float]:
    """kWh, money and kg CO2 a constant excess draw costs over a year."""
    kwh = excess_w * HOURS_PER_YEAR / 1000.0
    return kwh, kwh * tariff_per_kwh, kwh * co2_g_per_kwh / 1000.0


def flags(
    device: GpuDevice,
    *,
    idle_w: float | None,
    idle_pstate: int | None,
    idle_processes: Sequence[GpuProcess] = (),
    idle_holders: Sequence[tuple[str, float]] = (),
    mean_idle_w: float | None = None,
    target_w: float = 15.0,
    tariff_per_kwh: float,
    co2_g_per_kwh: float,
) -> list[Flag]:
    """Every flag for one card. The excess draw is charged once, to every cause alike: the
    causes explain the same watts, they do not add up.

    `idle_processes` are the processes holding the card in one live reading;
    `idle_holders` are (process, share of idle samples) over days, from the ledger. A holder
    keeps the card hot only part of the time, which the median draw hides: its flag is
    charged the mean idle draw above target (`mean_idle_w`) instead."""
    excess = max(0.0, idle_w - target_w) if idle_w is not None else 0.0
    kwh, cost, co2 = yearly(excess, tariff_per_kwh, co2_g_per_kwh)

    def flag(kind: str, cause: str) -> Flag:
        return Flag(kind, cause, excess, kwh, cost, co2)

    out: list[Flag] = []
    if excess > 0:
        out.append(flag("idle_draw", f"idles at {idle_w:.0f} W, above the {target_w:.0f} W target"))
    if idle_pstate is not None and idle_pstate < LOWEST_IDLE_PSTATE:
        out.append(
            flag("pstate", f"stays in P{idle_pstate} while idle instead of P{LOWEST_IDLE_PSTATE}")
        )
    if device.persistence_mode is False:
        out.append(
            flag(
                "persistence",
                "persistence mode is off: enable it with `nvidia-smi -pm 1` "
                "(or the nvidia-persistenced service)",
            )
        )
    for proc in idle_processes:
        out.append(
            flag("process", f"process {proc.pid} ({proc.name or 'unknown'}) keeps the card awake")
        )
    held_excess = max(0.0, mean_idle_w - target_w) if mean_idle_w is not None else excess
    held_kwh, held_cost, held_co2 = yearly(held_excess, tariff_per_kwh, co2_g_per_kwh)
    for name, share in idle_holders:
        cause = f"{name} held the idle card {share:.0%} of its idle time"
        out.append(Flag("process", cause, held_excess, held_kwh, held_cost, held_co2))
    return out
