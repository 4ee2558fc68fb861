"""The report's price line: the realised price per rented GPU-hour beside the market median
the broker read over the same period (price_gpu = "market"; broker/pricing/)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.errors import LedgerError
from broker.ledger.base import Ledger, PriceRecord


@dataclass(frozen=True)
class PriceSummary:
    """USD per GPU-hour. `realised`: earnings over rented GPU-hours; `market_median`: the
    mean of the market medians read in the period (host terms); `mean_ask`: of listings."""

    realised: float | None
    market_median: float | None
    mean_ask: float | None
    listings: int
    rentals: int

    def to_json(self) -> dict[str, Any]:
        def usd(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "currency": "USD",
            "realised_per_gpu_hour": usd(self.realised),
            "market_median": usd(self.market_median),
            "mean_ask": usd(self.mean_ask),
            "listings": self.listings,
            "rentals": self.rentals,
        }

    def line(self) -> str:
        def usd(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        return (
            f"realised {usd(self.realised)} USD per rented GPU-hour, market median "
            f"{usd(self.market_median)}, mean ask {usd(self.mean_ask)} "
            f"({self.listings} listings, {self.rentals} rentals)"
        )


async def read_prices(ledger: Ledger, start: datetime, end: datetime) -> list[PriceRecord]:
    """The prices a report summarises; none when the ledger cannot be read now (the price
    line is left out rather than the report failing)."""
    try:
        return await ledger.prices(start, end)
    except LedgerError:
        return []


def price_summary(
    records: Sequence[PriceRecord],
    *,
    earnings: float,
    rented_gpu_hours: float,
    usd_per_currency: float,
) -> PriceSummary | None:
    """None when no prices were recorded in the period."""
    if not records:
        return None
    markets = [r.price for r in records if r.kind == "market"]
    asks = [r.price for r in records if r.kind == "ask"]
    realised = earnings * usd_per_currency / rented_gpu_hours if rented_gpu_hours > 0 else None
    return PriceSummary(
        realised=realised,
        market_median=statistics.fmean(markets) if markets else None,
        mean_ask=statistics.fmean(asks) if asks else None,
        listings=len(asks),
        rentals=sum(1 for r in records if r.kind == "rental"),
    )
