"""How each card idles, kept in the ledger so `eco` can judge days rather than one reading.

`IdleHistory` watches the sampler's snapshots. A sample in which a card does no work
(utilisation known and under `[gpus] idle_utilization_pct`, power known, card not lost) is
an idle sample: it is counted by its draw in whole watts, its P-state, its memory in use in
whole MB and the processes that held the card, per card and 15-minute slot of wall time.
A slot is written to the ledger when the next one starts (and at stop), so a crash loses
at most a quarter of an hour of statistics, which a median over days does not miss.

Counting values instead of averaging them keeps the median exact over any span: a card
that idles at 12 W for a day and at 90 W for an hour has a 12 W median, not a 15 W mean.
A process still holding an idle card is exactly what `eco` should see (it keeps the card
out of its lowest P-state), so the broker's own idle rule (no foreign process, memory under
a threshold) is not applied here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from broker.eco.advice import LOWEST_IDLE_PSTATE
from broker.errors import LedgerError
from broker.gpu.base import GpuDevice, GpuSample, Snapshot
from broker.ledger.base import IdleRecord, Ledger

log = logging.getLogger(__name__)

SLOT_SECONDS = 900
# Slots kept while the ledger refuses writes: a week of 8 cards; past it the oldest go.
MAX_HELD = 8 * 7 * 96
# How far back the in-memory summary (for /metrics and the dashboard) reaches.
RECENT = timedelta(hours=24)


@dataclass
class _Slot:
    device: GpuDevice
    slot: int
    samples: int = 0
    watts: Counter[int] = field(default_factory=Counter)
    pstates: Counter[int] = field(default_factory=Counter)
    memory_mb: Counter[int] = field(default_factory=Counter)
    processes: Counter[str] = field(default_factory=Counter)

    def record(self) -> IdleRecord:
        start = datetime.fromtimestamp(self.slot * SLOT_SECONDS, UTC)
        return IdleRecord(
            gpu_uuid=self.device.uuid,
            gpu_index=self.device.index,
            start=start,
            end=start + timedelta(seconds=SLOT_SECONDS),
            samples=self.samples,
            watts=dict(self.watts),
            pstates=dict(self.pstates),
            memory_mb=dict(self.memory_mb),
            processes=dict(self.processes),
        )


@dataclass(frozen=True)
class IdleSummary:
    """One card's idle samples over a span, as `eco` judges them."""

    samples: int
    median_watts: float | None
    mean_watts: float | None  # shows what the median hides: a card held hot part of the time
    pstate: int | None  # the P-state it idled in most
    lowest_pstate_share: float | None  # share of idle samples (with a P-state) in P8 or below
    median_memory_mb: float | None
    processes: tuple[tuple[str, float], ...]  # (name, share of idle samples), largest first


def summarize(records: Iterable[IdleRecord]) -> IdleSummary:
    samples = 0
    watts: Counter[int] = Counter()
    pstates: Counter[int] = Counter()
    memory: Counter[int] = Counter()
    processes: Counter[str] = Counter()
    for r in records:
        samples += r.samples
        watts.update(r.watts)
        pstates.update(r.pstates)
        memory.update(r.memory_mb)
        processes.update(r.processes)
    if samples == 0:
        return IdleSummary(0, None, None, None, None, None, ())
    pstate = max(pstates.items(), key=lambda kv: (kv[1], kv[0]))[0] if pstates else None
    known = sum(pstates.values())
    lowest = sum(n for p, n in pstates.items() if p >= LOWEST_IDLE_PSTATE)
    return IdleSummary(
        samples=samples,
        median_watts=_median(watts),
        mean_watts=sum(w * n for w, n in watts.items()) / sum(watts.values()),
        pstate=pstate,
        lowest_pstate_share=lowest / known if known else None,
        median_memory_mb=_median(memory),
        processes=tuple(
            (name, count / samples)
            for name, count in sorted(processes.items(), key=lambda kv: (-kv[1], kv[0]))
        ),
    )


