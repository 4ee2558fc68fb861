"""Contract tests: the real nvidia-ml-py code against stand-in driver functions.

`pynvml.nvmlLib` is replaced by an object whose attributes are the C symbols: Python
callables that get the same ctypes arguments the real library would (byref pointers,
string buffers, struct arrays), fill them and return an NVML status code. So the bindings'
own marshalling, error mapping and size-retry protocol run for real; only the driver is
simulated.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pynvml
import pytest

from broker.config import GpusSection
from broker.errors import GpuError
from broker.gpu import NvmlBackend, create_backend
from broker.gpu.base import GPU_LOST, NO_PERMISSION, NOT_SUPPORTED

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
            _out(lo).value, _out(hi).value = 100_000, g.max_mw
        return code

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: Any, limit: Any) -> int:
        code, g = self._enter("nvmlDeviceGetPowerManagementDefaultLimit", h)
        if not code and g:
            _out(limit).value = g.default_mw
        return code

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


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInDriver]:
    drv = StandInDriver(
        [
            StandInGpu("GPU-aaaaaaaa-0000-4000-8000-000000000000"),
            StandInGpu("GPU-bbbbbbbb-0000-4000-8000-000000000001", util=87, power_mw=301_250),
        ]
    )
    cache = pynvml._nvmlGetFunctionPointer_cache
    saved = dict(cache)
    cache.clear()
    monkeypatch.setattr(pynvml, "nvmlLib", Lib(drv))
    monkeypatch.setattr(pynvml, "_nvmlLib_refcount", 0)
    yield drv
    cache.clear()
    cache.update(saved)


@pytest.fixture
async def backend(driver: StandInDriver) -> Any:
    nvml = NvmlBackend(timeout=2)
    yield nvml
    await nvml.close()


async def test_normal_reads(driver: StandInDriver, backend: NvmlBackend) -> None:
    first, _ = await backend.start()
    assert (first.index, first.uuid, first.name) == (0, driver.gpus[0].uuid, driver.gpus[0].name)
    assert (first.memory_total_mb, first.power_limit_w, first.power_max_w) == (24576, 350, 400)
    a, b = await backend.sample()
    assert (a.utilization_pct, a.memory_used_mb, a.memory_total_mb) == (3, 300, 24576)
    assert (a.power_w, a.energy_mj, a.pstate, a.temperature_c) == (21.5, 123_456_789, 8, 41)
    assert a.errors == {} and not a.lost
    assert (b.utilization_pct, b.power_w) == (87, 301.25)
    assert driver.calls["nvmlInitWithFlags"] == 1  # lazily, once


async def test_no_driver_is_a_gpu_error_and_auto_falls_back(
    driver: StandInDriver, caplog: pytest.LogCaptureFixture
) -> None:
    from broker.clock import FakeClock

    driver.init_result = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    nvml = NvmlBackend()
    with pytest.raises(GpuError, match="NVMLError_DriverNotLoaded"):
        await nvml.start()
    await nvml.close()
    fake = await create_backend(GpusSection(backend="auto"), FakeClock())
    assert fake.kind == "fake"
    assert "NO NVIDIA DRIVER ANSWERED" in caplog.text
    driver.init_result = 0
    real = await create_backend(GpusSection(backend="auto"), FakeClock())
    assert real.kind == "nvml" and len(await real.devices()) == 2
    await real.close()


async def test_not_supported_energy_is_null_for_good(
    driver: StandInDriver, backend: NvmlBackend
) -> None:
    driver.fail[("nvmlDeviceGetTotalEnergyConsumption", 0)] = pynvml.NVML_ERROR_NOT_SUPPORTED
    for _ in range(3):
        a, b = await backend.sample()
        assert a.energy_mj is None and a.errors["energy_mj"] == NOT_SUPPORTED
        assert a.power_w == 21.5  # the other fields go on
        assert b.energy_mj == 123_456_789  # and the other GPU keeps its counter
    # Asked once for GPU 0, then never again; three times for GPU 1.
    assert driver.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1 + 3


async def test_no_permission_is_null_with_a_reason_and_asked_again(
    driver: StandInDriver, backend: NvmlBackend, caplog: pytest.LogCaptureFixture
) -> None:
    driver.fail[("nvmlDeviceGetPowerUsage", 1)] = pynvml.NVML_ERROR_NO_PERMISSION
    for _ in range(3):
        _, b = await backend.sample()
        assert b.power_w is None and b.errors["power_w"] == NO_PERMISSION
    del driver.fail[("nvmlDeviceGetPowerUsage", 1)]
    _, b = await backend.sample()
    assert b.power_w == 301.25
    assert caplog.text.count("no permission to read power_w") == 1


async def test_a_missing_symbol_means_an_old_driver(
    driver: StandInDriver, backend: NvmlBackend, caplog: pytest.LogCaptureFixture
) -> None:
    driver.missing |= {"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetMemoryInfo_v2"}
    for _ in range(2):
        a, _ = await backend.sample()
        assert a.energy_mj is None and a.errors["energy_mj"] == "not in this driver"
        # Memory falls back to the v1 call (which counts reserved memory as used).
        assert a.memory_used_mb == 700
    assert caplog.text.count("lacks the call for energy_mj") == 1
    # Looked up once per GPU, then never asked again.
    assert driver.calls["lookup:nvmlDeviceGetTotalEnergyConsumption"] == 2


async def test_process_lists_use_the_size_retry_protocol(
    driver: StandInDriver, backend: NvmlBackend
) -> None:
    driver.gpus[0].compute = [(4242, 17_000 * MB), (77, 512 * MB)]
    driver.gpus[0].graphics = [(4242, 17_000 * MB), (900, 64 * MB)]
    procs = await backend.processes()
    first = procs[0]
    assert first is not None
    assert [(p.pid, p.name, p.used_memory_mb, p.kind) for p in first] == [
        (4242, "/usr/bin/ollama", 17_000, "compute"),
        (77, None, 512, "compute"),  # the driver would not name it
        (900, None, 64, "graphics"),
    ]
    assert procs[1] == ()
    # GPU 0, compute: asked with count 0 and no array, told 2, asked again with room.
    assert driver.process_calls[:2] == [(0, False), (2 * 2 + 5, True)]
    # GPU 1 has none: one call answers success with count 0.
    assert (0, False) in driver.process_calls[4:]


async def test_processes_fall_back_to_v2_on_a_library_mismatch(
    driver: StandInDriver, backend: NvmlBackend, caplog: pytest.LogCaptureFixture
) -> None:
    driver.missing.add("nvmlDeviceGetComputeRunningProcesses_v3")
    driver.gpus[1].compute = [(4242, 100 * MB)]
    for _ in range(2):
        procs = await backend.processes()
        assert [p.pid for p in procs[1] or ()] == [4242]
    assert driver.calls["nvmlDeviceGetComputeRunningProcesses_v2"] >= 2
    assert caplog.text.count("lacks nvmlDeviceGetComputeRunningProcesses (NVMLLibrary") == 1


async def test_a_lost_gpu_is_marked_lost_while_the_other_goes_on(
    driver: StandInDriver, backend: NvmlBackend
) -> None:
    await backend.sample()
    driver.fail[("nvmlDeviceGetUtilizationRates", 0)] = pynvml.NVML_ERROR_GPU_IS_LOST
    a, b = await backend.sample()
    assert a.lost and a.utilization_pct is None and a.errors["power_w"] == GPU_LOST
    assert not b.lost and b.utilization_pct == 87
    calls = driver.calls["nvmlDeviceGetPowerUsage"]
    a, b = await backend.sample()
    assert a.lost and b.power_w == 301.25
    assert driver.calls["nvmlDeviceGetPowerUsage"] == calls + 1  # GPU 0 is not asked again
    assert (await backend.processes())[0] is None


# Recorded on an NVIDIA H100 80GB HBM3 (driver 580.159.04, 700 W limit and ceiling) by
# scripts/gpu-smoke, ticks 0.5 s apart, as a bf16 matmul load started: (watts, counter mJ).
H100_LOAD_START = [
    (70.4, 4_255_255),
    (95.3, 4_296_257),
    (453.1, 4_683_842),  # +387.6 J in 0.5 s: 775 W, a little over the 700 W limit
    (724.6, 5_021_701),
    (699.4, 5_383_104),
    (699.5, 5_722_566),
]


async def test_a_real_load_start_is_not_clamped_as_a_counter_glitch(
    driver: StandInDriver, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """On the H100 the first half-second of a load drew ~11 % over the enforced limit;
    the counter was right (it matched integrated power within 0.1 % over 40 s), so that
    energy must be counted, not clamped with a warning."""
    from broker.gpu.energy import EnergyAccountant
    from broker.gpu.sampler import GpuSampler

    for g in driver.gpus:
        g.name, g.limit_mw, g.max_mw = "NVIDIA H100 80GB HBM3", 700_000, 700_000
    nvml = NvmlBackend(timeout=2)
    devices = await nvml.start()
    energy = EnergyAccountant(devices, clock)
    sampler = GpuSampler(nvml, clock, interval=0.5, energy=energy)
    try:
        for watts, mj in H100_LOAD_START:
            for g in driver.gpus:
                g.power_mw, g.energy_mj = int(watts * 1000), mj
            assert await sampler.tick() is not None
            await clock.advance(0.5)
    finally:
        await sampler.close()
    counted = (H100_LOAD_START[-1][1] - H100_LOAD_START[0][1]) / 1000
    assert energy.total_joules(devices[0].uuid) == pytest.approx(counted)
    assert "more than the card can draw" not in caplog.text


async def test_a_hung_call_times_out_without_blocking_the_loop(driver: StandInDriver) -> None:
    nvml = NvmlBackend(timeout=0.05)
    await nvml.start()
    driver.block = threading.Event()
    with pytest.raises(GpuError, match=r"did not answer within 0\.05s"):
        await nvml.sample()
    driver.block.set()
    driver.block = None
    a, _ = await nvml.sample()
    assert a.power_w == 21.5
    await nvml.close()


async def test_close_shuts_nvml_down(
    driver: StandInDriver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nvml = NvmlBackend()
    await nvml.start()
    await nvml.close()
    assert driver.calls["nvmlShutdown"] == 1


def test_the_probe_script_reports_every_field(
    driver: StandInDriver, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.machinery
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "nvml-probe"
    loader = importlib.machinery.SourceFileLoader("nvml_probe", str(path))
    spec = importlib.util.spec_from_loader("nvml_probe", loader)
    assert spec is not None
    probe = importlib.util.module_from_spec(spec)
    loader.exec_module(probe)
    driver.fail[("nvmlDeviceGetTotalEnergyConsumption", 1)] = pynvml.NVML_ERROR_NOT_SUPPORTED
    assert probe.main(["--seconds", "0.05", "--repeat", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["driver_version"] == "560.35.03"
    first, second = report["gpus"]
    assert first["fields"]["power_w"] == 21.5 and first["fields"]["memory_v2_used_mb"] == 300
    assert second["fields"]["energy_mj"]["error"] == "NVMLError_NotSupported"
    assert second["energy_check"]["counter_j"] == {"error": "NVMLError_NotSupported"}
    assert first["energy_check"]["counter_j"] == 0  # the stand-in counter does not move
    assert set(first["call_times"]["power_w"]) == {"median_ms", "p99_ms"}
    driver.init_result = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    assert probe.main([]) == 1
    assert "no NVIDIA driver answered" in capsys.readouterr().err


async def test_eco_fields_are_read(driver: StandInDriver, backend: NvmlBackend) -> None:
    driver.gpus[1].persistence = 0
    driver.gpus[1].default_mw = 370_000
    first, second = await backend.start()
    assert (first.power_default_w, first.power_min_w, first.persistence_mode) == (350, 100, True)
    assert (second.power_default_w, second.persistence_mode) == (370, False)


async def test_eco_fields_unsupported_stay_unknown(
    driver: StandInDriver, backend: NvmlBackend
) -> None:
    driver.fail[("nvmlDeviceGetPersistenceMode", 0)] = pynvml.NVML_ERROR_NOT_SUPPORTED
    first, second = await backend.start()
    assert first.persistence_mode is None and second.persistence_mode is True
