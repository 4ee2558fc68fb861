"""GPU telemetry on fake GPUs: timelines, faults, energy against ground truth, idle, ledger.

Everything runs on a FakeClock; a scripted day of sampling takes well under a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.config import FakeGpu, GpusSection, parse_config
from broker.errors import ConfigError, GpuError, LedgerError
from broker.gpu import FakeBackend, create_backend
from broker.gpu.base import GPU_LOST, NO_PERMISSION, NOT_SUPPORTED, GpuDevice, Snapshot
from broker.gpu.energy import EnergyAccountant
from broker.gpu.idle import IdleDetector
from broker.gpu.sampler import GpuSampler
from broker.ledger.sqlite import SqliteLedger

H = 3600.0


def gpu(**kw: Any) -> FakeGpu:
    return FakeGpu.model_validate(kw)


# A day with bursts that start and stop between ticks (odd seconds), so trapezoids are
# tested against steps they cannot land on.
DAY = [
    {"at": "0s", "utilization_pct": 0, "memory_used_mb": 250},
    {"at": "1h17s", "utilization_pct": 95, "memory_used_mb": 18000,
     "processes": [{"pid": 4242, "name": "/usr/bin/ollama", "memory_mb": 17500}]},
    {"at": "2h3m11s", "utilization_pct": 40},
    {"at": "2h40m7s", "utilization_pct": 0, "memory_used_mb": 250, "processes": []},
    {"at": "7h13s", "utilization_pct": 100, "power_w": 390},
    {"at": "9h29s", "utilization_pct": 0},
    {"at": "13h1s", "utilization_pct": 70, "memory_used_mb": 9000},
    {"at": "16h59s", "utilization_pct": 0, "memory_used_mb": 250},
    {"at": "20h5m3s", "utilization_pct": 100},
    {"at": "21h", "utilization_pct": 0},
]  # fmt: skip


async def run_sampler(
    clock: FakeClock, sampler: GpuSampler, seconds: float, step: float = 3600.0
) -> None:
    task = asyncio.create_task(sampler.run(), name="gpu-sampler")
    try:
        done = 0.0
        while done < seconds:
            chunk = min(step, seconds - done)
            await clock.advance(chunk, settle=3)
            done += chunk
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- the fake backend -------------------------------------------------------------------------


async def test_fake_follows_its_timeline(clock: FakeClock) -> None:
    fake = FakeBackend([gpu(timeline=DAY, idle_watts=20, load_watts=320, max_watts=400)], clock)
    [dev] = await fake.start()
    assert (dev.memory_total_mb, dev.power_max_w) == (24576, 400)
    [first] = await fake.sample()
    assert (first.utilization_pct, first.memory_used_mb, first.power_w, first.pstate) == (
        0, 250, 20, 8,
    )  # fmt: skip
    assert (await fake.processes())[0] == ()
    await clock.advance(H + 17)
    [busy] = await fake.sample()
    assert busy.utilization_pct == 95 and busy.memory_used_mb == 18000
    assert busy.power_w == pytest.approx(20 + 300 * 0.95) and busy.pstate == 0
    [proc] = (await fake.processes())[0] or ()
    assert (proc.pid, proc.name, proc.used_memory_mb) == (4242, "/usr/bin/ollama", 17500)
    await clock.advance(6 * H)  # 7h00m17s: explicit power
    assert (await fake.sample())[0].power_w == 390
    await clock.advance(2 * H + 12)  # 9h00m29s: power follows utilisation again
    assert (await fake.sample())[0].power_w == 20


async def test_fake_energy_counter_is_the_exact_integral(clock: FakeClock) -> None:
    fake = FakeBackend([gpu(idle_watts=20, load_watts=320, max_watts=400, timeline=DAY)], clock)
    await clock.advance(H + 17 + 10)
    [s] = await fake.sample()
    truth = 20 * (H + 17) + (20 + 300 * 0.95) * 10
    assert fake.true_energy_j(0) == pytest.approx(truth)
    assert s.energy_mj == int(truth * 1000)


async def test_fake_faults(clock: FakeClock) -> None:
    fake = FakeBackend(
        [
            gpu(unsupported=["energy_mj", "temperature_c"], no_permission=["power_w"]),
            gpu(lost_at="1h", energy_resets_at=["30m"]),
            gpu(unsupported=["processes"]),
        ],
        clock,
    )
    a, _, _ = await fake.sample()
    assert a.energy_mj is None and a.errors["energy_mj"] == NOT_SUPPORTED
    assert a.temperature_c is None and a.power_w is None
    assert a.errors["power_w"] == NO_PERMISSION
    assert a.utilization_pct == 0  # other fields go on
    assert (await fake.processes())[2] is None
    await clock.advance(1800)
    before = (await fake.sample())[1].energy_mj
    assert before == 0  # reset exactly now: counts from zero again
    await clock.advance(1800)
    _, lost, _ = await fake.sample()
    assert lost.lost and lost.power_w is None and lost.errors["power_w"] == GPU_LOST
    assert (await fake.processes())[1] is None


def test_fake_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"gpus\.fake\[0\]: timeline: the steps' `at`"):
        parse_config({"gpus": {"fake": [{"timeline": [{"at": "1h"}, {"at": "5m"}]}]}})
    with pytest.raises(ConfigError, match=r"gpus\.fake\[0\]\.unsupported\[0\]"):
        parse_config({"gpus": {"fake": [{"unsupported": ["energy"]}]}})
    with pytest.raises(ConfigError, match=r"gpus\.fake\[0\]\.timeline\[0\]\.att"):
        parse_config({"gpus": {"fake": [{"timeline": [{"att": "1h"}]}]}})


async def test_auto_without_a_driver_falls_back_loudly(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from broker.gpu import nvml

    async def no_driver(self: nvml.NvmlBackend) -> list[GpuDevice]:
        raise GpuError("NVML cannot start (NVMLError_LibraryNotFound)")

    monkeypatch.setattr(nvml.NvmlBackend, "start", no_driver)
    backend = await create_backend(GpusSection(backend="auto"), clock)
    assert backend.kind == "fake" and len(await backend.devices()) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "SIMULATED" in warnings[0].getMessage()
    with pytest.raises(GpuError):
        await create_backend(GpusSection(backend="nvml"), clock)
    fake = await create_backend(GpusSection(backend="fake"), clock)
    assert fake.kind == "fake"


# -- energy over a scripted day ---------------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [{}, {"unsupported": ["energy_mj"]}, {"energy_resets_at": ["13h5s"]}],
    ids=["counter", "no-counter", "counter-reset"],
)
async def test_a_day_of_energy_matches_ground_truth(
    clock: FakeClock, tmp_path: Path, faults: dict[str, Any]
) -> None:
    # 10 s ticks: 8640 per day, enough to show the method; at 1 s the test would take ~10x.
    fake = FakeBackend(
        [gpu(timeline=DAY, load_watts=350, max_watts=400, **faults), gpu(idle_watts=9)], clock
    )
    devices = await fake.start()
    async with await SqliteLedger.open(tmp_path / "ledger.sqlite3", host="box") as ledger:
        energy = EnergyAccountant(devices, clock, ledger=ledger, overhead_watts=60)
        sampler = GpuSampler(fake, clock, interval=10, process_interval=30, energy=energy)
        await sampler.start()
        start_wall = clock.now()
        await run_sampler(clock, sampler, 24 * H + 1)
        await sampler.close()
        records = await ledger.energy(start_wall, clock.now() + timedelta(seconds=1))
    truth = fake.true_energy_j(0, 0, 24 * H)
    measured = energy.total_joules(devices[0].uuid)
    assert measured == pytest.approx(truth, rel=0.005)
    assert sum(r.joules for r in records if r.gpu_index == 0) == pytest.approx(measured)
    assert energy.total_joules(devices[1].uuid) == pytest.approx(9 * 24 * H, rel=1e-6)
    # The pool stayed local: no overhead is counted outside listed/rented.
    assert sum(r.overhead_joules for r in records) == 0
    methods = {r.method for r in records if r.gpu_index == 0}
    expected = {
        "counter": {"counter"},
        "no-counter": {"integrated"},
        "counter-reset": {"counter", "mixed"},
    }
    kind = "no-counter" if faults.get("unsupported") else ("counter-reset" if faults else "counter")
    assert methods == expected[kind]


async def test_energy_is_attributed_to_the_pool_state_with_overhead(clock: FakeClock) -> None:
    fake = FakeBackend([gpu(timeline=DAY, max_watts=400), gpu(idle_watts=10)], clock)
    devices = await fake.start()
    energy = EnergyAccountant(devices, clock, overhead_watts=60)
    sampler = GpuSampler(fake, clock, interval=10, energy=energy)
    await sampler.start()
    task = asyncio.create_task(sampler.run(), name="gpu-sampler")
    await clock.advance(3 * H + 5)  # state changes fall between ticks
    energy.set_pool_state("listed")
    await clock.advance(2 * H)
    energy.set_pool_state("rented")
    await clock.advance(3 * H)
    energy.set_pool_state("local")
    await clock.advance(H)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    totals = energy.totals()
    second = devices[1].uuid
    assert totals[(second, "listed")] == pytest.approx((10 * 2 * H, 30 * 2 * H))
    assert totals[(second, "rented")] == pytest.approx((10 * 3 * H, 30 * 3 * H))
    assert totals[(second, "local")][1] == 0
    first = devices[0].uuid
    rented_truth = fake.true_energy_j(0, 5 * H + 5, 8 * H + 5)
    assert totals[(first, "rented")][0] == pytest.approx(rented_truth, rel=0.005)


def _snap(at: float, *samples: Any, read_s: float = 0.0) -> Snapshot:
    wall = datetime(2026, 11, 25, tzinfo=UTC) + timedelta(seconds=at)
    return Snapshot(
        at=at, wall=wall, gpus=tuple(samples), processes={}, processes_at=None, read_s=read_s
    )


async def test_a_counter_jump_beyond_max_power_is_clamped(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    from broker.gpu.base import GpuSample

    dev = GpuDevice(0, "GPU-x", "x", 24576, 350, 400)
    energy = EnergyAccountant([dev], clock)
    energy.observe(_snap(0, GpuSample(0, "GPU-x", power_w=100, energy_mj=1_000_000)))
    # 10 s later the counter claims 50 kJ: 5 kW from a 400 W card.
    energy.observe(_snap(10, GpuSample(0, "GPU-x", power_w=100, energy_mj=51_000_000)))
    assert energy.total_joules("GPU-x") == pytest.approx(400 * 10)
    assert "more than the card can draw" in caplog.text
    # A plausible delta is taken as is, even above the power readings (they lag).
    energy.observe(_snap(20, GpuSample(0, "GPU-x", power_w=100, energy_mj=55_000_000)))
    assert energy.total_joules("GPU-x") == pytest.approx(4000 + 4000)


async def test_the_clamp_allows_for_a_slow_read(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A counter read late in its tick (a slow batch: 80 ms seen on one H100) covers more
    than the ticks' interval; that is not a glitch."""
    from broker.gpu.base import GpuSample

    dev = GpuDevice(0, "GPU-x", "x", 81559, 700, 700)
    energy = EnergyAccountant([dev], clock)
    energy.observe(_snap(0, GpuSample(0, "GPU-x", power_w=700, energy_mj=0)))
    # 490 J between ticks 0.5 s apart is 980 W, but this read ended 0.2 s into its tick.
    energy.observe(_snap(0.5, GpuSample(0, "GPU-x", power_w=700, energy_mj=490_000), read_s=0.2))
    assert energy.total_joules("GPU-x") == pytest.approx(490)
    assert "more than the card can draw" not in caplog.text
    # The same rise with a prompt read is more than the card can draw: clamped.
    energy.observe(_snap(1.0, GpuSample(0, "GPU-x", power_w=700, energy_mj=980_000)))
    assert energy.total_joules("GPU-x") == pytest.approx(490 + 350)
    assert "more than the card can draw" in caplog.text


