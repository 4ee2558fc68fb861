"""The GPU backend interface: what the broker asks of NVML, and of the fake that stands in.

A backend answers three questions: which GPUs exist (`devices`, once), how each one is doing
now (`sample`, every tick) and which processes hold it (`processes`, every few seconds,
because listing processes costs milliseconds per GPU). A value the driver does not give is
`None`, never 0: a reader must not mistake "unknown" for "idle" or "draws nothing". Why it
is unknown goes in `errors`, keyed by the field's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

# Reasons a field is None, in `GpuSample.errors`. Backends use these words so logs, status
# and tests read the same whatever the backend.
NOT_SUPPORTED = "not supported"
NO_PERMISSION = "no permission"
GPU_LOST = "gpu lost"


@dataclass(frozen=True)
class GpuDevice:
    """What does not change while the broker runs."""

    index: int
    uuid: str
    name: str
    memory_total_mb: float | None
    power_limit_w: float | None  # the limit the driver enforces now
    power_max_w: float | None  # the highest limit the card allows: the ceiling for clamping
    # For eco advice: the limit the card ships with (a renter's limit is never below it),
    # the lowest it accepts, and whether the driver stays loaded between clients (off, a
    # card wakes to a higher P-state for every client and idles hotter).
    power_default_w: float | None = None
    power_min_w: float | None = None
    persistence_mode: bool | None = None


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one tick."""

    index: int
    uuid: str
    utilization_pct: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    power_w: float | None = None
    energy_mj: int | None = None  # the driver's counter: mJ since it loaded, may restart
    pstate: int | None = None  # 0 (full speed) .. 15 (lowest)
    temperature_c: float | None = None
    lost: bool = False
    errors: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_mb: float | None
    name: str | None
    kind: Literal["compute", "graphics"] = "compute"


# Per GPU index: its processes, or None when they cannot be listed (lost, unsupported).
ProcessMap = Mapping[int, tuple[GpuProcess, ...] | None]


@dataclass(frozen=True)
class Snapshot:
    """Every GPU at one tick, as the sampler hands it to the rest of the broker."""

    at: float  # monotonic seconds
    wall: datetime
    gpus: tuple[GpuSample, ...]
    processes: ProcessMap
    processes_at: float | None  # when `processes` was read; None before the first listing
    # How long reading `gpus` took: each GPU was read somewhere in [at, at + read_s]. On an
    # H100 the energy counter alone took 3 ms (median) to 17 ms (p99) to read, and one
    # sample() up to 80 ms, so a counter's true interval is not exactly the ticks' interval.
    read_s: float = 0.0

    def gpu(self, index: int) -> GpuSample | None:
        for sample in self.gpus:
            if sample.index == index:
                return sample
        return None


class GpuBackend(Protocol):
    """Implemented by `NvmlBackend` and `FakeBackend`.

    Methods raise `broker.errors.GpuError` only when the backend fails as a whole (no
    driver, a call that timed out); a problem with one GPU or one field is reported in the
    sample instead, so the other GPUs and fields go on.
    """

    @property
    def kind(self) -> str:
        """The backend's name: "nvml" or "fake"."""
        ...

    async def start(self) -> list[GpuDevice]:
        """Initialise (if not yet) and return the devices. Safe to call more than once."""
        ...

    async def devices(self) -> list[GpuDevice]: ...

    async def sample(self) -> list[GpuSample]:
        """One reading per device, in device order."""
        ...

    async def processes(self) -> ProcessMap: ...

    async def set_power_limit(self, index: int, watts: float) -> float:
        """Set GPU `index`'s power limit and return it as read back (W). Raises
        `GpuPermissionError` without the privilege, `GpuSettingError` when the card refuses
        the value or the read-back differs. `devices()` shows the new limit after."""
        ...

    async def set_persistence_mode(self, index: int, on: bool) -> bool:
        """Turn persistence mode on or off and return it as read back; errors as above."""
        ...

    async def close(self) -> None: ...
