"""`gpu-broker report` against ledgers written through the real SqliteLedger API, with every
expected figure worked out by hand in the comments beside it.

The machine in most tests: two GPUs in Europe/Berlin (CET = UTC+1 in late November), a day
rate of 0.30 EUR/kWh at 400 g CO2/kWh and a night rate (23:00-06:00) of 0.20 EUR/kWh at
300 g/kWh, Vast at 0.50 USD per GPU-hour with 1.25 USD to the euro, so an estimated
GPU-hour is 0.40 EUR. Power is constant within each state, so energy = watts x hours
whatever the records' boundaries; records are 60 s long and start at :30, so they straddle
the day, slot and tariff boundaries the way the daemon's do, and the older ones are folded
into 15-minute sums as they would be in service.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from broker.cli import main
from broker.clock import FakeClock
from broker.config import load_config
from broker.ledger import EarningsRecord, EnergyRecord, JournalEntry, Ledger, open_ledger
from broker.report import build_report, default_since, periods

BERLIN = ZoneInfo("Europe/Berlin")

CONFIG = """
[broker]
state_dir = "{state}"
timezone = "Europe/Berlin"

[[services]]
name = "ollama"
kind = "ollama"
upstream = "http://127.0.0.1:11435"
gpus = [0]

[[services]]
name = "comfy"
kind = "comfyui"
upstream = "http://127.0.0.1:8188"
gpus = [1]

[energy]
currency = "EUR"
price_per_kwh = 0.30
overhead_watts = 60
carbon_g_per_kwh = 400
[[energy.tariff]]
cron = "0 23 * * *"
duration = "7h"
price_per_kwh = 0.20
carbon_g_per_kwh = 300

[provider]
kind = "vast"
machine_id = 42
price_gpu = 0.50
usd_per_currency = 1.25
"""


def local(month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A Berlin wall time in 2026 as a UTC instant (hour 24 = the next midnight)."""
    wall = datetime(2026, month, day, tzinfo=BERLIN) + timedelta(hours=hour, minutes=minute)
    return wall.astimezone(UTC)


@dataclass(frozen=True)
class Draw:
    """One GPU drawing `watts` (+ `overhead` W of host draw) under one pool state."""

    uuid: str
    index: int
    pool_state: str
    start: datetime
    end: datetime
    watts: float
    overhead: float = 0.0


def records(draws: list[Draw]) -> list[EnergyRecord]:
    """Minute records as the daemon writes them, starting at :30 past each minute."""
    out: list[EnergyRecord] = []
    for d in draws:
        t = d.start
        while t < d.end:
            edge = t.replace(second=30, microsecond=0)
            edge = edge + timedelta(minutes=1) if edge <= t else edge
            end = min(edge, d.end)
            seconds = (end - t).total_seconds()
            out.append(
                EnergyRecord(
                    d.uuid, d.index, d.pool_state, t, end, d.watts * seconds,
                    d.overhead * seconds,
                )
            )  # fmt: skip
            t = end
    return sorted(out, key=lambda r: (r.end, r.gpu_index))


async def write_energy(ledger: Ledger, draws: list[Draw]) -> None:
    """In time order, an hour of records per write, like the daemon's flushes."""
    pending = records(draws)
    for i in range(0, len(pending), 120):
        await ledger.add_energy(pending[i : i + 120])


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    return path


def report_json(config: Path, now: datetime, *args: str) -> dict[str, Any]:
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        code = main(["report", "-c", str(config), "--format", "json", *args], FakeClock(now))
    assert code == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def approx(expected: Any) -> Any:
    """`expected` with every number compared to within a millionth, however nested."""
    if isinstance(expected, dict):
        return {key: approx(value) for key, value in expected.items()}
    if isinstance(expected, float | int) and not isinstance(expected, bool):
        return pytest.approx(expected, abs=1e-6)
    return expected


# -- the two-night ledger ----------------------------------------------------------------------

# Now: Thursday 2026-11-26 06:00 CET.
NOW = local(11, 26, 6)


