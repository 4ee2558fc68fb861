"""Energy per GPU, attributed to the pool state in force, written to the ledger every minute.

Between two samples of a GPU the energy is the difference of its driver counter (exact,
whatever happened between the samples). When the counter goes backwards it restarted
(driver reload, GPU reset): that interval is bridged by integrating power instead. A
difference above what the card can draw (its maximum power over the longest time the two
reads can have been apart, plus a margin) is a glitch and is clamped to that maximum. A
card without a counter is integrated from its power readings (trapezoids).

`overhead_watts` is the host's draw NVML does not see (CPU, fans, PSU losses); it is
counted only while the pool is listed, rented or reclaiming (renters finishing), since that
is the energy renting costs, and is shared equally among the GPUs still reporting.

Records accumulate in memory and are flushed at least every `flush_interval` (a minute),
so a crash loses at most that much; one record per GPU and pool state per flush keeps the
ledger small. A flush the ledger refuses (a full disk) keeps its records for the next one;
while that lasts, contiguous records of one GPU and state are merged up to a ledger slot
(15 minutes) and at most `MAX_HELD` are kept, so memory stays bounded through a long outage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from broker.clock import Clock
from broker.errors import LedgerError
from broker.gpu.base import GpuDevice, GpuSample, Snapshot
from broker.ledger.base import EnergyRecord, Ledger

log = logging.getLogger(__name__)

# "reclaiming": renters may still run until their contracts end, so it is renting's cost too.
OVERHEAD_STATES = frozenset({"listed", "rented", "reclaiming"})
# A card draws above its power limit for moments: on an H100 capped at 700 W, as a load
# started, the counter rose 388 J between two ticks 0.5 s apart (776 W) and 725 J over the
# full second, and NVML's power reading said 725 W. With 10 % that real energy was clamped.
# A glitch is a delta far above the ceiling, not a few percent.
CLAMP_MARGIN = 0.25

Method = Literal["counter", "integrated", "mixed"]

# Records held while the ledger refuses writes: with merging to 15-minute spans, this is
# about 100 GPU-days; past it the oldest are dropped (and said so), not memory exhausted.
MAX_HELD = 10_000
MERGE_SPAN = timedelta(minutes=15)  # the ledger's rollup slot: no record is longer


@dataclass(frozen=True)
class _Reading:
    at: float
    power_w: float | None
    energy_mj: int | None
    read_s: float  # read somewhere in [at, at + read_s]


@dataclass
class _Open:
    """A record being accumulated: one GPU, one pool state, a contiguous span."""

    device: GpuDevice
    state: str
    start: datetime
    end: datetime
    joules: float = 0.0
    overhead: float = 0.0
    counter: bool = False
    integrated: bool = False

    def record(self, host: str) -> EnergyRecord:
        method: Method = (
            "mixed"
            if self.counter and self.integrated
            else ("counter" if self.counter else "integrated")
        )
        return EnergyRecord(
            gpu_uuid=self.device.uuid,
            gpu_index=self.device.index,
            pool_state=self.state,
            start=self.start,
            end=self.end,
            joules=self.joules,
            overhead_joules=self.overhead,
            method=method,
            host=host,
        )


def _trapezoid(p0: float | None, p1: float | None, dt: float) -> float | None:
    if p0 is not None and p1 is not None:
        return (p0 + p1) / 2.0 * dt
    known = p0 if p0 is not None else p1
    return None if known is None else known * dt


class EnergyAccountant:
    def __init__(
        self,
        devices: Sequence[GpuDevice],
        clock: Clock,
        *,
        ledger: Ledger | None = None,
        overhead_watts: float = 0.0,
        flush_interval: float = 60.0,
        pool_state: str = "local",
    ) -> None:
        self._devices = {d.index: d for d in devices}
        self._clock = clock
        self._ledger = ledger
        self._overhead_watts = overhead_watts
        self._flush_interval = flush_interval
        self._states: list[tuple[float, str]] = [(-math.inf, pool_state)]
        self._last: dict[int, _Reading] = {}
        self._open: dict[int, _Open] = {}
        self._closed: list[EnergyRecord] = []
        self._last_flush = clock.monotonic()
        self._flush_failures = 0
        self._dropped = 0
        self._totals: dict[tuple[str, str], list[float]] = {}
        self._clamped: set[int] = set()

    # -- inputs ---------------------------------------------------------------------------

    @property
    def pool_state(self) -> str:
        return self._states[-1][1]

    def set_pool_state(self, state: str) -> None:
        """From now on, energy counts toward `state` ("local", "idle", "listed", ...)."""
        if state != self.pool_state:
            self._states.append((self._clock.monotonic(), state))

    def observe(self, snap: Snapshot) -> None:
        reporting = [s for s in snap.gpus if not s.lost and s.index in self._devices]
        share = self._overhead_watts / len(reporting) if reporting else 0.0
        for sample in snap.gpus:
            if sample.lost:
                # A lost GPU's draw is unknown; it must not be guessed, nor bridged later.
                self._last.pop(sample.index, None)
                continue
            if sample.index in self._devices:
                self._observe(snap, sample, share)
        self._prune()

    def _observe(self, snap: Snapshot, sample: GpuSample, share: float) -> None:
        if sample.power_w is None and sample.energy_mj is None:
            # Nothing to measure with: keep the last good reading, so the next good sample
            # covers the gap (exactly, with a counter).
            return
        cur = _Reading(snap.at, sample.power_w, sample.energy_mj, snap.read_s)
        prev = self._last.get(sample.index)
        self._last[sample.index] = cur
        if prev is None or cur.at <= prev.at:
            return
        device = self._devices[sample.index]
        joules, method = self._energy(device, prev, cur)
        dt = cur.at - prev.at
        for state, a, b in self._segments(prev.at, cur.at):
            part = joules * (b - a) / dt
            overhead = share * (b - a) if state in OVERHEAD_STATES else 0.0
            self._add(device, state, snap, a, b, part, overhead, method)

    def _energy(self, device: GpuDevice, prev: _Reading, cur: _Reading) -> tuple[float, Method]:
        dt = cur.at - prev.at
        if prev.energy_mj is None or cur.energy_mj is None:
            return _trapezoid(prev.power_w, cur.power_w, dt) or 0.0, "integrated"
        delta = (cur.energy_mj - prev.energy_mj) / 1000.0
        if delta < 0:
            log.info(
                "GPU %d: the energy counter went back (driver reload or GPU reset); "
                "bridging %.0fs by integrating power",
                device.index,
                dt,
            )
            bridged = _trapezoid(prev.power_w, cur.power_w, dt)
            # Without power, what the counter counted since its restart is a lower bound.
            return (bridged if bridged is not None else cur.energy_mj / 1000.0), "integrated"
        ceiling = device.power_max_w or device.power_limit_w
        # The previous counter was read at prev.at at the earliest, this one by
        # cur.at + cur.read_s at the latest: the interval the delta covers is at most that.
        longest = dt + cur.read_s
        if ceiling is not None and delta > ceiling * longest * (1 + CLAMP_MARGIN):
            # Warn once per GPU: a counter that misbehaves tends to do it every tick.
            level = logging.DEBUG if device.index in self._clamped else logging.WARNING
            self._clamped.add(device.index)
            log.log(
                level,
                "GPU %d: the energy counter rose %.0f J in %.1fs, more than the card can draw "
                "(%.0f W); counting %.0f J",
                device.index,
                delta,
                dt,
                ceiling,
                ceiling * dt,
            )
            return ceiling * dt, "counter"
        return delta, "counter"

    def _segments(self, t0: float, t1: float) -> list[tuple[str, float, float]]:
        """[t0, t1] cut where the pool state changed, each piece with its state."""
        out: list[tuple[str, float, float]] = []
        for i, (since, state) in enumerate(self._states):
            until = self._states[i + 1][0] if i + 1 < len(self._states) else math.inf
            a, b = max(t0, since), min(t1, until)
            if b > a:
                out.append((state, a, b))
        return out

    def _prune(self) -> None:
        """Forget state changes older than every GPU's last reading (keep the one in force)."""
        oldest = min((r.at for r in self._last.values()), default=self._clock.monotonic())
        keep = 0
        for i, (since, _) in enumerate(self._states):
            if since <= oldest:
                keep = i
        del self._states[:keep]

    def _add(
        self,
        device: GpuDevice,
        state: str,
        snap: Snapshot,
        a: float,
        b: float,
        joules: float,
        overhead: float,
        method: Method,
    ) -> None:
        start = snap.wall - timedelta(seconds=snap.at - a)
        end = snap.wall - timedelta(seconds=snap.at - b)
        rec = self._open.get(device.index)
        if rec is None or rec.state != state:
            if rec is not None:
                self._closed.append(rec.record(self._host))
                start = rec.end
            rec = self._open[device.index] = _Open(device, state, start, end)
        rec.end = end
        rec.joules += joules
        rec.overhead += overhead
        rec.counter |= method == "counter"
        rec.integrated |= method == "integrated"
        total = self._totals.setdefault((device.uuid, state), [0.0, 0.0])
        total[0] += joules
        total[1] += overhead

    # -- outputs --------------------------------------------------------------------------

    @property
    def _host(self) -> str:
        return self._ledger.host if self._ledger is not None else ""

    def total_joules(self, uuid: str, *, overhead: bool = False) -> float:
        """What a GPU drew since the broker started (plus its overhead share if asked)."""
        return sum(
            j + (o if overhead else 0.0) for (u, _), (j, o) in self._totals.items() if u == uuid
        )

    def totals(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(GPU uuid, pool state) -> (GPU joules, overhead joules), since the start."""
        return {key: (j, o) for key, (j, o) in self._totals.items()}

    def flush_due(self) -> bool:
        return self._clock.monotonic() - self._last_flush >= self._flush_interval

    def pending(self) -> list[EnergyRecord]:
        return [*self._closed, *(r.record(self._host) for r in self._open.values())]

    async def flush(self) -> int:
        """Write what accumulated; returns how many records. On a ledger error the records
        are kept for the next try and the error is logged once, not every minute."""
        self._last_flush = self._clock.monotonic()
        # Taken out before the write, so samples observed while it runs go to new records.
        records = self.pending()
        self._closed.clear()
        self._open.clear()
        if not records or self._ledger is None:
            return len(records)
        try:
            await self._ledger.add_energy(records)
        except LedgerError as err:
            self._closed[:0] = self._hold(records)
            if not self._flush_failures:
                log.warning("cannot write energy to the ledger (kept for later): %s", err)
            self._flush_failures += 1
            return 0
        if self._flush_failures:
            log.info(
                "energy written to the ledger again after %d failed tries", self._flush_failures
            )
            self._flush_failures = 0
        return len(records)

    def _hold(self, records: list[EnergyRecord]) -> list[EnergyRecord]:
        """Records a failed flush keeps: contiguous ones of one GPU and state merged (up to
        a slot's length), the oldest dropped past `MAX_HELD`."""
        held: list[EnergyRecord] = []
        last: dict[tuple[str, int], int] = {}  # (uuid, index) -> position of its newest
        for rec in sorted(records, key=lambda r: r.start):
            key = (rec.gpu_uuid, rec.gpu_index)
            at = last.get(key)
            prev = held[at] if at is not None else None
            if (
                at is not None
                and prev is not None
                and prev.pool_state == rec.pool_state
                and prev.host == rec.host
                and abs((rec.start - prev.end).total_seconds()) < 1e-3
                and rec.end - prev.start <= MERGE_SPAN
            ):
                held[at] = replace(
                    prev,
                    end=rec.end,
                    joules=prev.joules + rec.joules,
                    overhead_joules=prev.overhead_joules + rec.overhead_joules,
                    method=prev.method if prev.method == rec.method else "mixed",
                )
                continue
            last[key] = len(held)
            held.append(rec)
        if len(held) > MAX_HELD:
            drop = len(held) - MAX_HELD
            self._dropped += drop
            log.error(
                "the ledger has refused energy records for too long: %d of the oldest "
                "dropped (%d in all)", drop, self._dropped,
            )  # fmt: skip
            del held[:drop]
        return held

    def unflushed(self) -> str | None:
        """What a last flush could not write, for the stop's message; None when nothing."""
        records = self.pending()
        if not records and not self._dropped:
            return None
        wh = sum(r.joules + r.overhead_joules for r in records) / 3600.0
        text = f"{len(records)} record(s), {wh:.3f} Wh"
        if self._dropped:
            text += f" ({self._dropped} older record(s) dropped earlier)"
        return text
