"""A stand-in for libnvidia-ml: the C symbols in Python, for the real nvidia-ml-py code.

`pynvml.nvmlLib` is replaced by an object whose attributes are the C symbols: Python
callables that get the same ctypes arguments the real library would (byref pointers,
string buffers, struct arrays), fill them and return an NVML status code. So the bindings'
own marshalling, error mapping and size-retry protocol run for real; only the driver is
simulated. `install()` puts it in place (tests use the `driver` fixture of test_gpu_nvml.py);
`python -m fakes.nvml STATE_FILE gpu-broker-args...` runs the broker against a driver whose
GPUs and settings live in STATE_FILE, as a real driver's outlive the broker's process.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pynvml

MB = 1024 * 1024


@dataclass
class StandInGpu:
    uuid: str
    name: str = "NVIDIA GeForce RTX 3090"
    total: int = 24576 * MB
    used: int = 300 * MB
    util: int = 3
    power_mw: int = 21500
    energy_mj: int = 123_456_789
    pstate: int = 8
    temp: int = 41
    limit_mw: int = 350_000
    max_mw: int = 400_000
    default_mw: int = 350_000
    persistence: int = 1
    min_mw: int = 100_000
    compute: list[tuple[int, int]] = field(default_factory=list)  # (pid, bytes)
    graphics: list[tuple[int, int]] = field(default_factory=list)


def _out(ref: Any) -> Any:
    """The object a `byref(...)` argument points to."""
    return ref._obj


class StandInDriver:
    """The C symbols of libnvidia-ml, in Python. `fail[(symbol, gpu)] = code` makes one
    symbol answer an error for one GPU; `missing` symbols do not exist (an old driver)."""

    def __init__(self, gpus: list[StandInGpu]) -> None:
        self.gpus = gpus
        self._structs = [pynvml.struct_c_nvmlDevice_t() for _ in gpus]
        self.fail: dict[tuple[str, int], int] = {}
        self.missing: set[str] = set()
        self.calls: dict[str, int] = {}
        self.process_calls: list[tuple[int, bool]] = []  # (count passed in, array given)
        self.names = {4242: b"/usr/bin/ollama"}
        self.init_result = 0
        self.block: threading.Event | None = None
        self.state_file: Path | None = None
        # Setters answer success and change nothing (as the _v2 power setter does without
        # permission).
        self.silent_sets = False

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)

    def _gpu(self, handle: Any) -> int:
        address = ctypes.addressof(handle.contents)
        return next(i for i, s in enumerate(self._structs) if ctypes.addressof(s) == address)

    def _enter(self, symbol: str, handle: Any = None) -> tuple[int, StandInGpu | None]:
        self.calls[symbol] = self.calls.get(symbol, 0) + 1
        if handle is None:
            return 0, None
        index = self._gpu(handle)
        return self.fail.get((symbol, index), 0), self.gpus[index]

    # -- system ------------------------------------------------------------------------------

    def nvmlInitWithFlags(self, flags: int) -> int:
        self._enter("nvmlInitWithFlags")
        return self.init_result

    def nvmlShutdown(self) -> int:
        self._enter("nvmlShutdown")
        return 0

    def nvmlSystemGetDriverVersion(self, buf: Any, size: Any) -> int:
        buf.value = b"560.35.03"
        return 0

    def nvmlSystemGetNVMLVersion(self, buf: Any, size: Any) -> int:
        buf.value = b"12.560.35.03"
        return 0

    def nvmlSystemGetProcessName(self, pid: Any, buf: Any, size: Any) -> int:
        name = self.names.get(pid.value)
        if name is None:
            return pynvml.NVML_ERROR_NOT_FOUND
        buf.value = name
        return 0

    def nvmlDeviceGetCount_v2(self, count: Any) -> int:
        _out(count).value = len(self.gpus)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index: Any, device: Any) -> int:
        pointer = _out(device)
        pointer.contents = self._structs[index.value]
        return 0

    # -- per device --------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, h: Any, buf: Any, size: Any) -> int:
        code, g = self._enter("nvmlDeviceGetUUID", h)
        if not code and g:
            buf.value = g.uuid.encode()
        return code

    def nvmlDeviceGetName(self, h: Any, buf: Any, size: Any) -> int:
        code, g = self._enter("nvmlDeviceGetName", h)
        if not code and g:
            buf.value = g.name.encode()
        return code

    def nvmlDeviceGetEnforcedPowerLimit(self, h: Any, limit: Any) -> int:
        code, g = self._enter("nvmlDeviceGetEnforcedPowerLimit", h)
        if not code and g:
            _out(limit).value = g.limit_mw
        return code

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: Any, lo: Any, hi: Any) -> int:
        code, g = self._enter("nvmlDeviceGetPowerManagementLimitConstraints", h)
        if not code and g:
            _out(lo).value, _out(hi).value = g.min_mw, g.max_mw
        return code

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: Any, limit: Any) -> int:
        code, g = self._enter("nvmlDeviceGetPowerManagementDefaultLimit", h)
        if not code and g:
            _out(limit).value = g.default_mw
        return code

    def nvmlDeviceGetPowerManagementLimit(self, h: Any, limit: Any) -> int:
        code, g = self._enter("nvmlDeviceGetPowerManagementLimit", h)
        if not code and g:
            _out(limit).value = g.limit_mw
        return code

    # The setters take their values by value (c_uint), as the C functions do. Like the
    # driver, a refused or out-of-range call changes nothing.

    def nvmlDeviceSetPowerManagementLimit(self, h: Any, limit: Any) -> int:
        code, g = self._enter("nvmlDeviceSetPowerManagementLimit", h)
        if code or g is None:
            return code
        if not g.min_mw <= limit.value <= g.max_mw:
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        if self.silent_sets:
            return 0
        g.limit_mw = limit.value
        self.changed()
        return 0

    def nvmlDeviceSetPersistenceMode(self, h: Any, mode: Any) -> int:
        code, g = self._enter("nvmlDeviceSetPersistenceMode", h)
        if code or g is None:
            return code
        g.persistence = 1 if mode.value == pynvml.NVML_FEATURE_ENABLED else 0
        self.changed()
        return 0

    def changed(self) -> None:
        """A setting changed: a driver keeps it after the process that set it is gone, so
        with `state_file` it is written there for the next process (and the test) to see."""
        if self.state_file is not None:
            save(self, self.state_file)

    def nvmlDeviceGetPersistenceMode(self, h: Any, mode: Any) -> int:
        code, g = self._enter("nvmlDeviceGetPersistenceMode", h)
        if not code and g:
            _out(mode).value = g.persistence
        return code

    def nvmlDeviceGetUtilizationRates(self, h: Any, util: Any) -> int:
        code, g = self._enter("nvmlDeviceGetUtilizationRates", h)
        if not code and g:
            _out(util).gpu, _out(util).memory = g.util, 1
        return code

    def nvmlDeviceGetMemoryInfo_v2(self, h: Any, mem: Any) -> int:
        code, g = self._enter("nvmlDeviceGetMemoryInfo_v2", h)
        info = _out(mem)
        if info.version != pynvml.nvmlMemory_v2:
            return pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        if not code and g:
            info.total, info.used, info.reserved = g.total, g.used, 400 * MB
            info.free = g.total - g.used - info.reserved
        return code

    def nvmlDeviceGetMemoryInfo(self, h: Any, mem: Any) -> int:
        code, g = self._enter("nvmlDeviceGetMemoryInfo", h)
        if not code and g:
            # v1 counts reserved memory as used.
            _out(mem).total, _out(mem).used = g.total, g.used + 400 * MB
            _out(mem).free = g.total - g.used - 400 * MB
        return code

    def nvmlDeviceGetPowerUsage(self, h: Any, mw: Any) -> int:
        code, g = self._enter("nvmlDeviceGetPowerUsage", h)
        if self.block is not None:
            self.block.wait(5)
        if not code and g:
            _out(mw).value = g.power_mw
        return code

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Any, mj: Any) -> int:
        code, g = self._enter("nvmlDeviceGetTotalEnergyConsumption", h)
        if not code and g:
            _out(mj).value = g.energy_mj
        return code

    def nvmlDeviceGetPerformanceState(self, h: Any, p: Any) -> int:
        code, g = self._enter("nvmlDeviceGetPerformanceState", h)
        if not code and g:
            _out(p).value = g.pstate
        return code

    def nvmlDeviceGetTemperature(self, h: Any, sensor: Any, t: Any) -> int:
        code, g = self._enter("nvmlDeviceGetTemperature", h)
        if not code and g:
            assert sensor.value == pynvml.NVML_TEMPERATURE_GPU
            _out(t).value = g.temp
        return code

    def _processes(self, symbol: str, h: Any, count: Any, array: Any, kind: str) -> int:
        code, g = self._enter(symbol, h)
        if code or g is None:
            return code
        procs = g.compute if kind == "compute" else g.graphics
        c = _out(count)
        self.process_calls.append((c.value, array is not None))
        # The real protocol: a call with too small a count answers INSUFFICIENT_SIZE and
        # writes the count needed; the caller allocates and calls again.
        if array is None or c.value < len(procs):
            c.value = len(procs)
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE if procs else 0
        for i, (pid, used) in enumerate(procs):
            array[i].pid, array[i].usedGpuMemory = pid, used
        c.value = len(procs)
        return 0

    def nvmlDeviceGetComputeRunningProcesses_v3(self, h: Any, n: Any, a: Any) -> int:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v3", h, n, a, "compute")

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h: Any, n: Any, a: Any) -> int:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", h, n, a, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, h: Any, n: Any, a: Any) -> int:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses_v3", h, n, a, "graphics")


class Lib:
    """What pynvml sees as the loaded library: missing symbols raise AttributeError."""

    def __init__(self, driver: StandInDriver) -> None:
        self._driver = driver

    def __getattr__(self, name: str) -> Any:
        self._driver.calls["lookup:" + name] = self._driver.calls.get("lookup:" + name, 0) + 1
        if name in self._driver.missing:
            raise AttributeError(name)
        return getattr(self._driver, name)


def install(drv: StandInDriver) -> dict[str, Any]:
    """Make pynvml load `drv`; returns what `uninstall` needs to put the real one back."""
    cache = pynvml._nvmlGetFunctionPointer_cache
    saved = {"cache": dict(cache), "lib": pynvml.nvmlLib, "refcount": pynvml._nvmlLib_refcount}
    cache.clear()
    pynvml.nvmlLib = Lib(drv)
    pynvml._nvmlLib_refcount = 0
    return saved


def uninstall(saved: dict[str, Any]) -> None:
    cache = pynvml._nvmlGetFunctionPointer_cache
    cache.clear()
    cache.update(saved["cache"])
    pynvml.nvmlLib = saved["lib"]
    pynvml._nvmlLib_refcount = saved["refcount"]


def save(drv: StandInDriver, path: Path) -> None:
    """The GPUs (with their settings) and injected failures, atomically."""
    data = {
        "gpus": [asdict(g) for g in drv.gpus],
        "fail": [[symbol, index, code] for (symbol, index), code in drv.fail.items()],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def load(path: Path) -> StandInDriver:
    data = json.loads(path.read_text())
    gpus = []
    for g in data["gpus"]:
        g["compute"] = [tuple(p) for p in g.get("compute", [])]
        g["graphics"] = [tuple(p) for p in g.get("graphics", [])]
        gpus.append(StandInGpu(**g))
    drv = StandInDriver(gpus)
    drv.fail = {(symbol, index): code for symbol, index, code in data.get("fail", [])}
    drv.state_file = path
    return drv


def main(argv: list[str]) -> int:
    from broker.cli import main as broker_main

    install(load(Path(argv[0])))
    return broker_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