async def _two_nights(config_path: Path) -> None:
    config = load_config(config_path)
    ledger = await open_ledger(config.broker)
    try:
        pool = [
            (local(11, 24, 0), "LOCAL"),
            (local(11, 24, 21), "LISTED"),
            (local(11, 24, 22), "RENTED"),
            (local(11, 25, 1), "LOCAL"),
            (local(11, 25, 21), "LISTED"),
            (local(11, 25, 22), "RENTED"),
            (local(11, 25, 23), "LOCAL"),  # still in force at NOW
        ]
        for at, state in pool:
            await ledger.record_state("pool", "machine", state, at, "test")
        gpu_a = [
            (local(11, 24, 0), "LOCAL"),
            (local(11, 24, 21), "LISTED"),
            (local(11, 24, 22), "RENTED"),
            (local(11, 25, 1), "LOCAL"),
            (local(11, 25, 21), "LISTED"),
            (local(11, 25, 22), "RENTED"),
            (local(11, 25, 23), "LOCAL"),
        ]
        gpu_b = [
            (local(11, 24, 0), "LOCAL"),
            (local(11, 24, 21), "LISTED"),
            (local(11, 24, 23, 30), "RENTED"),  # a renter takes GPU-b at 23:30 only
            (local(11, 25, 1), "LOCAL"),
            (local(11, 25, 21), "LISTED"),  # no renter for GPU-b the second night
            (local(11, 25, 23), "LOCAL"),
            (local(11, 26, 3), "LOST"),  # fell off the bus at 03:00
        ]
        for uuid, changes in (("GPU-a", gpu_a), ("GPU-b", gpu_b)):
            for at, state in changes:
                await ledger.record_state("gpu", uuid, state, at, "test")

        # Watts: 50 at local work; 20 + 30 overhead listed or rented without a renter;
        # 300 + 30 overhead with a renter.
        a = [
            Draw("GPU-a", 0, "local", local(11, 24, 0), local(11, 24, 21), 50),
            Draw("GPU-a", 0, "listed", local(11, 24, 21), local(11, 24, 22), 20, 30),
            Draw("GPU-a", 0, "rented", local(11, 24, 22), local(11, 25, 1), 300, 30),
            Draw("GPU-a", 0, "local", local(11, 25, 1), local(11, 25, 21), 50),
            Draw("GPU-a", 0, "listed", local(11, 25, 21), local(11, 25, 22), 20, 30),
            Draw("GPU-a", 0, "rented", local(11, 25, 22), local(11, 25, 23), 300, 30),
            Draw("GPU-a", 0, "local", local(11, 25, 23), local(11, 26, 6), 50),
        ]
        b = [
            Draw("GPU-b", 1, "local", local(11, 24, 0), local(11, 24, 21), 50),
            Draw("GPU-b", 1, "listed", local(11, 24, 21), local(11, 24, 22), 20, 30),
            Draw("GPU-b", 1, "rented", local(11, 24, 22), local(11, 24, 23, 30), 20, 30),
            Draw("GPU-b", 1, "rented", local(11, 24, 23, 30), local(11, 25, 1), 300, 30),
            Draw("GPU-b", 1, "local", local(11, 25, 1), local(11, 25, 21), 50),
            Draw("GPU-b", 1, "listed", local(11, 25, 21), local(11, 25, 22), 20, 30),
            Draw("GPU-b", 1, "rented", local(11, 25, 22), local(11, 25, 23), 20, 30),
            Draw("GPU-b", 1, "local", local(11, 25, 23), local(11, 26, 3), 50),
        ]
        await write_energy(ledger, a + b)

        # Vast reported 4.50 USD for its (UTC) day 2026-11-24; nothing yet for 11-25.
        await ledger.upsert_earnings(
            [EarningsRecord("vast", "42", date(2026, 11, 24), 4.50, "USD", "provider", NOW)]
        )
        notes = [
            (local(11, 24, 21, 30), "request_held", "ollama"),
            (local(11, 24, 22, 30), "request_rejected", "ollama"),
            (local(11, 24, 23, 45), "request_held", "comfy"),
            (local(11, 23, 12), "request_held", "ollama"),  # before the report
        ]
        for at, kind, service in notes:
            await ledger.journal(JournalEntry(at, kind, "note", service))
        await ledger.journal(JournalEntry(local(11, 25, 2), "request_held", "intent", "ollama"))
    finally:
        await ledger.close()


@pytest.fixture
def two_nights(tmp_path: Path) -> Path:
    config = write_config(tmp_path)
    asyncio.run(_two_nights(config))
    return config


