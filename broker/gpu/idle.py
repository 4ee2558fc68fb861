"""Is a GPU idle? Per GPU, debounced, and never on a guess.

A GPU is idle when its utilisation is under `idle_utilization_pct`, its used memory under
`idle_memory_mb`, and no compute process other than the allowed ones (the local services'
runners, by name or PID) holds it, all of it without a break for `debounce` seconds of
monotonic time. A reading that is unknown (None: unsupported, refused, not listed yet) or a
lost GPU is *not* idle: renting a card out on a guess could take it from a local job.

Graphics-only processes (a desktop session on the card) do not count: they hold a GPU
without computing on it, and utilisation still catches one that is busy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from broker.config import GpusSection
from broker.gpu.base import GpuProcess, GpuSample, Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdleStatus:
    idle: bool
    since: float | None  # monotonic time it began to look idle; None while busy
    reason: str  # why it is not idle; "" once idle


_UNSEEN = IdleStatus(False, None, "not sampled yet")


class IdleDetector:
    def __init__(
        self,
        *,
        utilization_pct: float,
        memory_mb: float,
        debounce: float,
        allowed_names: Iterable[str] = (),
        allowed_pids: Iterable[int] = (),
    ) -> None:
        self._util = utilization_pct
        self._memory = memory_mb
        self._debounce = debounce
        self._names = frozenset(allowed_names)
        self._pids = frozenset(allowed_pids)
        self._status: dict[int, IdleStatus] = {}

    @classmethod
    def from_config(cls, gpus: GpusSection) -> IdleDetector:
        return cls(
            utilization_pct=gpus.idle_utilization_pct,
            memory_mb=gpus.idle_memory_mb,
            debounce=gpus.idle_debounce.total_seconds(),
            allowed_names=gpus.allowed_processes,
        )

    def set_allowed_pids(self, pids: Iterable[int]) -> None:
        """The local services' PIDs, as their watchers learn them."""
        self._pids = frozenset(pids)

    def status(self, index: int) -> IdleStatus:
        return self._status.get(index, _UNSEEN)

    def is_idle(self, index: int) -> bool:
        return self.status(index).idle

    def all_idle(self, indices: Iterable[int]) -> bool:
        return all(self.is_idle(i) for i in indices)

    def unknown(self, reason: str) -> None:
        """Sampling failed: nothing is known, so no GPU is idle (and the debounce restarts)."""
        for index, before in self._status.items():
            if before.idle:
                log.info("GPU %d is no longer known to be idle: %s", index, reason)
            self._status[index] = IdleStatus(False, None, reason)

    def observe(self, snap: Snapshot) -> None:
        for sample in snap.gpus:
            procs = snap.processes.get(sample.index) if snap.processes_at is not None else None
            reason = self._busy_reason(sample, procs)
            before = self.status(sample.index)
            if reason:
                now = IdleStatus(False, None, reason)
            else:
                since = before.since if before.since is not None else snap.at
                idle = snap.at - since >= self._debounce
                now = IdleStatus(idle, since, "" if idle else "settling")
            self._status[sample.index] = now
            if now.idle != before.idle:
                if now.idle:
                    log.info("GPU %d is idle", sample.index)
                else:
                    log.info("GPU %d is busy: %s", sample.index, reason)

    def _busy_reason(self, s: GpuSample, procs: tuple[GpuProcess, ...] | None) -> str:
        if s.lost:
            return "lost"
        if s.utilization_pct is None:
            return f"utilisation unknown ({s.errors.get('utilization_pct', 'no reading')})"
        if s.utilization_pct >= self._util:
            return f"utilisation {s.utilization_pct:g}% (idle under {self._util:g}%)"
        if s.memory_used_mb is None:
            return f"memory use unknown ({s.errors.get('memory_used_mb', 'no reading')})"
        if s.memory_used_mb >= self._memory:
            return f"{s.memory_used_mb:.0f} MB in use (idle under {self._memory:g} MB)"
        if procs is None:
            return "process list unknown"
        for proc in procs:
            if proc.kind == "compute" and not self._allowed(proc):
                return f"process {proc.pid} ({proc.name or 'unnamed'}) is not a local service"
        return ""

    def _allowed(self, proc: GpuProcess) -> bool:
        if proc.pid in self._pids:
            return True
        if proc.name is None:
            return False
        return proc.name in self._names or os.path.basename(proc.name) in self._names
