"""GPU telemetry: backends (NVML, fake), the sampler, energy accounting, idle detection."""

from __future__ import annotations

import logging

from broker.clock import Clock
from broker.config import GpusSection
from broker.errors import GpuError
from broker.gpu.base import GpuBackend, GpuDevice, GpuProcess, GpuSample, Snapshot
from broker.gpu.fake import FakeBackend
from broker.gpu.nvml import NvmlBackend

__all__ = [
    "FakeBackend",
    "GpuBackend",
    "GpuDevice",
    "GpuProcess",
    "GpuSample",
    "NvmlBackend",
    "Snapshot",
    "create_backend",
]

log = logging.getLogger(__name__)


async def create_backend(gpus: GpusSection, clock: Clock) -> GpuBackend:
    """The backend `[gpus] backend` asks for, started.

    "nvml" fails with `GpuError` when no driver answers; "auto" then falls back to the
    fake GPUs with one loud warning, so nobody mistakes simulated numbers for real ones.
    It is async because starting NVML blocks (it runs in NVML's worker thread).
    """
    if gpus.backend == "fake":
        fake = FakeBackend(gpus.fake, clock)
        await fake.start()
        return fake
    nvml = NvmlBackend(timeout=gpus.sample_timeout.total_seconds())
    try:
        await nvml.start()
    except GpuError as err:
        await nvml.close()
        if gpus.backend == "nvml":
            raise
        log.warning(
            "NO NVIDIA DRIVER ANSWERED (%s): using %d SIMULATED GPUs from [gpus] fake; "
            "power, energy and idle readings are not real",
            err,
            len(gpus.fake),
        )
        fake = FakeBackend(gpus.fake, clock)
        await fake.start()
        return fake
    return nvml