# Hand-worked figures, GPUs together ("all"), Berlin days:
#
# 11-24 [00:00, 24:00) CET = [11-23 23:00Z, 11-24 23:00Z)
#   pool hours: local 00-21 = 21, listed 21-22 = 1, rented 22-24 = 2
#   rented GPU-hours: GPU-a 22-24 = 2, GPU-b 23:30-24 = 0.5 -> 2.5
#   kWh local: 21 h x 50 W x 2 GPUs = 2.1; listed: 1 h x 50 W x 2 = 0.1
#   kWh rented: GPU-a 2 h x 330 W = 0.66; GPU-b 1.5 h x 50 W + 0.5 h x 330 W = 0.24 -> 0.9
#   cost: listed 0.1 x 0.30 = 0.03
#         22-23 (day rate): (0.33 + 0.05) x 0.30 = 0.114
#         23-24 (night rate): (0.33 + 0.025 + 0.165) x 0.20 = 0.52 x 0.20 = 0.104
#         -> 0.248
#   CO2: 0.1 x 0.4 + 0.38 x 0.4 + 0.52 x 0.3 = 0.04 + 0.152 + 0.156 = 0.348 kg
#   earnings: Vast's UTC day 11-24 is 4.50 USD / 1.25 = 3.60 EUR over the rented GPU-hours
#     of that UTC day: GPU-a 21:00Z-24:00Z = 3 h, GPU-b 22:30Z-24:00Z = 1.5 h -> 4.5 h.
#     Berlin's 11-24 holds 21:00Z-23:00Z of GPU-a (2 h) and 22:30Z-23:00Z of GPU-b (0.5 h):
#     3.60 x 2.5 / 4.5 = 2.00, all provider-reported.
#   net: 2.00 - 0.248 = 1.752
#   extra energy: the idle baseline is the GPUs' own draw while LISTED (no IDLE time here),
#     2 x 20 W = 40 W (overhead left out); only GPU draw above it while rented counts:
#     22-23 day: (300 + 20 - 40) W x 1 h = 0.28 kWh x 0.30 = 0.084
#     23-24 night: (300 + 0.5 x 20 + 0.5 x 300 - 40) Wh = 0.42 kWh x 0.20 = 0.084 -> 0.168
#   extra net: 2.00 - 0.168 = 1.832
#   requests: held 21:30 (ollama) and 23:45 (comfy) = 2; rejected 22:30 = 1
DAY_24 = {
    "period": "2026-11-24",
    "gpu": "all",
    "hours": {"local": 21.0, "idle": 0.0, "listed": 1.0, "rented": 2.0},
    "rented_gpu_hours": 2.5,
    "earnings": 2.0,
    "earnings_source": "provider",
    "energy_kwh": {"local": 2.1, "idle": 0.0, "listed": 0.1, "rented": 0.9},
    "energy_cost": 0.248,
    "net": 1.752,
    "extra_energy_cost": 0.168,
    "extra_net": 1.832,
    "co2_kg": 0.348,
    "held_requests": 2,
    "rejected_requests": 1,
}
# 11-25 [00:00, 24:00) CET = [11-24 23:00Z, 11-25 23:00Z)
#   pool hours: rented 00-01 + 22-23 = 2, local 01-21 + 23-24 = 21, listed 21-22 = 1
#   rented GPU-hours: GPU-a 00-01 + 22-23 = 2, GPU-b 00-01 = 1 -> 3
#   kWh local: 21 h x 100 W = 2.1; listed 0.1;
#       rented: 00-01 both rented 2 x 0.33 = 0.66, 22-23 GPU-a 0.33 + GPU-b 0.05 -> 1.04
#   cost: 00-01 night 0.66 x 0.20 = 0.132; listed 0.1 x 0.30 = 0.03; 22-23 day 0.38 x 0.30
#         = 0.114 -> 0.276
#   CO2: 0.66 x 0.3 + 0.1 x 0.4 + 0.38 x 0.4 = 0.198 + 0.04 + 0.152 = 0.39
#   earnings: 00-01 CET is 23:00Z-24:00Z of Vast's day 11-24: 2 of its 4.5 GPU-hours,
#     3.60 x 2 / 4.5 = 1.60; 22-23 CET is in UTC day 11-25, which has no figure: estimated
#     1 GPU-hour x 0.50 USD / 1.25 = 0.40 -> 2.00, "estimate" (part of it is)
#   net: 2.00 - 0.276 = 1.724
#   extra: 00-01 night (600 - 40) Wh x 0.20 = 0.112; 22-23 day (320 - 40) Wh x 0.30 = 0.084
#     -> 0.196; extra net 2.00 - 0.196 = 1.804
DAY_25 = {
    "period": "2026-11-25",
    "gpu": "all",
    "hours": {"local": 21.0, "idle": 0.0, "listed": 1.0, "rented": 2.0},
    "rented_gpu_hours": 3.0,
    "earnings": 2.0,
    "earnings_source": "estimate",
    "energy_kwh": {"local": 2.1, "idle": 0.0, "listed": 0.1, "rented": 1.04},
    "energy_cost": 0.276,
    "net": 1.724,
    "extra_energy_cost": 0.196,
    "extra_net": 1.804,
    "co2_kg": 0.39,
    "held_requests": 0,
    "rejected_requests": 0,
}
# 11-26 [00:00, 06:00 = now) CET: pool local 6 h; kWh local: GPU-a 6 h x 50 W = 0.3, GPU-b
#   (lost at 03:00) 3 h x 50 W = 0.15 -> 0.45. Nothing earned, nothing reported: "estimate".
DAY_26 = {
    "period": "2026-11-26",
    "gpu": "all",
    "hours": {"local": 6.0, "idle": 0.0, "listed": 0.0, "rented": 0.0},
    "rented_gpu_hours": 0.0,
    "earnings": 0.0,
    "earnings_source": "estimate",
    "energy_kwh": {"local": 0.45, "idle": 0.0, "listed": 0.0, "rented": 0.0},
    "energy_cost": 0.0,
    "net": 0.0,
    "extra_energy_cost": 0.0,
    "extra_net": 0.0,
    "co2_kg": 0.0,
    "held_requests": 0,
    "rejected_requests": 0,
}
# Totals: sums of the three; "estimate" since part of the earnings is.
TOTALS = {
    "period": "total",
    "gpu": "all",
    "hours": {"local": 48.0, "idle": 0.0, "listed": 2.0, "rented": 4.0},
    "rented_gpu_hours": 5.5,
    "earnings": 4.0,
    "earnings_source": "estimate",
    "energy_kwh": {"local": 4.65, "idle": 0.0, "listed": 0.2, "rented": 1.94},
    "energy_cost": 0.524,
    "net": 3.476,
    "extra_energy_cost": 0.364,
    "extra_net": 3.636,
    "co2_kg": 0.738,
    "held_requests": 2,
    "rejected_requests": 1,
}


