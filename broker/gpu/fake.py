"""Simulated GPUs: scripted timelines and injected faults, on the injected clock.

Used when `[gpus] backend = "fake"` (or "auto" on a machine without a driver), and by tests.
The timeline shape and the faults are documented on `broker.config.FakeGpu`. Time is
monotonic seconds since the backend was built, so a test that advances a `FakeClock` by two
hours sees the step at "2h".

Power is piecewise constant, so the energy a GPU drew is known exactly: `true_energy_j()` is
the ground truth the energy accounting is checked against.

Renters put load on top of the script: `renter_load(at, gpus)` (the daemon connects the
paper market's renters to it) makes each GPU in `gpus` draw its `load_watts` at full
utilisation from `at` on, and the others go back to their script. The energy stays exact.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from broker.clock import Clock
from broker.config import FakeGpu
from broker.errors import GpuPermissionError, GpuSettingError
from broker.gpu.base import (
    GPU_LOST,
    NO_PERMISSION,
    NOT_SUPPORTED,
    GpuDevice,
    GpuProcess,
    GpuSample,
    ProcessMap,
)

_FIELDS = (
    "utilization_pct",
    "memory_used_mb",
    "power_w",
    "energy_mj",
    "pstate",
    "temperature_c",
)


@dataclass(frozen=True)
class _Segment:
    start: float  # seconds since the backend started
    utilization_pct: float
    memory_used_mb: float
    power_w: float
    temperature_c: float | None
    processes: tuple[GpuProcess, ...]


class _Script:
    """One GPU's timeline compiled to segments, with the energy drawn up to each one."""

    def __init__(self, spec: FakeGpu) -> None:
        self.spec = spec
        util, memory, power, temp = 0.0, 0.0, None, None
        procs: tuple[GpuProcess, ...] = ()
        self.segments: list[_Segment] = []
        if not spec.timeline or spec.timeline[0].at.total_seconds() > 0:
            self.segments.append(_Segment(0.0, 0.0, 0.0, spec.idle_watts, None, ()))
        for step in spec.timeline:
            util = step.utilization_pct if step.utilization_pct is not None else util
            memory = step.memory_used_mb if step.memory_used_mb is not None else memory
            # An explicit power holds only for its own step; a later step that changes only
            # utilisation goes back to power that follows utilisation.
            power = step.power_w
            temp = step.temperature_c if step.temperature_c is not None else temp
            if step.processes is not None:
                procs = tuple(
                    GpuProcess(pid=p.pid, used_memory_mb=p.memory_mb, name=p.name)
                    for p in step.processes
                )
            watts = power if power is not None else self._watts(util)
            self.segments.append(
                _Segment(step.at.total_seconds(), util, memory, watts, temp, procs)
            )
        self.starts = [s.start for s in self.segments]
        self.cumulative = [0.0]
        for prev, nxt in zip(self.segments, self.segments[1:], strict=False):
            self.cumulative.append(self.cumulative[-1] + prev.power_w * (nxt.start - prev.start))
        self.lost_at = spec.lost_at.total_seconds() if spec.lost_at is not None else math.inf
        self.resets = sorted(r.total_seconds() for r in spec.energy_resets_at)
        # Spans [start, end) a renter loaded this GPU (end inf while it still does).
        self.rented: list[list[float]] = []
        self.rented_segment = _Segment(
            0.0, 100.0, 0.8 * spec.memory_mb, spec.load_watts, None, ()
        )

    def _watts(self, util: float) -> float:
        spec = self.spec
        return spec.idle_watts + (spec.load_watts - spec.idle_watts) * util / 100.0

    def segment(self, t: float) -> _Segment:
        for start, end in reversed(self.rented):
            if start <= t < end:
                return self.rented_segment
            if end <= t:
                break
        return self.segments[max(0, bisect.bisect_right(self.starts, t) - 1)]

    def scripted_energy_j(self, t: float) -> float:
        """Joules the script alone draws from the start to `t` (until the GPU is lost)."""
        t = max(0.0, min(t, self.lost_at))
        i = max(0, bisect.bisect_right(self.starts, t) - 1)
        seg = self.segments[i]
        return self.cumulative[i] + seg.power_w * (t - seg.start)

    def energy_j(self, t: float) -> float:
        """Joules drawn from the start to `t`: the script's, with renters' spans drawing
        `load_watts` instead."""
        total = self.scripted_energy_j(t)
        t = max(0.0, min(t, self.lost_at))
        for start, end in self.rented:
            if start >= t:
                break
            stop = min(end, t)
            total += self.spec.load_watts * (stop - start) - (
                self.scripted_energy_j(stop) - self.scripted_energy_j(start)
            )
        return total

    def load(self, t: float, on: bool) -> None:
        """A renter starts (`on`) or stops loading this GPU at `t`."""
        loaded = bool(self.rented) and self.rented[-1][1] == math.inf
        if on and not loaded:
            self.rented.append([max(t, self.rented[-1][1]) if self.rented else t, math.inf])
        elif not on and loaded:
            self.rented[-1][1] = max(t, self.rented[-1][0])

    def counter_mj(self, t: float) -> int:
        i = bisect.bisect_right(self.resets, t)
        since = self.resets[i - 1] if i else 0.0
        # The driver counts whole millijoules; truncating as it does keeps the fake honest
        # about rounding.
        return math.floor((self.energy_j(t) - self.energy_j(since)) * 1000.0)


