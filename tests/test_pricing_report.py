"""`report` shows the realised price per rented GPU-hour beside the market median the
broker read over the same period (the ledger's prices, broker/report/prices.py)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from test_report import NOW, _two_nights, local, report_json, write_config

from broker.cli import main
from broker.clock import FakeClock
from broker.config import load_config
from broker.ledger import open_ledger
from broker.ledger.base import PriceRecord


async def _prices(config_path: Path) -> None:
    await _two_nights(config_path)
    ledger = await open_ledger(load_config(config_path).broker)
    try:
        day = local(11, 24, 20)
        for k, median in enumerate([0.9, 1.1]):
            await ledger.add_price(PriceRecord(day + timedelta(hours=k), "market", median, 12))
        await ledger.add_price(PriceRecord(day, "ask", 1.0))
        await ledger.add_price(PriceRecord(day + timedelta(hours=1), "rental", 1.0))
    finally:
        await ledger.close()


def test_realised_price_beside_the_market_median(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path)
    asyncio.run(_prices(config_path))
    data = report_json(config_path, NOW, "--since", "2026-11-24", "--until", "2026-11-25")
    totals = data["totals"]
    realised = totals["earnings"] * 1.25 / totals["rented_gpu_hours"]  # 1.25 USD per EUR
    assert data["prices"] == {
        "currency": "USD", "realised_per_gpu_hour": pytest.approx(realised, abs=1e-4),
        "market_median": 1.0, "mean_ask": 1.0, "listings": 1, "rentals": 1,
    }  # fmt: skip
    args = ["report", "-c", str(config_path), "--since", "2026-11-24", "--until", "2026-11-25"]
    assert main(args, FakeClock(NOW)) == 0
    out = capsys.readouterr().out
    line = f"Prices: realised {realised:.3f} USD per rented GPU-hour, market median 1.000"
    assert line in out
    assert "(1 listings, 1 rentals)" in out


def test_no_price_line_without_prices(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    asyncio.run(_two_nights(config_path))
    data = report_json(config_path, NOW, "--since", "2026-11-24", "--until", "2026-11-25")
    assert "prices" not in data