def test_json_by_day_across_the_tariff_change_with_provider_and_estimated_days(
    two_nights: Path,
) -> None:
    report = report_json(two_nights, NOW, "--since", "2026-11-24", "--until", "2026-11-26")
    assert report["currency"] == "EUR"
    assert report["by"] == "day"
    assert report["from"] == "2026-11-24T00:00:00+01:00"
    assert report["to"] == "2026-11-26T06:00:00+01:00"  # --until 11-26 ends at now
    assert report["rows"] == [approx(DAY_24), approx(DAY_25), approx(DAY_26)]
    assert report["totals"] == approx(TOTALS)


# GPU 1 (GPU-b) alone: its own intervals, its share of the earnings, its service's requests.
#
# 11-24: hours local 21, listed 21:00-23:30 = 2.5 (pool rented from 22:00, no renter on it
#   yet), rented 0.5; rented GPU-hours 0.5
#   kWh (by the pool's state): local 21 x 50 W = 1.05, listed 0.05,
#       rented 1.5 h x 50 W + 0.5 h x 330 W = 0.075 + 0.165 = 0.24
#   cost: listed 0.05 x 0.30 = 0.015; 22-23 0.05 x 0.30 = 0.015; 23-24 0.19 x 0.20 = 0.038
#       -> 0.068; CO2: 0.05 x 0.4 + 0.05 x 0.4 + 0.19 x 0.3 = 0.097
#   earnings: its 0.5 of Vast's 4.5 GPU-hours that day: 3.60 x 0.5 / 4.5 = 0.40, provider
#   requests: comfy (GPU 1) held 1; ollama's (GPU 0) are not GPU 1's
# 11-25: hours rented 00-01 = 1, local 01-21 + 23-24 = 21, listed 21-23 = 2
#   kWh local 1.05, listed 0.05, rented 0.33 (00-01) + 0.05 (22-23) = 0.38
#   cost: 0.33 x 0.20 + 0.05 x 0.30 + 0.05 x 0.30 = 0.096; CO2 0.099 + 0.02 + 0.02 = 0.139
#   earnings: 1 of the 4.5 GPU-hours of UTC 11-24: 0.80; it was not rented in UTC 11-25, so
#   nothing is estimated: "provider"
# 11-26: local 00-03, then LOST (no bucket): 3 h; kWh 3 x 50 W = 0.15
# extra: its baseline is 20 W (its draw while the pool was LISTED); while the pool is rented
#   11-24 22-23 it draws 20 W: 0; 23-24 (0.5 x 20 + 0.5 x 300 - 20) Wh = 0.14 kWh x 0.20
#   = 0.028; 11-25 00-01 (300 - 20) Wh x 0.20 = 0.056, 22-23 20 W: 0
def test_one_gpu_that_was_lost_mid_day(two_nights: Path) -> None:
    report = report_json(
        two_nights, NOW, "--since", "2026-11-24", "--until", "2026-11-26", "--gpu", "1"
    )
    zero = {"local": 0.0, "idle": 0.0, "listed": 0.0, "rented": 0.0}
    assert report["rows"] == [
        approx({
            "period": "2026-11-24", "gpu": 1,
            "hours": {"local": 21.0, "idle": 0.0, "listed": 2.5, "rented": 0.5},
            "rented_gpu_hours": 0.5, "earnings": 0.4, "earnings_source": "provider",
            "energy_kwh": {"local": 1.05, "idle": 0.0, "listed": 0.05, "rented": 0.24},
            "energy_cost": 0.068, "net": 0.332, "co2_kg": 0.097,
            "extra_energy_cost": 0.028, "extra_net": 0.372,
            "held_requests": 1, "rejected_requests": 0,
        }),
        approx({
            "period": "2026-11-25", "gpu": 1,
            "hours": {"local": 21.0, "idle": 0.0, "listed": 2.0, "rented": 1.0},
            "rented_gpu_hours": 1.0, "earnings": 0.8, "earnings_source": "provider",
            "energy_kwh": {"local": 1.05, "idle": 0.0, "listed": 0.05, "rented": 0.38},
            "energy_cost": 0.096, "net": 0.704, "co2_kg": 0.139,
            "extra_energy_cost": 0.056, "extra_net": 0.744,
            "held_requests": 0, "rejected_requests": 0,
        }),
        approx({
            "period": "2026-11-26", "gpu": 1,
            "hours": {"local": 3.0, "idle": 0.0, "listed": 0.0, "rented": 0.0},
            "rented_gpu_hours": 0.0, "earnings": 0.0, "earnings_source": "estimate",
            "energy_kwh": {**zero, "local": 0.15},
            "energy_cost": 0.0, "net": 0.0, "co2_kg": 0.0,
            "extra_energy_cost": 0.0, "extra_net": 0.0,
            "held_requests": 0, "rejected_requests": 0,
        }),
    ]  # fmt: skip
    totals = report["totals"]
    assert totals["hours"] == approx({"local": 45.0, "idle": 0.0, "listed": 4.5, "rented": 1.5})
    assert (totals["earnings"], totals["earnings_source"]) == (pytest.approx(1.2), "provider")
    assert totals["energy_cost"] == pytest.approx(0.164)


