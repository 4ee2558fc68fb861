"""The `eco` object as the plain text `gpu-broker eco` prints."""

from __future__ import annotations

from typing import Any


def _watts(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} W"


def _pstate(value: int | None) -> str:
    return "P?" if value is None else f"P{value}"


def _mb(value: float | None) -> str:
    return "? MB" if value is None else f"{value:.0f} MB"


def eco_text(result: dict[str, Any]) -> str:
    lines: list[str] = []
    currency = result["currency"]
    for gpu in result["gpus"]:
        persistence = {True: "on", False: "off", None: "?"}[gpu["persistence_mode"]]
        limits = (
            f"power limit {_watts(gpu['power_limit_w'])} (default "
            f"{_watts(gpu['power_default_w'])}, {_watts(gpu['power_min_w'])}-"
            f"{_watts(gpu['power_max_w'])})"
        )
        lines.append(f"GPU {gpu['index']} {gpu['name']}: persistence {persistence}, {limits}")
        now = gpu["now"]
        state = "idle" if gpu["idle"] else "busy"
        memory = gpu["memory_used_mb"]
        lines.append(
            f"  now: {state}, {_watts(now['power_w'])}, {_pstate(now['pstate'])}, "
            f"{_mb(memory)} in use"
            + "".join(f", held by {p['name'] or p['pid']}" for p in gpu["processes"])
        )
        past = gpu["history"]
        if past is None:
            lines.append(f"  last {result['days']:g} days: no idle samples in the ledger")
        else:
            share = past["lowest_pstate_share"]
            held = ", ".join(
                f"{p['name']} {p['share']:.0%}" for p in past["processes"]
            )
            lines.append(
                f"  last {result['days']:g} days: idle draw {_watts(past['idle_watts'])} "
                f"(median of {past['idle_samples']} idle samples), mostly "
                f"{_pstate(past['idle_pstate'])}"
                + ("" if share is None else f" ({share:.0%} of it in P8 or lower)")
                + f", {_mb(past['memory_used_mb'])} in use"
                + (f", held by {held}" if held else "")
            )
        for flag in gpu["flags"]:
            lines.append(
                f"  ! {flag['cause']}: {flag['yearly_cost']:.2f} {currency}/year, "
                f"{flag['yearly_co2_kg']:.1f} kg CO2/year"
            )
        if gpu["judged_on"] is None:
            lines.append("  not judged: busy now, and never seen idle in the ledger")
        elif not gpu["flags"]:
            lines.append("  ok")
    if not result["gpus"]:
        lines.append("no GPUs")
    return "\n".join(lines) + "\n"
