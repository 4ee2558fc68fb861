"""Competing offers for `simulate`: the paper market's other hosts, and the market ask.

A population of `competitors` machines like ours asks market x f_i, f_i log-normal around 1
with `competitor_spread`; the market price is the paper market's `market_price_gpu`, or a
series read from a CSV in the shape of Vast's metrics history (`timestamp,price_median`,
as `vastai metrics gpu-trends` gives it), so a month of real prices can be replayed. An
on-demand renter takes the cheapest offer it can afford among the free ones, ours
included: a competitor it takes is busy for the renter's stay. A scenario's renters are
what one machine sees: each competitor brings as many again (`market_renters`).
(Interruptible renters bid on our offer alone, as before.)

With `price_gpu = "market"` (or `--policy pricing.percentile=...`), each listing and each
renewal made while unrented asks what broker/pricing/ask.py decides from the free
competitors' prices (what a search shows), and the pool does not list while the market
median sits below the floor.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from broker.config import Config
from broker.pricing.ask import Market, auto_floor, next_ask, target
from broker.pricing.settings import PricingSection
from broker.pricing.watch import listing_blocker
from broker.simulation.economics import EnergyPrice, Machine
from broker.simulation.inputs import InputError, Renter

AUTO_FLOOR_MARGIN = 0.25  # min_bid_margin's default (broker/providers/vast.py)


def read_price_series(path: Path) -> list[tuple[float, float]]:
    """(unix time, market price per GPU-hour) rows from `timestamp,price_median`."""
    rows: list[tuple[float, float]] = []
    try:
        with path.open(newline="") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                try:
                    when = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00"))
                    price = float(row["price_median"])
                except (KeyError, TypeError, ValueError):
                    raise InputError(
                        f"{path}:{line}: expected timestamp,price_median "
                        "(ISO 8601 time, USD per GPU-hour)"
                    ) from None
                if when.tzinfo is None or not math.isfinite(price) or price <= 0:
                    raise InputError(f"{path}:{line}: a time with its offset and a price above 0")
                rows.append((when.timestamp(), price))
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    if not rows:
        raise InputError(f"{path}: no prices")
    return sorted(rows)


class CompetingMarket:
    def __init__(
        self,
        market_price: float,
        competitors: int,
        spread: float,
        *,
        seed: int = 0,
        series: list[tuple[float, float]] | None = None,
    ) -> None:
        rng = random.Random(seed ^ 0x5EED)
        self._rng = rng
        self._factors = [math.exp(rng.gauss(0.0, spread)) for _ in range(competitors)]
        self._busy_until = [0.0] * competitors
        self._constant = market_price
        self._times = [t for t, _ in series or []]
        self._prices = [p for _, p in series or []]

    def market_renters(self, renters: list[Renter], start: float, end: float) -> list[Renter]:
        """The renters of the whole population: a scenario's renter stream is what one
        machine sees, so each competitor brings as many again (the same stream, shifted by
        a random offset around the span), keeping each machine's share of demand."""
        span = end - start
        if span <= 0 or not renters:
            return renters
        out = list(renters)
        for _ in self._factors:
            offset = self._rng.uniform(0, span)
            out.extend(
                replace(r, at=start + (r.at - start + offset) % span) for r in renters
            )
        out.sort(key=lambda r: r.at)
        return out

    def market_price(self, t: float) -> float:
        if not self._times:
            return self._constant
        k = max(0, bisect.bisect_right(self._times, t) - 1)
        return self._prices[k]

    def free_prices(self, t: float) -> list[float]:
        """What a search shows now: the free competitors' asks."""
        base = self.market_price(t)
        return [base * f for f, busy in zip(self._factors, self._busy_until, strict=True)
                if busy <= t]  # fmt: skip

    def all_prices(self, t: float) -> list[float]:
        base = self.market_price(t)
        return [base * f for f in self._factors]

    def arrive(self, renter: Renter, ours: float | None) -> bool:
        """A renter looks; True when it takes our offer (asking `ours`, None: not on offer
        to it), False when it takes a competitor or nobody."""
        if renter.kind == "interruptible":
            return ours is not None
        t = renter.at
        base = self.market_price(t)
        best, best_price = -1, math.inf
        for k, factor in enumerate(self._factors):
            price = base * factor
            if self._busy_until[k] <= t and price <= renter.max_price and price < best_price:
                best, best_price = k, price
        if ours is not None and ours <= best_price:
            return True  # a tie goes to us: ours was the offer it already looked at
        if best >= 0:
            self._busy_until[best] = t + renter.hours * 3600
        return False


@dataclass
class MarketAsk:
    """The ask of `price_gpu = "market"` in a replay (broker/pricing/ask.py decides)."""

    settings: PricingSection
    market: CompetingMarket
    machine: Machine
    energy: EnergyPrice
    ask: float | None = None
    changed_at: float | None = None

    def floor(self, t: float) -> float:
        if self.settings.floor != "auto":
            return float(self.settings.floor)
        m = self.machine
        kwh_price = self.energy.cost(t, t + 3600, 1000.0)
        return auto_floor(
            m.load_watts / max(m.gpu_count, 1), m.overhead_watts, m.gpu_count, kwh_price,
            AUTO_FLOOR_MARGIN, m.usd_per_currency,
        )  # fmt: skip

    def _market(self, t: float) -> Market:
        prices = self.market.all_prices(t)
        median = sorted(prices)[len(prices) // 2] if prices else None
        return Market(tuple(self.market.free_prices(t)), truncated=False, median=median)

    def blocked(self, t: float) -> str | None:
        return listing_blocker(target(self._market(t), self.settings, self.floor(t)), self.ask)

    def take(self, t: float, *, rented: bool) -> float | None:
        """The ask a listing or renewal made at `t` carries."""
        verdict = target(self._market(t), self.settings, self.floor(t))
        since = None if self.changed_at is None else t - self.changed_at
        ask = next_ask(
            self.ask, verdict.price, rented=rented, since_change_s=since, settings=self.settings
        )
        if ask != self.ask:
            self.ask, self.changed_at = ask, t
        return ask


DEFAULT_COMPETITORS = 12  # when a row prices by the market and the config names none


def competition_for(config: Config, priced: bool) -> Callable[[], CompetingMarket] | None:
    """A fresh population per replayed row (each row's renters take competitors too), from
    the paper market's keys; None when there is no competition to model."""
    from broker.providers.paper import PaperProvider

    paper = config.provider if isinstance(config.provider, PaperProvider) else None
    section = paper or PaperProvider(kind="paper")
    count = section.competitors or (DEFAULT_COMPETITORS if priced else 0)
    if count == 0:
        return None
    series = read_price_series(section.market_prices) if section.market_prices else None

    def make() -> CompetingMarket:
        return CompetingMarket(
            section.market_price_gpu, count, section.competitor_spread,
            seed=section.seed, series=series,
        )  # fmt: skip

    return make