async def test_the_sampler_records_how_long_a_read_took() -> None:
    from broker.clock import SystemClock

    class Slow(FakeBackend):
        async def sample(self) -> Any:
            await asyncio.sleep(0.05)
            return await super().sample()

    clock = SystemClock()
    sampler = GpuSampler(Slow([gpu()], clock), clock)
    await sampler.start()
    snap = await sampler.tick()
    await sampler.close()
    assert snap is not None and snap.read_s >= 0.05


async def test_gaps_without_readings_are_bridged_by_the_counter(clock: FakeClock) -> None:
    from broker.gpu.base import GpuSample

    dev = GpuDevice(0, "GPU-x", "x", 24576, 350, 350)
    energy = EnergyAccountant([dev], clock)
    energy.observe(_snap(0, GpuSample(0, "GPU-x", power_w=50, energy_mj=0)))
    energy.observe(_snap(10, GpuSample(0, "GPU-x", errors={"power_w": "x"})))  # nothing
    energy.observe(_snap(20, GpuSample(0, "GPU-x", power_w=None, energy_mj=3_000_000)))
    assert energy.total_joules("GPU-x") == pytest.approx(3000)
    energy.observe(_snap(30, GpuSample(0, "GPU-x", lost=True)))
    energy.observe(_snap(40, GpuSample(0, "GPU-x", power_w=50, energy_mj=9_000_000)))
    assert energy.total_joules("GPU-x") == pytest.approx(3000)  # never bridged over a loss


