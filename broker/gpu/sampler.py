"""The GPU sampler: one tick per `sample_interval`, on the injected clock.

A coordinator in the Home Assistant sense: it reads the backend, keeps the latest
`Snapshot` for whoever asks (status, metrics, the scheduler), feeds energy accounting and
idle detection, and logs the first failure and the recovery instead of every failed tick.
Processes are listed only every `process_interval`, because that costs milliseconds per GPU.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from broker.clock import Clock
from broker.errors import GpuError
from broker.gpu.base import GpuBackend, GpuDevice, ProcessMap, Snapshot
from broker.gpu.energy import EnergyAccountant
from broker.gpu.idle import IdleDetector

log = logging.getLogger(__name__)


class GpuSampler:
    def __init__(
        self,
        backend: GpuBackend,
        clock: Clock,
        *,
        interval: float = 1.0,
        process_interval: float = 5.0,
        energy: EnergyAccountant | None = None,
        idle: IdleDetector | None = None,
    ) -> None:
        self.backend = backend
        self.energy = energy
        self.idle = idle
        self._clock = clock
        self._interval = interval
        self._process_interval = process_interval
        self._next_processes = -math.inf
        self._processes: ProcessMap = {}
        self._processes_at: float | None = None
        self._failures = 0
        self._lost: set[int] = set()
        self.latest: Snapshot | None = None
        # Told of every snapshot after energy and idle detection (eco's idle history):
        # quick, no I/O.
        self.listeners: list[Callable[[Snapshot], None]] = []
        self.devices: list[GpuDevice] = []
        self._flush_task: asyncio.Task[None] | None = None

    @property
    def failures(self) -> int:
        """Ticks failed in a row (0 when the last one worked)."""
        return self._failures

    async def start(self) -> list[GpuDevice]:
        self.devices = await self.backend.start()
        return self.devices

    async def run(self) -> None:
        """Tick until cancelled. A late tick does not cause a burst: missed ones are skipped."""
        if not self.devices:
            await self.start()
        next_at = self._clock.monotonic()
        while True:
            await self._clock.sleep_until(next_at)
            await self.tick()
            next_at += self._interval
            behind = self._clock.monotonic() - next_at
            if behind > 0:
                next_at += math.ceil(behind / self._interval) * self._interval

    async def tick(self) -> Snapshot | None:
        at = self._clock.monotonic()
        try:
            samples = await self.backend.sample()
        except GpuError as err:
            self._failed(err)
            return None
        read_s = self._clock.monotonic() - at
        if at >= self._next_processes:
            self._next_processes = at + self._process_interval
            try:
                self._processes = await self.backend.processes()
                self._processes_at = at
            except GpuError as err:
                # Keeping the old list would let a GPU look free of processes it may have
                # gained since: unknown is safer (idle detection treats it as busy).
                self._processes, self._processes_at = {}, None
                self._failed(err)
                return None
        self._recovered()
        snap = Snapshot(
            at=at,
            wall=self._clock.now(),
            gpus=tuple(samples),
            processes=self._processes,
            processes_at=self._processes_at,
            read_s=read_s,
        )
        self.latest = snap
        for sample in samples:
            if sample.lost and sample.index not in self._lost:
                self._lost.add(sample.index)
                log.error("GPU %d (%s) is lost; the others go on", sample.index, sample.uuid)
        if self.energy is not None:
            self.energy.observe(snap)
            if self.energy.flush_due() and self._flush_task is None:
                # In the background: a slow disk must not delay the next sample.
                self._flush_task = asyncio.create_task(self._flush(), name="energy-flush")
        if self.idle is not None:
            self.idle.observe(snap)
        for listener in self.listeners:
            listener(snap)
        return snap

    async def _flush(self) -> None:
        assert self.energy is not None
        try:
            await self.energy.flush()
        finally:
            self._flush_task = None

    async def flushed(self) -> None:
        """Wait for a flush in progress, if any."""
        task = self._flush_task
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Write the energy not yet flushed and release the backend."""
        try:
            await self.flushed()
            if self.energy is not None:
                await self.energy.flush()
        finally:
            await self.backend.close()

    def _failed(self, err: GpuError) -> None:
        self._failures += 1
        if self.idle is not None:
            self.idle.unknown(f"sampling failed: {err}")
        if self._failures == 1:
            log.warning("GPU sampling failed: %s (logged again when it recovers)", err)
        else:
            log.debug("GPU sampling failed again (%d in a row): %s", self._failures, err)

    def _recovered(self) -> None:
        if self._failures:
            log.info("GPU sampling works again after %d failed ticks", self._failures)
            self._failures = 0
