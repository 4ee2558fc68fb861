"""Real NVIDIA GPUs through NVML (the `nvidia-ml-py` bindings, imported as `pynvml`).

NVML calls block, sometimes for long (a GPU falling off the bus can hang a call for
seconds), so every call runs in one dedicated worker thread and each batch (one tick) runs
under a timeout: a stuck driver costs the broker a missed sample, never its event loop.
One thread also means NVML is never entered from two threads at once.

Errors are handled per GPU and per field, as nvitop does: a field the card does not support
is None for good and never asked again; a refused one (no permission) is None with a reason
and asked again next tick; a lost GPU is marked lost while the others go on; a call missing
from an old driver (`NVMLError_FunctionNotFound`, or `NVMLLibraryMismatchError`, which does
not inherit from `NVMLError`) is logged once and treated as unsupported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import pynvml  # type: ignore[import-untyped]

from broker.errors import GpuError, GpuPermissionError, GpuSettingError
from broker.gpu.base import (
    GPU_LOST,
    NO_PERMISSION,
    NOT_SUPPORTED,
    GpuDevice,
    GpuProcess,
    GpuSample,
    ProcessMap,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_MB = 1024 * 1024
_PSTATE_UNKNOWN = 32
_OLD_DRIVER = "not in this driver"
_SAMPLE_FIELDS = (
    "utilization_pct",
    "memory_used_mb",
    "power_w",
    "energy_mj",
    "pstate",
    "temperature_c",
)


class _Lost(Exception):
    """Raised inside the worker when a call says the GPU is gone."""


@dataclass
class _Gpu:
    index: int
    handle: Any
    device: GpuDevice
    lost: bool = False
    # Fields answered "not supported" (or missing from the driver) once: never asked again.
    unsupported: dict[str, str] = field(default_factory=dict)
    memory_v1: bool = False  # the driver lacks nvmlDeviceGetMemoryInfo_v2
    # The process-list calls that work here, found on first use (v3, else v2).
    process_calls: dict[str, Callable[[Any], Any]] = field(default_factory=dict)


class NvmlBackend:
    """`GpuBackend` over the NVIDIA driver. Initialises NVML lazily, on the first call."""

    def __init__(self, *, timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        self._gpus: list[_Gpu] | None = None
        self._logged: set[str] = set()

    @property
    def kind(self) -> str:
        return "nvml"

    # -- plumbing -------------------------------------------------------------------------

    async def _call(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, fn)
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            # The call goes on in the worker; the next ones queue behind it and time out
            # too until the driver answers again.
            raise GpuError(f"NVML did not answer within {self._timeout:g}s") from None

    def _log_once(self, key: str, level: int, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    # -- the backend interface --------------------------------------------------------------

    async def start(self) -> list[GpuDevice]:
        return await self._call(self._devices)

    async def devices(self) -> list[GpuDevice]:
        return await self._call(self._devices)

    async def sample(self) -> list[GpuSample]:
        return await self._call(self._sample_all)

    async def processes(self) -> ProcessMap:
        return await self._call(self._processes_all)

    async def set_power_limit(self, index: int, watts: float) -> float:
        return await self._call(partial(self._set_power_limit, index, watts))

    async def set_persistence_mode(self, index: int, on: bool) -> bool:
        return await self._call(partial(self._set_persistence, index, on))

    async def close(self) -> None:
        if self._gpus is not None:
            try:
                await self._call(pynvml.nvmlShutdown)
            except (GpuError, pynvml.NVMLError) as err:
                log.debug("nvmlShutdown failed: %s", err)
            self._gpus = None
        # Not waiting: a worker stuck in the driver must not hang the broker's shutdown.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- in the worker thread ----------------------------------------------------------------

    def _ensure_init(self) -> list[_Gpu]:
        if self._gpus is not None:
            return self._gpus
        try:
            pynvml.nvmlInit()
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as err:
            raise GpuError(f"NVML cannot start ({type(err).__name__}: {err})") from err
        except pynvml.NVMLLibraryMismatchError as err:
            raise GpuError(f"the NVIDIA driver is too old for nvidia-ml-py: {err}") from err
        gpus = [self._open(i) for i in range(count)]
        self._gpus = gpus
        return gpus

    def _open(self, index: int) -> _Gpu:
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = str(pynvml.nvmlDeviceGetUUID(handle))
        except pynvml.NVMLError as err:
            # Without a handle there is nothing to ask; the GPU stays lost until a restart.
            log.error("GPU %d cannot be opened (%s); it is treated as lost", index, err)
            dev = GpuDevice(index, f"unknown-{index}", "unknown", None, None, None)
            return _Gpu(index, None, dev, lost=True)
        gpu = _Gpu(index, handle, GpuDevice(index, uuid, "unknown", None, None, None))
        errors: dict[str, str] = {}
        try:
            name = self._read(gpu, "name", lambda: str(pynvml.nvmlDeviceGetName(handle)), errors)
            memory = self._read(gpu, "memory_total_mb", lambda: self._memory(gpu)[1], errors)
            limit = self._read(
                gpu,
                "power_limit_w",
                lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
                errors,
            )
            bounds = self._read(
                gpu,
                "power_max_w",
                lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle),
                errors,
            )
            default = self._read(
                gpu,
                "power_default_w",
                lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000.0,
                errors,
            )
            persistence = self._read(
                gpu,
                "persistence_mode",
                lambda: pynvml.nvmlDeviceGetPersistenceMode(handle)
                == pynvml.NVML_FEATURE_ENABLED,
                errors,
            )
        except _Lost:
            self._mark_lost(gpu)
            return gpu
        floor = bounds[0] / 1000.0 if bounds else None
        ceiling = bounds[1] / 1000.0 if bounds else None
        gpu.device = GpuDevice(
            index,
            uuid,
            name or "unknown",
            memory,
            limit,
            ceiling or limit,
            power_default_w=default,
            power_min_w=floor,
            persistence_mode=persistence,
        )
        return gpu

    def _devices(self) -> list[GpuDevice]:
        return [gpu.device for gpu in self._ensure_init()]

    def _mark_lost(self, gpu: _Gpu) -> None:
        gpu.lost = True
        log.error(
            "GPU %d (%s) is lost: the driver no longer reaches it; the other GPUs go on. "
            "It needs a reset or a reboot",
            gpu.index,
            gpu.device.uuid,
        )

    def _read(self, gpu: _Gpu, name: str, fn: Callable[[], T], errors: dict[str, str]) -> T | None:
        """One field of one GPU: its value, or None with the reason put in `errors`."""
        if name in gpu.unsupported:
            errors[name] = gpu.unsupported[name]
            return None
        try:
            return fn()
        except pynvml.NVMLError_NotSupported:
            gpu.unsupported[name] = errors[name] = NOT_SUPPORTED
            log.info("GPU %d does not support %s; it stays unknown", gpu.index, name)
        except pynvml.NVMLError_NoPermission:
            errors[name] = NO_PERMISSION
            self._log_once(
                f"perm:{gpu.index}:{name}",
                logging.WARNING,
                "GPU %d: no permission to read %s (run the broker as a user the driver lets "
                "read it)",
                gpu.index,
                name,
            )
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired):
            raise _Lost from None
        except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLLibraryMismatchError) as err:
            gpu.unsupported[name] = errors[name] = _OLD_DRIVER
            self._log_once(
                f"old:{name}",
                logging.WARNING,
                "the NVIDIA driver lacks the call for %s (%s: %s); it stays unknown. "
                "A newer driver would report it",
                name,
                type(err).__name__,
                err,
            )
        except pynvml.NVMLError as err:
            # Anything else (a timeout inside the driver, an unknown error) may pass: ask
            # again next tick.
            errors[name] = f"{type(err).__name__}: {err}"
        return None

    def _memory(self, gpu: _Gpu) -> tuple[float, float]:
        """(used, total) in MB. v2 counts reserved memory apart from used, so an idle card
        reads near zero, as nvidia-smi shows it; older drivers only have v1."""
        if not gpu.memory_v1:
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(gpu.handle, version=pynvml.nvmlMemory_v2)
                return info.used / _MB, info.total / _MB
            except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NotSupported):
                gpu.memory_v1 = True
        info = pynvml.nvmlDeviceGetMemoryInfo(gpu.handle)
        return info.used / _MB, info.total / _MB

    def _sample_all(self) -> list[GpuSample]:
        return [self._sample(gpu) for gpu in self._ensure_init()]

    def _sample(self, gpu: _Gpu) -> GpuSample:
        if gpu.lost:
            return _lost_sample(gpu)
        h = gpu.handle
        errors: dict[str, str] = {}
        try:
            util = self._read(
                gpu,
                "utilization_pct",
                lambda: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                errors,
            )
            memory = self._read(gpu, "memory_used_mb", lambda: self._memory(gpu), errors)
            power = self._read(
                gpu, "power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0, errors
            )
            energy = self._read(
                gpu,
                "energy_mj",
                lambda: int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)),
                errors,
            )
            pstate = self._read(
                gpu, "pstate", lambda: int(pynvml.nvmlDeviceGetPerformanceState(h)), errors
            )
            temp = self._read(
                gpu,
                "temperature_c",
                lambda: float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
                errors,
            )
        except _Lost:
            self._mark_lost(gpu)
            return _lost_sample(gpu)
        if memory is None and "memory_used_mb" in errors:
            errors.setdefault("memory_total_mb", errors["memory_used_mb"])
        return GpuSample(
            index=gpu.index,
            uuid=gpu.device.uuid,
            utilization_pct=util,
            memory_used_mb=memory[0] if memory else None,
            memory_total_mb=memory[1] if memory else gpu.device.memory_total_mb,
            power_w=power,
            energy_mj=energy,
            pstate=None if pstate == _PSTATE_UNKNOWN else pstate,
            temperature_c=temp,
            errors=errors,
        )

    # -- settings (root only), each read back ---------------------------------------------

    def _settable(self, index: int) -> _Gpu:
        gpus = self._ensure_init()
        if not 0 <= index < len(gpus):
            raise GpuSettingError(f"no GPU {index}")
        if gpus[index].lost:
            raise GpuSettingError(f"GPU {index} is lost")
        return gpus[index]

    def _setting(self, gpu: _Gpu, what: str, fn: Callable[[], T]) -> T:
        """One setter or read-back call, its NVML error turned into ours."""
        try:
            return fn()
        except pynvml.NVMLError_NoPermission:
            raise GpuPermissionError(
                f"GPU {gpu.index}: no permission to change {what} (NVML needs root)"
            ) from None
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired):
            self._mark_lost(gpu)
            raise GpuSettingError(f"GPU {gpu.index} is lost") from None
        except (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError) as err:
            raise GpuSettingError(
                f"GPU {gpu.index}: cannot change {what} ({type(err).__name__}: {err})"
            ) from err

    def _set_power_limit(self, index: int, watts: float) -> float:
        gpu = self._settable(index)
        h = gpu.handle
        milliwatts = round(watts * 1000)
        self._setting(gpu, "the power limit",
                      lambda: pynvml.nvmlDeviceSetPowerManagementLimit(h, milliwatts))  # fmt: skip
        # Read back: a setter can report success and change nothing (FACTS: the _v2 one
        # does so without permission).
        got = self._setting(
            gpu, "the power limit", lambda: int(pynvml.nvmlDeviceGetPowerManagementLimit(h))
        )
        gpu.device = replace(gpu.device, power_limit_w=got / 1000.0)
        if got != milliwatts:
            raise GpuSettingError(
                f"GPU {index}: the power limit reads {got / 1000:g} W after setting {watts:g} W"
            )
        return got / 1000.0

    def _set_persistence(self, index: int, on: bool) -> bool:
        gpu = self._settable(index)
        h = gpu.handle
        mode = pynvml.NVML_FEATURE_ENABLED if on else pynvml.NVML_FEATURE_DISABLED
        self._setting(gpu, "persistence mode",
                      lambda: pynvml.nvmlDeviceSetPersistenceMode(h, mode))  # fmt: skip
        got = self._setting(
            gpu,
            "persistence mode",
            lambda: pynvml.nvmlDeviceGetPersistenceMode(h) == pynvml.NVML_FEATURE_ENABLED,
        )
        gpu.device = replace(gpu.device, persistence_mode=got)
        if got != on:
            raise GpuSettingError(
                f"GPU {index}: persistence mode reads {'on' if got else 'off'} after setting it"
            )
        return bool(got)

    def _processes_all(self) -> ProcessMap:
        out: dict[int, tuple[GpuProcess, ...] | None] = {}
        for gpu in self._ensure_init():
            out[gpu.index] = None if gpu.lost else self._processes(gpu)
        return out

    def _processes(self, gpu: _Gpu) -> tuple[GpuProcess, ...] | None:
        errors: dict[str, str] = {}
        try:
            compute = self._read(gpu, "processes", partial(self._list, gpu, "compute"), errors)
            if compute is None:
                return None
            # Graphics processes (a desktop on the card) are extra information: a card
            # that cannot list them still has a usable compute list.
            graphics = self._read(
                gpu, "graphics_processes", partial(self._list, gpu, "graphics"), errors
            )
        except _Lost:
            self._mark_lost(gpu)
            return None
        found: dict[int, GpuProcess] = {}
        # Compute first: a process in both lists is a CUDA process, whatever else it draws.
        for proc in [*compute, *(graphics or [])]:
            found.setdefault(proc.pid, proc)
        return tuple(found.values())

    def _list(self, gpu: _Gpu, kind: str) -> list[GpuProcess]:
        names: dict[int, str | None] = {}
        out = []
        for proc in self._list_raw(gpu, kind):
            pid = int(proc.pid)
            if pid not in names:
                names[pid] = _process_name(pid)
            used = proc.usedGpuMemory
            out.append(
                GpuProcess(
                    pid=pid,
                    used_memory_mb=None if used is None else used / _MB,
                    name=names[pid],
                    kind="compute" if kind == "compute" else "graphics",
                )
            )
        return out

    def _list_raw(self, gpu: _Gpu, kind: str) -> list[Any]:
        """The newest process-list call the driver has: v3 (through the unversioned name,
        which raises NVMLLibraryMismatchError when v3 is missing), else v2. The one that
        worked is kept, so the probing happens once."""
        known = gpu.process_calls.get(kind)
        if known is not None:
            return list(known(gpu.handle))
        base = "nvmlDeviceGetComputeRunningProcesses"
        if kind == "graphics":
            base = "nvmlDeviceGetGraphicsRunningProcesses"
        for name in (base, base + "_v2"):
            fn: Callable[[Any], Any] = getattr(pynvml, name)
            try:
                raw = list(fn(gpu.handle))
            except (pynvml.NVMLLibraryMismatchError, pynvml.NVMLError_FunctionNotFound) as err:
                self._log_once(
                    f"old:{name}",
                    logging.WARNING,
                    "the NVIDIA driver lacks %s (%s); trying an older call",
                    name,
                    type(err).__name__,
                )
                continue
            gpu.process_calls[kind] = fn
            return raw
        # Neither exists: _read marks the field as missing from this driver.
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)


def _process_name(pid: int) -> str | None:
    try:
        return str(pynvml.nvmlSystemGetProcessName(pid)) or None
    except pynvml.NVMLError:
        # Gone already, or another user's process the driver will not name.
        return None


def _lost_sample(gpu: _Gpu) -> GpuSample:
    return GpuSample(
        index=gpu.index,
        uuid=gpu.device.uuid,
        memory_total_mb=gpu.device.memory_total_mb,
        lost=True,
        errors=dict.fromkeys(_SAMPLE_FIELDS, GPU_LOST),
    )


def nvml_version_info() -> dict[str, str | None]:
    """Driver and NVML versions, for `gpu-broker check` and the probe. Call after init."""
    out: dict[str, str | None] = {}
    for key, fn in (
        ("driver", pynvml.nvmlSystemGetDriverVersion),
        ("nvml", pynvml.nvmlSystemGetNVMLVersion),
    ):
        try:
            out[key] = str(fn())
        except (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError):
            out[key] = None
    return out