def test_gpu_rows_add_up_to_the_machine(two_nights: Path) -> None:
    machine = report_json(two_nights, NOW, "--since", "2026-11-24")
    gpus = [report_json(two_nights, NOW, "--since", "2026-11-24", "--gpu", g) for g in "01"]
    for key in ("rented_gpu_hours", "earnings", "energy_cost", "extra_energy_cost", "co2_kg"):
        assert machine["totals"][key] == pytest.approx(sum(g["totals"][key] for g in gpus))
    for bucket in ("local", "listed", "rented"):
        assert machine["totals"]["energy_kwh"][bucket] == pytest.approx(
            sum(g["totals"]["energy_kwh"][bucket] for g in gpus)
        )


def test_csv_has_one_header_row_then_the_periods_and_the_totals(
    two_nights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["report", "-c", str(two_nights), "--since", "2026-11-24", "--format", "csv"]
    assert main(args, clock=FakeClock(NOW)) == 0
    lines = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert lines[0][:4] == ["period", "gpu", "currency", "hours_local"]
    assert [line[0] for line in lines[1:]] == ["2026-11-24", "2026-11-25", "2026-11-26", "total"]
    rows = [dict(zip(lines[0], line, strict=True)) for line in lines[1:]]
    assert rows[0]["gpu"] == "all"
    assert rows[0]["currency"] == "EUR"
    assert float(rows[0]["energy_cost"]) == pytest.approx(0.248)
    assert float(rows[1]["energy_kwh_rented"]) == pytest.approx(1.04)
    assert rows[1]["earnings_source"] == "estimate"
    assert float(rows[3]["net"]) == pytest.approx(3.476)
    assert float(rows[0]["extra_energy_cost"]) == pytest.approx(0.168)
    assert float(rows[3]["extra_net"]) == pytest.approx(3.636)
    assert int(rows[3]["held_requests"]) == 2


def test_table_shows_the_same_with_a_totals_line(
    two_nights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["report", "-c", str(two_nights), "--since", "2026-11-24", "--until", "2026-11-25"]
    assert main(args, clock=FakeClock(NOW)) == 0
    out = capsys.readouterr().out
    assert "Earnings and energy by day, all GPUs" in out
    assert "2026-11-24 00:00 to 2026-11-26 00:00 Europe/Berlin (EUR)" in out
    assert "~: estimated earnings" in out
    lines = [line.split() for line in out.splitlines()]
    [day24] = [cells for cells in lines if cells[:1] == ["2026-11-24"]]
    # hours local 21, idle 0, listed 1, rented 2; 2.5 GPU-h; kWh 2.1 / 0 / 0.1 / 0.9;
    # cost 0.248, earned 2.00, net 1.752, extra cost 0.168, extra net 1.832, CO2 0.348 kg;
    # 2 held, 1 rejected (2 decimals shown)
    assert day24 == [
        "2026-11-24", "21.00", "0.00", "1.00", "2.00", "2.50",
        "2.10", "0.00", "0.10", "0.90", "0.25", "2.00", "1.75", "0.17", "1.83", "0.35", "2", "1",
    ]  # fmt: skip
    [day25] = [cells for cells in lines if cells[:1] == ["2026-11-25"]]
    assert "~2.00" in day25  # partly estimated
    [total] = [cells for cells in lines if cells[:1] == ["total"]]
    # 11-24 + 11-25: local 42, listed 2, rented 4 h; 5.5 GPU-h; kWh 4.2 / 0 / 0.2 / 1.94;
    # cost 0.248 + 0.276 = 0.524; 4.00 earned (partly estimated); net 3.476; extra cost
    # 0.168 + 0.196 = 0.364, extra net 3.636; CO2 0.738
    assert total == [
        "total", "42.00", "0.00", "2.00", "4.00", "5.50",
        "4.20", "0.00", "0.20", "1.94", "0.52", "~4.00", "3.48", "0.36", "3.64", "0.74", "2", "1",
    ]  # fmt: skip


# -- the day the clocks go back ---------------------------------------------------------------


async def _dst_night(config_path: Path) -> None:
    config = load_config(config_path)
    ledger = await open_ledger(config.broker)
    try:
        # Listed from 00:00 CEST (10-24 22:00Z) to 07:00 CET (10-25 06:00Z): 8 real hours,
        # then local work for the rest of the day.
        await ledger.record_state("pool", "machine", "LISTED", local(10, 25, 0))
        await ledger.record_state("pool", "machine", "LOCAL", local(10, 25, 7))
        await ledger.record_state("gpu", "GPU-a", "LISTED", local(10, 25, 0))
        await ledger.record_state("gpu", "GPU-a", "LOCAL", local(10, 25, 7))
        await write_energy(
            ledger,
            [
                Draw("GPU-a", 0, "listed", local(10, 25, 0), local(10, 25, 7), 40, 60),
                Draw("GPU-a", 0, "local", local(10, 25, 7), local(10, 26, 0), 40),
            ],
        )
    finally:
        await ledger.close()


def test_the_day_the_clocks_go_back_has_25_hours(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    asyncio.run(_dst_night(config))
    # 10-25 00:00 CEST = 10-24 22:00Z; 10-26 00:00 CET = 10-25 23:00Z: 25 hours.
    # The night rate runs 23:00 CEST (21:00Z) to 06:00 CET (05:00Z).
    #   hours: listed 22:00Z-06:00Z = 8, local 06:00Z-23:00Z = 17 -> 25
    #   kWh listed: 8 h x 100 W = 0.8 (0.7 at night, 0.1 at the day rate 05:00Z-06:00Z);
    #       local: 17 h x 40 W = 0.68
    #   cost: 0.7 x 0.20 + 0.1 x 0.30 = 0.14 + 0.03 = 0.17; net -0.17
    #   CO2: 0.7 x 0.3 + 0.1 x 0.4 = 0.21 + 0.04 = 0.25
    report = report_json(
        config, local(10, 27, 12), "--since", "2026-10-25", "--until", "2026-10-25"
    )
    assert report["from"] == "2026-10-25T00:00:00+02:00"
    assert report["to"] == "2026-10-26T00:00:00+01:00"
    [row] = report["rows"]
    assert row == approx({
        "period": "2026-10-25", "gpu": "all",
        "hours": {"local": 17.0, "idle": 0.0, "listed": 8.0, "rented": 0.0},
        "rented_gpu_hours": 0.0, "earnings": 0.0, "earnings_source": "estimate",
        "energy_kwh": {"local": 0.68, "idle": 0.0, "listed": 0.8, "rented": 0.0},
        "energy_cost": 0.17, "net": -0.17, "co2_kg": 0.25,
        # listed without a renter: the server drew nothing it would not have drawn idle
        "extra_energy_cost": 0.0, "extra_net": 0.0,
        "held_requests": 0, "rejected_requests": 0,
    })  # fmt: skip


# -- weeks and months ---------------------------------------------------------------------------


async def _late_november(config_path: Path) -> None:
    config = load_config(config_path)
    ledger = await open_ledger(config.broker)
    try:
        await ledger.record_state("pool", "machine", "LOCAL", local(11, 28))
        await ledger.record_state("gpu", "GPU-a", "LOCAL", local(11, 28))
        await write_energy(ledger, [Draw("GPU-a", 0, "local", local(11, 28), local(12, 2, 12), 50)])
        # A figure for UTC day 11-30 with no rented hours recorded (late storage fees, say):
        # it lands in the period holding its noon, 11-30 12:00Z = 13:00 CET, a Monday.
        await ledger.upsert_earnings(
            [EarningsRecord("vast", "42", date(2026, 11, 30), 2.50, "USD", "provider", NOW)]
        )
    finally:
        await ledger.close()


def test_weeks_start_on_monday_and_months_are_calendar_months(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    asyncio.run(_late_november(config))
    now = local(12, 2, 12)  # Wednesday 2026-12-02 12:00 CET
    # Sat 11-28 00:00 .. Mon 11-30 00:00 = 48 h in ISO week 48; Mon 11-30 .. now = 60 h in
    # week 49. 50 W -> 0.05 kWh an hour. 2.50 USD / 1.25 = 2.00 EUR on Monday 11-30.
    weeks = report_json(config, now, "--by", "week", "--since", "2026-11-28")
    assert [
        (r["period"], r["hours"]["local"], r["energy_kwh"]["local"], r["earnings"],
         r["earnings_source"])
        for r in weeks["rows"]
    ] == [
        ("2026-W48", 48.0, pytest.approx(2.4), 0.0, "estimate"),
        ("2026-W49", 60.0, pytest.approx(3.0), 2.0, "provider"),
    ]  # fmt: skip
    # November from the 28th: 72 h; December to now: 36 h.
    months = report_json(config, now, "--by", "month", "--since", "2026-11-28")
    assert [
        (r["period"], r["hours"]["local"], r["energy_kwh"]["local"], r["earnings"])
        for r in months["rows"]
    ] == [
        ("2026-11", 72.0, pytest.approx(3.6), 2.0),
        ("2026-12", 36.0, pytest.approx(1.8), 0.0),
    ]
    assert months["totals"]["energy_kwh"]["local"] == pytest.approx(5.4)  # 108 h x 50 W


def test_default_ranges_start_at_the_ledgers_first_record(tmp_path: Path) -> None:
    # The ledger begins on 11-28: the default 7 days, 8 weeks or 12 months are not padded
    # with empty periods from before it existed.
    config = write_config(tmp_path)
    asyncio.run(_late_november(config))
    now = local(12, 2, 12)
    days = report_json(config, now)
    assert [r["period"] for r in days["rows"]] == [
        f"2026-{d}" for d in ("11-28", "11-29", "11-30", "12-01", "12-02")
    ]
    assert days["from"] == "2026-11-28T00:00:00+01:00"
    weeks = report_json(config, now, "--by", "week")
    assert [r["period"] for r in weeks["rows"]] == ["2026-W48", "2026-W49"]
    months = report_json(config, now, "--by", "month")
    assert [r["period"] for r in months["rows"]] == ["2026-11", "2026-12"]
    # An explicit --since still reaches back as far as asked.
    asked = report_json(config, now, "--since", "2026-11-26")
    assert asked["rows"][0]["period"] == "2026-11-26"


def test_report_for_a_gpu_never_seen_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    asyncio.run(_late_november(config))
    code = main(["report", "-c", str(config), "--gpu", "7"], clock=FakeClock(local(12, 2, 12)))
    assert code == 2
    err = capsys.readouterr().err
    assert "never seen GPU 7" in err and "GPUs recorded: 0" in err
    assert main(["report", "-c", str(config), "--gpu", "0"], clock=FakeClock(local(12, 2, 12))) == 0


# -- the library, as the dashboard calls it ---------------------------------------------------


async def test_build_report_is_the_same_figures_without_the_cli(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    await _two_nights(config_path)
    config = load_config(config_path)
    ledger = await open_ledger(config.broker)
    try:
        report = await build_report(
            ledger, config, since=local(11, 24), until=local(11, 25), now=NOW
        )
    finally:
        await ledger.close()
    [row] = report.rows
    assert (row.earnings, row.energy_cost, row.net) == pytest.approx((2.0, 0.248, 1.752))
    assert report.to_json()["rows"] == [approx(DAY_24)]


def test_periods_follow_local_days() -> None:
    spans = periods(local(10, 24, 12), local(10, 26, 6), "day", BERLIN)
    assert [(p.label, (p.end - p.start).total_seconds() / 3600) for p in spans] == [
        ("2026-10-24", 12.0),
        ("2026-10-25", 25.0),
        ("2026-10-26", 6.0),
    ]
    assert default_since(local(3, 29, 12), "day", BERLIN) == local(3, 23)


# -- bad usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "year"], "invalid choice: 'year'"),
        (["--since", "last week"], 'expected a date like 2026-11-25'),
        (["--until", "2026-11-31"], 'expected a date like 2026-11-25'),
        (["--gpu", "-1"], "expected a GPU index of 0 or more"),
        (["--gpu", "first"], "expected a GPU index like 0"),
        (["--format", "xml"], "invalid choice: 'xml'"),
    ],
)
def test_bad_arguments_exit_2(
    args: list[str], message: str, two_nights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["report", "-c", str(two_nights), *args], clock=FakeClock(NOW))
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2026-11-25", "--until", "2026-11-24"], "must be before --until"),
        (["--since", "2026-11-27"], "must be before now"),
    ],
)
def test_an_empty_range_exits_2(
    args: list[str], message: str, two_nights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "-c", str(two_nights), *args], clock=FakeClock(NOW)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_no_ledger_yet_is_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert main(["report", "-c", str(config)], clock=FakeClock(NOW)) == 1
    assert "no ledger at" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # the report did not create one


def test_a_narrow_terminal_gets_two_tables_with_the_same_figures(two_nights: Path) -> None:
    from rich.console import Console

    from broker.report.render import to_text

    async def report() -> Any:
        config = load_config(two_nights)
        ledger = await open_ledger(config.broker)
        try:
            return await build_report(
                ledger, config, since=local(11, 24), until=local(11, 26), now=NOW
            )
        finally:
            await ledger.close()

    console = Console(width=80, record=True, file=io.StringIO())
    console.print(to_text(asyncio.run(report()), console.width))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    lines = [line.split() for line in text.splitlines()]
    totals = [cells for cells in lines if cells[:1] == ["total"]]
    # hours, GPU-hours, held, rejected; then kWh, cost, earned, net, extra cost and net, CO2
    assert totals == [
        ["total", "42.00", "0.00", "2.00", "4.00", "5.50", "2", "1"],
        ["total", "4.20", "0.00", "0.20", "1.94", "0.52", "~4.00", "3.48", "0.36", "3.64", "0.74"],
    ]


# -- extra energy: only what renting drew above the idle server ------------------------------


async def _idle_then_rented(config_path: Path) -> None:
    """One GPU on 11-10 (day rate 0.30): IDLE 10-12 and LISTED 12-13 at 20 W, RENTED 13-16
    at 300 W, each with 30 W of host overhead, then LOCAL at 50 W."""
    config = load_config(config_path)
    ledger = await open_ledger(config.broker)
    try:
        for at, state in [(local(11, 10, 10), "IDLE"), (local(11, 10, 12), "LISTED"),
                          (local(11, 10, 13), "RENTED"), (local(11, 10, 16), "LOCAL")]:  # fmt: skip
            await ledger.record_state("pool", "machine", state, at)
            await ledger.record_state("gpu", "GPU-a", state, at)
        await write_energy(
            ledger,
            [
                Draw("GPU-a", 0, "idle", local(11, 10, 10), local(11, 10, 12), 20, 30),
                Draw("GPU-a", 0, "listed", local(11, 10, 12), local(11, 10, 13), 20, 30),
                Draw("GPU-a", 0, "rented", local(11, 10, 13), local(11, 10, 16), 300, 30),
                Draw("GPU-a", 0, "local", local(11, 10, 16), local(11, 10, 18), 50),
            ],
        )
    finally:
        await ledger.close()


async def _report(config_path: Path, since: datetime, until: datetime) -> Any:
    config = load_config(config_path)
    ledger = await open_ledger(config.broker)
    try:
        return await build_report(
            ledger, config, since=since, until=until, now=local(11, 10, 18)
        )
    finally:
        await ledger.close()


def test_extra_energy_counts_only_the_gpu_draw_above_idle_while_rented(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    asyncio.run(_idle_then_rented(config))
    # Baseline: the GPU's own draw while IDLE or LISTED, 3 h x 20 W / 3 h = 20 W (the 30 W
    # of overhead is the server's anyway). Rented 3 h at 300 W: only 280 W is extra,
    #   3 h x 280 W = 0.84 kWh x 0.30 = 0.252.
    # energy_cost (listed and rented, overhead included): (1 h x 50 W + 3 h x 330 W)
    #   = 1.04 kWh x 0.30 = 0.312.
    # Earnings, estimated: 3 GPU-hours x 0.40 = 1.20; net 0.888, extra net 0.948.
    report = asyncio.run(_report(config, local(11, 10), local(11, 11)))
    row = report.totals.to_json()
    assert (row["energy_cost"], row["extra_energy_cost"]) == (
        pytest.approx(0.312), pytest.approx(0.252)
    )
    assert (row["earnings"], row["net"], row["extra_net"]) == (
        pytest.approx(1.2), pytest.approx(0.888), pytest.approx(0.948)
    )
    # A report of the rented hours alone still measures the baseline over the 30 days
    # before its end: the same 0.252.
    rented_only = asyncio.run(_report(config, local(11, 10, 13), local(11, 10, 16)))
    assert rented_only.totals.extra_energy_cost == pytest.approx(0.252)
    assert rented_only.totals.energy_cost == pytest.approx(0.297)  # 3 h x 330 W x 0.30


# -- a short run reads in units that show it -----------------------------------------------


async def _short_run(config_path: Path) -> None:
    # A quick-demo afternoon: 3 min local, 5 min listed, 12 min rented, 2 GPUs at 22 W
    # each plus 60 W of host overhead while listed or rented.
    config = load_config(config_path)
    ledger = await open_ledger(config.broker)
    t0 = local(12, 2, 14)
    states = [("LOCAL", 0), ("LISTED", 3), ("RENTED", 8)]
    try:
        for state, minute in states:
            at = t0 + timedelta(minutes=minute)
            await ledger.record_state("pool", "machine", state, at)
            for uuid in ("GPU-a", "GPU-b"):
                await ledger.record_state("gpu", uuid, state, at)
        draws = [
            Draw(uuid, i, state, t0 + timedelta(minutes=a), t0 + timedelta(minutes=b), 22,
                 0 if state == "LOCAL" else 30)
            for uuid, i in (("GPU-a", 0), ("GPU-b", 1))
            for state, a, b in (("LOCAL", 0, 3), ("LISTED", 3, 8), ("RENTED", 8, 20))
        ]  # fmt: skip
        await write_energy(ledger, draws)
    finally:
        await ledger.close()


def test_a_short_run_is_shown_in_minutes_and_wh_not_rounded_to_zeros(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    asyncio.run(_short_run(config))
    now = local(12, 2, 14, 20)
    assert main(["report", "-c", str(config)], FakeClock(now)) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    [day] = [cells for cells in lines if cells[:1] == ["2026-12-02"]]
    # One row only: the ledger began today, so no empty days before it.
    assert not [cells for cells in lines if cells[:1] and cells[0].startswith("2026-11")]
    header = next(cells for cells in lines if "GPU-min" in cells)
    assert header.count("min") == 4 and header.count("Wh") == 4, header
    # minutes local 3, idle 0, listed 5, rented 12; rented GPU-min 24
    assert day[1:6] == ["3.0", "0.0", "5.0", "12.0", "24.0"], day
    # Wh: local 2 x 22 W x 3 min = 2.2; listed (44 + 60) W x 5 min = 8.7; rented 20.8
    assert day[6:10] == ["2.2", "0.0", "8.7", "20.8"], day
    # cost (8.667 + 20.8) Wh x 0.30 EUR = 0.00884: shown, not "0.01" or "0.00"
    assert day[10] == "0.0088", day
    assert "min: time in each state; Wh: energy drawn" in out