def _median(counts: Counter[int]) -> float | None:
    """The median of values given as counts (the mean of the two middle ones when even)."""
    total = sum(counts.values())
    if total == 0:
        return None
    ordered = sorted(counts.items())

    def nth(n: int) -> int:
        seen = 0
        for value, count in ordered:
            seen += count
            if seen > n:
                return value
        return ordered[-1][0]

    return (nth((total - 1) // 2) + nth(total // 2)) / 2.0


def process_label(name: str | None, pid: int) -> str:
    return os.path.basename(name) if name else f"pid {pid}"


def idle_sample(s: GpuSample, utilization_pct: float) -> bool:
    """A reading of a card doing no work (below `gpus.idle_utilization_pct`): only such a
    card says anything about idle draw."""
    return not s.lost and s.utilization_pct is not None and s.utilization_pct < utilization_pct


class IdleHistory:
    """Counts idle samples per card and slot; writes finished slots to the ledger."""

    def __init__(
        self,
        devices: Sequence[GpuDevice],
        ledger: Ledger | None,
        *,
        utilization_pct: float,
    ) -> None:
        self._devices = {d.index: d for d in devices}
        self._ledger = ledger
        self._util = utilization_pct
        self._open: dict[int, _Slot] = {}
        self._pending: list[IdleRecord] = []
        self._recent: list[IdleRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def observe(self, snap: Snapshot) -> None:
        slot = math.floor(snap.wall.timestamp() / SLOT_SECONDS)
        for sample in snap.gpus:
            device = self._devices.get(sample.index)
            if device is None or not self._idle(sample):
                continue
            current = self._open.get(sample.index)
            if current is not None and current.slot != slot:
                self._finish(current)
                current = None
            if current is None:
                current = self._open[sample.index] = _Slot(device, slot)
            assert sample.power_w is not None
            current.samples += 1
            current.watts[round(sample.power_w)] += 1
            if sample.pstate is not None:
                current.pstates[sample.pstate] += 1
            if sample.memory_used_mb is not None:
                current.memory_mb[round(sample.memory_used_mb)] += 1
            procs = snap.processes.get(sample.index) if snap.processes_at is not None else None
            for proc in procs or ():
                current.processes[process_label(proc.name, proc.pid)] += 1
        # Slots of cards that stopped idling close too, once their quarter is over.
        for index, current in list(self._open.items()):
            if current.slot != slot:
                self._finish(current)
                del self._open[index]
        if self._pending and self._task is None and self._ledger is not None:
            self._task = asyncio.create_task(self._write(), name="idle-history-write")

    def _idle(self, s: GpuSample) -> bool:
        return s.power_w is not None and idle_sample(s, self._util)

    def _finish(self, slot: _Slot) -> None:
        record = slot.record()
        self._pending.append(record)
        if len(self._pending) > MAX_HELD:
            del self._pending[: len(self._pending) - MAX_HELD]
        self._recent.append(record)
        cutoff = record.end - RECENT
        self._recent = [r for r in self._recent if r.end > cutoff]

    def recent(self, index: int) -> IdleSummary:
        """This run's idle samples of card `index` over about the last day (for /metrics
        and the dashboard, which must not read the ledger on every scrape)."""
        records = [r for r in self._recent if r.gpu_index == index]
        current = self._open.get(index)
        if current is not None:
            records.append(current.record())
        return summarize(records)

    def unwritten(self) -> list[IdleRecord]:
        """Records not in the ledger yet: the slots still open and those waiting to be
        written. With the ledger's, every idle sample of this run is counted once."""
        return [*self._pending, *(slot.record() for slot in self._open.values())]

    async def _write(self) -> None:
        assert self._ledger is not None
        try:
            while self._pending:
                batch = list(self._pending)
                await self._ledger.add_idle(batch)
                del self._pending[: len(batch)]
                if self._failing:
                    self._failing = False
                    log.info("idle statistics are written to the ledger again")
        except LedgerError as err:
            if not self._failing:
                self._failing = True
                log.warning("idle statistics not written to the ledger (kept for later): %s", err)
        finally:
            self._task = None

    async def close(self) -> None:
        """Write every slot, the unfinished ones too (a restart starts new ones)."""
        if self._task is not None:
            await asyncio.shield(self._task)
        for current in self._open.values():
            self._finish(current)
        self._open.clear()
        if self._pending and self._ledger is not None:
            await self._write()