# -- the ledger --------------------------------------------------------------------------------


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    async with await SqliteLedger.open(tmp_path / "ledger.sqlite3", host="box") as opened:
        yield opened


async def test_energy_reaches_the_ledger_every_minute(
    clock: FakeClock, ledger: SqliteLedger
) -> None:
    fake = FakeBackend([gpu(idle_watts=20)], clock)
    devices = await fake.start()
    energy = EnergyAccountant(devices, clock, ledger=ledger)
    sampler = GpuSampler(fake, clock, interval=1, energy=energy)
    await sampler.start()
    t0 = clock.now()
    task = asyncio.create_task(sampler.run(), name="gpu-sampler")
    far = t0 + timedelta(days=1)
    await clock.advance(59)
    await sampler.flushed()
    assert await ledger.energy(t0, far) == []
    await clock.advance(1)
    await sampler.flushed()
    first = await ledger.energy(t0, far)
    assert sum(r.joules for r in first) == pytest.approx(20 * 60)
    for _ in range(10):  # minute by minute, so each flush is on disk before the next
        await clock.advance(60)
        await sampler.flushed()
    await clock.advance(30)
    # Killed here without close(): at most a minute of energy is missing from the ledger.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = sum(r.joules for r in await ledger.energy(t0, far))
    assert stored >= 20 * (10 * 60 + 30) - 20 * 60
    assert stored == pytest.approx(20 * 11 * 60)


