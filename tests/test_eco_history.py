"""Eco over days: the sampler's idle samples go to the ledger, `gpu-broker eco` judges them."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.cli import main
from broker.clock import FakeClock
from broker.config import load_config
from broker.eco.history import IdleHistory, summarize
from broker.gpu import FakeBackend
from broker.gpu.sampler import GpuSampler
from broker.ledger import IdleRecord, open_ledger

T0 = datetime(2026, 11, 30, 0, 0, tzinfo=UTC)

FAKES = (
    "fake = [\n"
    "  { uuid = 'GPU-bad', idle_watts = 35, idle_pstate = 2, persistence_mode = false },\n"
    "  { uuid = 'GPU-good', idle_watts = 12 },\n"
    "  { uuid = 'GPU-held', idle_watts = 14, timeline = [\n"
    "      { at = '0s', processes = [{ pid = 4242, name = '/usr/bin/ollama', memory_mb = 900 }],"
    " memory_used_mb = 1200, power_w = 60 },\n"
    "      { at = '2h', processes = [], memory_used_mb = 0 } ] },\n"
    "]\n"
)


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\ntimezone = "UTC"\n'
        f'[gpus]\nbackend = "fake"\n{FAKES}'
        "[energy]\nprice_per_kwh = 0.30\ncarbon_g_per_kwh = 400\n"
    )
    return cfg


async def record_idle(cfg: Path, clock: FakeClock, hours: float, every: float = 10.0) -> None:
    """What `gpu-broker run` does with its samples, on a fake clock: sample every `every`
    seconds for `hours`, the idle history writing finished slots to the ledger."""
    config = load_config(cfg)
    backend = FakeBackend(config.gpus.fake, clock)
    sampler = GpuSampler(backend, clock, interval=every, process_interval=every)
    devices = await sampler.start()
    ledger = await open_ledger(config.broker)
    history = IdleHistory(devices, ledger, utilization_pct=5)
    sampler.listeners.append(history.observe)
    try:
        for _ in range(int(hours * 3600 / every)):
            await sampler.tick()
            await clock.advance(every)
        await history.close()
    finally:
        await ledger.close()


async def test_idle_samples_are_kept_per_card_and_quarter_hour(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    await record_idle(cfg, FakeClock(T0), hours=1)
    ledger = await open_ledger(load_config(cfg).broker)
    try:
        records = await ledger.idle(T0, T0 + timedelta(hours=1))
    finally:
        await ledger.close()
    bad = [r for r in records if r.gpu_uuid == "GPU-bad"]
    # Four quarters of 90 samples each (one every 10 s), every one at 35 W in P2.
    assert [(r.start - T0, r.samples) for r in bad] == [
        (timedelta(minutes=m), 90) for m in (0, 15, 30, 45)
    ]
    assert (bad[0].watts, bad[0].pstates, bad[0].processes) == ({35: 90}, {2: 90}, {})
    held = [r for r in records if r.gpu_uuid == "GPU-held"]
    # Ollama holds it without computing: idle samples, at 60 W in P2, with the process.
    assert held[0].processes == {"ollama": 90} and held[0].pstates == {2: 90}
    assert held[0].memory_mb == {1200: 90}


def test_a_misconfigured_card_is_flagged_over_days_and_a_healthy_one_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    clock = FakeClock(T0)
    asyncio.run(record_idle(cfg, clock, hours=6))
    assert main(["eco", "-c", str(cfg), "--json", "--days", "1"], clock=clock) == 0
    got = json.loads(capsys.readouterr().out)
    bad, good, held = got["gpus"]

    assert bad["judged_on"] == "history"
    assert (bad["idle_watts"], bad["pstate"], bad["persistence_mode"]) == (35, 2, False)
    assert bad["history"]["idle_samples"] == 6 * 360
    assert [f["kind"] for f in bad["flags"]] == ["idle_draw", "pstate", "persistence"]
    # 20 W above the 15 W target for a year: 175.2 kWh, 52.56 EUR at 0.30, 70.08 kg at 400 g.
    assert {(f["yearly_cost"], f["yearly_co2_kg"]) for f in bad["flags"]} == {(52.56, 70.08)}
    assert "P2 while idle instead of P8" in bad["flags"][1]["cause"]
    assert "nvidia-smi -pm 1" in bad["flags"][2]["cause"]

    assert good["judged_on"] == "history" and good["flags"] == []
    assert (good["history"]["idle_watts"], good["history"]["idle_pstate"]) == (12, 8)

    # Held by Ollama for 2 of 6 hours: its median draw is the 14 W of the other 4 hours, but
    # the process is flagged with its share, and so is nothing else.
    assert held["history"]["processes"] == [{"name": "ollama", "share": 0.333}]
    assert [f["kind"] for f in held["flags"]] == ["process"]
    assert "ollama held the idle card 33% of its idle time" in held["flags"][0]["cause"]
    assert held["history"]["idle_watts"] == 14
    # The median hides the held hours; the process's flag is charged the mean idle draw:
    # (2 h x 60 W + 4 h x 14 W) / 6 h = 29.33 W, 14.33 W above target: 125.56 kWh a year.
    assert held["history"]["mean_idle_watts"] == 29.3
    assert (held["flags"][0]["yearly_cost"], held["flags"][0]["yearly_co2_kg"]) == (37.67, 50.22)

    assert main(["eco", "-c", str(cfg)], clock=clock) == 0
    text = capsys.readouterr().out
    assert "idle draw 35 W (median of 2160 idle samples), mostly P2" in text
    assert "ok" in text.split("GPU 1")[1].split("GPU 2")[0]


def test_without_a_ledger_the_live_reading_is_judged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    assert main(["eco", "-c", str(cfg), "--json"], clock=FakeClock(T0)) == 0
    bad, good, held = json.loads(capsys.readouterr().out)["gpus"]
    assert (bad["judged_on"], bad["history"]) == ("live", None)
    assert (good["judged_on"], good["flags"]) == ("live", [])
    assert [f["kind"] for f in bad["flags"]] == ["idle_draw", "pstate", "persistence"]
    assert [f["kind"] for f in held["flags"]] == ["idle_draw", "pstate", "process"]


@pytest.mark.parametrize("days", ["0", "-1", "soon", "400"])
def test_days_must_be_a_sensible_number(
    tmp_path: Path, days: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["eco", "-c", str(write_config(tmp_path)), "--days", days], clock=FakeClock(T0))
    assert exited.value.code == 2
    assert "--days" in capsys.readouterr().err


def record(watts: dict[int, int], pstates: dict[int, int], **kw: Any) -> IdleRecord:
    return IdleRecord("GPU-x", 0, T0, T0 + timedelta(minutes=15), sum(watts.values()), watts,
                      pstates, kw.get("memory", {}), kw.get("processes", {}))  # fmt: skip


def test_the_median_is_over_samples_not_slots() -> None:
    # A day at 12 W and an hour at 90 W: the median is 12 W (a mean would say 15 W).
    day = record({12: 8640}, {8: 8640})
    hour = record({90: 360}, {2: 360}, processes={"python": 360})
    got = summarize([day, hour])
    assert (got.samples, got.median_watts, got.pstate) == (9000, 12.0, 8)
    assert got.lowest_pstate_share == pytest.approx(8640 / 9000)  # the samples in P8
    assert summarize([record({35: 10}, {2: 10})]).lowest_pstate_share == 0
    assert got.processes == (("python", 0.04),)
    # An even count takes the mean of the two middle values.
    assert summarize([record({10: 1, 20: 1}, {})]).median_watts == 15.0
    assert summarize([]).median_watts is None