class FakeBackend:
    """`GpuBackend` over `FakeGpu` specs."""

    def __init__(self, specs: Sequence[FakeGpu], clock: Clock) -> None:
        self._clock = clock
        self._t0 = clock.monotonic()
        self._sampled_to = 0.0  # the latest time a sample showed (renter load starts after)
        self._scripts = [_Script(spec) for spec in specs]
        self._devices = [
            GpuDevice(
                index=i,
                uuid=spec.uuid or f"GPU-fa4e0000-0000-4000-8000-{i:012d}",
                name=spec.name,
                memory_total_mb=float(spec.memory_mb),
                power_limit_w=spec.power_limit_w or spec.max_watts or spec.load_watts,
                power_max_w=spec.max_watts or spec.load_watts,
                power_default_w=spec.power_default_w or spec.max_watts or spec.load_watts,
                power_min_w=spec.power_min_w,
                persistence_mode=spec.persistence_mode,
            )
            for i, spec in enumerate(specs)
        ]

    @property
    def kind(self) -> str:
        return "fake"

    def elapsed(self) -> float:
        """Seconds since the backend was built: the time the timelines are written in."""
        return self._clock.monotonic() - self._t0

    def true_energy_j(self, index: int, start: float = 0.0, end: float | None = None) -> float:
        """Exact joules GPU `index` drew between two `elapsed()` times (default: until now)."""
        script = self._scripts[index]
        return script.energy_j(self.elapsed() if end is None else end) - script.energy_j(start)

    async def start(self) -> list[GpuDevice]:
        return list(self._devices)

    async def devices(self) -> list[GpuDevice]:
        return list(self._devices)

    def renter_load(self, at: datetime, gpus: frozenset[int]) -> None:
        """From wall time `at`, renters load exactly the GPUs `gpus` (indices). A change
        learnt late starts at the latest sample already taken, so what a sample showed and
        the energy counter it read never change after the fact."""
        t = self.elapsed() - (self._clock.now() - at).total_seconds()
        t = min(self.elapsed(), max(t, self._sampled_to))
        for index, script in enumerate(self._scripts):
            script.load(t, index in gpus)

    def renter_loaded(self) -> frozenset[int]:
        """The GPUs renters load now."""
        t = self.elapsed()
        return frozenset(
            i
            for i, script in enumerate(self._scripts)
            if script.segment(t) is script.rented_segment
        )

    async def sample(self) -> list[GpuSample]:
        t = self._sampled_to = self.elapsed()
        return [
            self._sample(dev, script, t)
            for dev, script in zip(self._devices, self._scripts, strict=True)
        ]

    def _sample(self, dev: GpuDevice, script: _Script, t: float) -> GpuSample:
        if t >= script.lost_at:
            return GpuSample(
                index=dev.index,
                uuid=dev.uuid,
                lost=True,
                errors=dict.fromkeys(_FIELDS, GPU_LOST),
            )
        seg = script.segment(t)
        busy = seg.utilization_pct > 0 or bool(seg.processes)
        values: dict[str, float | int | None] = {
            "utilization_pct": seg.utilization_pct,
            "memory_used_mb": seg.memory_used_mb,
            "power_w": seg.power_w,
            "energy_mj": script.counter_mj(t),
            # Like a real card: its idle P-state (P8 when healthy) when nothing holds it, P2
            # with a context, P0 under load.
            "pstate": 0 if seg.utilization_pct >= 50 else 2 if busy else script.spec.idle_pstate,
            "temperature_c": (
                seg.temperature_c
                if seg.temperature_c is not None
                else 30.0 + 0.5 * seg.utilization_pct
            ),
        }
        errors: dict[str, str] = {}
        for name in script.spec.no_permission:
            if name in values:
                values[name] = None
                errors[name] = NO_PERMISSION
        for name in script.spec.unsupported:
            if name in values:
                values[name] = None
                errors[name] = NOT_SUPPORTED
        energy = values["energy_mj"]
        pstate = values["pstate"]
        return GpuSample(
            index=dev.index,
            uuid=dev.uuid,
            utilization_pct=values["utilization_pct"],
            memory_used_mb=values["memory_used_mb"],
            memory_total_mb=dev.memory_total_mb,
            power_w=values["power_w"],
            energy_mj=None if energy is None else int(energy),
            pstate=None if pstate is None else int(pstate),
            temperature_c=values["temperature_c"],
            errors=errors,
        )

    async def processes(self) -> ProcessMap:
        t = self.elapsed()
        out: dict[int, tuple[GpuProcess, ...] | None] = {}
        for dev, script in zip(self._devices, self._scripts, strict=True):
            spec = script.spec
            unreadable = "processes" in spec.unsupported or "processes" in spec.no_permission
            out[dev.index] = (
                None if t >= script.lost_at or unreadable else (script.segment(t).processes)
            )
        return out

    # Settings, as a driver keeps them: until changed again, whatever process changed them.

    async def set_power_limit(self, index: int, watts: float) -> float:
        dev = self._settable(index, "power_limit")
        low, high = dev.power_min_w or 1.0, dev.power_max_w or math.inf
        if not low <= watts <= high:
            raise GpuSettingError(
                f"GPU {index}: a power limit of {watts:g} W is outside {low:g}-{high:g} W"
            )
        self._devices[index] = replace(dev, power_limit_w=float(watts))
        return float(watts)

    async def set_persistence_mode(self, index: int, on: bool) -> bool:
        dev = self._settable(index, "persistence_mode")
        self._devices[index] = replace(dev, persistence_mode=on)
        return on

    def _settable(self, index: int, setting: str) -> GpuDevice:
        if not 0 <= index < len(self._devices):
            raise GpuSettingError(f"no GPU {index}")
        if self.elapsed() >= self._scripts[index].lost_at:
            raise GpuSettingError(f"GPU {index} is lost")
        if setting in self._scripts[index].spec.no_permission:
            raise GpuPermissionError(f"GPU {index}: no permission to change {setting}")
        return self._devices[index]

    async def close(self) -> None:
        return None