class BrokenLedger:
    host = "box"

    def __init__(self) -> None:
        self.fail = True
        self.written: list[Any] = []

    async def add_energy(self, records: Any) -> None:
        if self.fail:
            raise LedgerError("disk full")
        self.written.extend(records)


async def test_a_failed_flush_keeps_the_energy_for_the_next(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.gpu.energy")
    fake = FakeBackend([gpu(idle_watts=20)], clock)
    broken = BrokenLedger()
    energy = EnergyAccountant(await fake.start(), clock, ledger=broken)  # type: ignore[arg-type]
    sampler = GpuSampler(fake, clock, interval=1, energy=energy)
    task = asyncio.create_task(sampler.run(), name="gpu-sampler")
    await clock.advance(180)
    assert broken.written == []
    broken.fail = False
    await clock.advance(60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sum(r.joules for r in broken.written) == pytest.approx(20 * 240)
    assert caplog.text.count("cannot write energy") == 1
    assert "written to the ledger again" in caplog.text


# -- idle -------------------------------------------------------------------------------------


def detector(debounce: float = 30, **kw: Any) -> IdleDetector:
    return IdleDetector(utilization_pct=5, memory_mb=600, debounce=debounce, **kw)


async def test_idle_needs_the_debounce_without_a_break(clock: FakeClock) -> None:
    timeline = [
        {"at": "0s", "utilization_pct": 0, "memory_used_mb": 200},
        {"at": "20s", "utilization_pct": 30},  # one blip resets the debounce
        {"at": "22s", "utilization_pct": 1},
    ]
    fake = FakeBackend([gpu(timeline=timeline)], clock)
    idle = detector()
    sampler = GpuSampler(fake, clock, interval=1, process_interval=5, idle=idle)
    task = asyncio.create_task(sampler.run(), name="gpu-sampler")
    await clock.advance(19)
    assert not idle.is_idle(0) and idle.status(0).reason == "settling"
    await clock.advance(2)
    assert "utilisation 30%" in idle.status(0).reason
    await clock.advance(29)  # 50 s: 28 s idle since the blip ended
    assert not idle.is_idle(0)
    await clock.advance(2)
    assert idle.is_idle(0) and idle.status(0).since == pytest.approx(clock.monotonic() - 30)
    assert idle.all_idle([0])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_unknown_readings_and_lost_gpus_are_not_idle(clock: FakeClock) -> None:
    fake = FakeBackend(
        [
            gpu(unsupported=["utilization_pct"]),
            gpu(no_permission=["memory_used_mb"]),
            gpu(unsupported=["processes"]),
            gpu(lost_at="10s"),
            gpu(),
        ],
        clock,
    )
    idle = detector(debounce=0)
    sampler = GpuSampler(fake, clock, interval=1, process_interval=5, idle=idle)
    await sampler.tick()
    assert [idle.is_idle(i) for i in range(5)] == [False, False, False, True, True]
    assert idle.status(0).reason == "utilisation unknown (not supported)"
    assert idle.status(1).reason == "memory use unknown (no permission)"
    assert idle.status(2).reason == "process list unknown"
    await clock.advance(10)
    await sampler.tick()
    assert (idle.is_idle(3), idle.status(3).reason) == (False, "lost")
    assert idle.is_idle(4)


async def test_processes_outside_the_allowed_set_keep_a_gpu_busy(clock: FakeClock) -> None:
    procs = [
        {"pid": 10, "name": "/usr/local/bin/ollama", "memory_mb": 300},
        {"pid": 11, "name": "python3", "memory_mb": 100},
    ]
    fake = FakeBackend([gpu(timeline=[{"at": "0s", "memory_used_mb": 400, "processes": procs}])],
                       clock)  # fmt: skip
    idle = detector(debounce=0, allowed_names=["ollama"])
    sampler = GpuSampler(fake, clock, interval=1, process_interval=5, idle=idle)
    await sampler.tick()
    assert idle.status(0).reason == "process 11 (python3) is not a local service"
    idle.set_allowed_pids([11])
    await sampler.tick()
    assert idle.is_idle(0)


async def test_memory_over_the_threshold_is_busy(clock: FakeClock) -> None:
    fake = FakeBackend([gpu(timeline=[{"at": "0s", "memory_used_mb": 700}])], clock)
    idle = IdleDetector.from_config(GpusSection(idle_debounce="0s"))  # type: ignore[arg-type]
    sampler = GpuSampler(fake, clock, idle=idle)
    await sampler.tick()
    assert idle.status(0).reason == "700 MB in use (idle under 600 MB)"


# -- the sampler --------------------------------------------------------------------------------


class FlakyBackend(FakeBackend):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.broken = False
        self.sampled = 0
        self.listed = 0

    async def sample(self) -> Any:
        if self.broken:
            raise GpuError("NVML did not answer within 5s")
        self.sampled += 1
        return await super().sample()

    async def processes(self) -> Any:
        self.listed += 1
        return await super().processes()


async def test_sampler_logs_the_first_failure_and_the_recovery(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="broker.gpu.sampler")
    fake = FlakyBackend([gpu(timeline=[{"at": "0s", "memory_used_mb": 10}])], clock)
    idle = detector(debounce=0)
    sampler = GpuSampler(fake, clock, interval=1, process_interval=5, idle=idle)
    task = asyncio.create_task(sampler.run(), name="gpu-sampler")
    await clock.advance(3)
    assert fake.sampled == 4 and fake.listed == 1  # processes on their slower tick
    assert idle.is_idle(0) and sampler.latest is not None
    fake.broken = True
    await clock.advance(10)
    assert sampler.failures == 10 and not idle.is_idle(0)
    fake.broken = False
    await clock.advance(1)
    assert sampler.failures == 0 and sampler.latest.at == clock.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "GPU sampling failed" in warnings[0].getMessage()
    assert "works again after 10 failed ticks" in caplog.text


async def test_a_lost_gpu_is_logged_once_and_the_others_go_on(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeBackend([gpu(), gpu(lost_at="5s")], clock)
    sampler = GpuSampler(fake, clock, interval=1)
    task = asyncio.create_task(sampler.run(), name="gpu-sampler")
    await clock.advance(20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert caplog.text.count("is lost") == 1
    snap = sampler.latest
    assert snap is not None
    assert snap.gpu(1) is not None and snap.gpu(1).lost  # type: ignore[union-attr]
    assert snap.gpu(0) is not None and snap.gpu(0).power_w == 22  # type: ignore[union-attr]
