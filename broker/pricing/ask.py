"""The ask, as pure functions of the market and the machine (no I/O, no clock).

- `auto_floor`: what one GPU-hour under load costs in power, overhead share included,
  with the margin, in USD, rounded up to the cent (never below cost).
- `target`: where the market puts our ask now: the configured percentile of the peers'
  prices (host terms), clamped to floor and ceiling, rounded to the cent. No target when
  the search was truncated or found too few peers (the last ask is kept), and a
  "below floor" verdict when the market median is under the floor (do not list).
- `decayed`: the optional step-down while listed and unrented.
- `next_ask`: whether a new target may replace the ask in force: never while rented
  (a raise would stop running contracts' extension), at most once per `refresh`, and only
  by at least `min_change`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from broker.pricing.settings import PricingSection

EPSILON = 1e-9  # float noise in prices that are whole cents


def cents(price: float) -> float:
    """Rounded to the nearest cent (halves up)."""
    return math.floor(price * 100 + 0.5 + EPSILON) / 100


def cents_up(price: float) -> float:
    return math.ceil(price * 100 - EPSILON) / 100


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def auto_floor(
    load_watts_per_gpu: float,
    overhead_watts: float,
    gpu_count: int,
    price_per_kwh: float,
    margin: float,
    usd_per_currency: float = 1.0,
) -> float:
    """USD per GPU-hour below which a rental loses money on power."""
    watts = load_watts_per_gpu + overhead_watts / max(gpu_count, 1)
    return cents_up(watts / 1000 * price_per_kwh * usd_per_currency * (1 + margin))


@dataclass(frozen=True)
class Market:
    """One read of the market, prices in host terms (USD per GPU-hour)."""

    peers: tuple[float, ...]  # one per comparable rentable machine, ours excluded
    truncated: bool  # as many offers came back as the search's limit
    median: float | None = None  # the whole population's (rented ones too), when known


def market_median(market: Market) -> float | None:
    """The population's median when the metrics gave it, else the peers'."""
    if market.median is not None:
        return market.median
    return percentile(market.peers, 0.5) if market.peers else None


@dataclass(frozen=True)
class Target:
    price: float | None  # None: keep the ask in force (see `reason`)
    below_floor: bool
    reason: str
    median: float | None = None


def target(market: Market, settings: PricingSection, floor: float) -> Target:
    count = len(market.peers)
    if market.truncated:
        return Target(
            None, False,
            f"the search came back truncated ({count} offers, its limit): a cheapest-first "
            "sample, the last ask is kept",
        )  # fmt: skip
    if count < settings.min_peers:
        return Target(
            None, False,
            f"only {count} comparable offer(s) (min_peers {settings.min_peers}): "
            "the last ask is kept",
        )  # fmt: skip
    median = market_median(market)
    assert median is not None  # min_peers >= 1 peers
    if median < floor:
        return Target(
            None, True,
            f"market median {median:.2f} below your power cost {floor:.2f} per GPU-hour",
            median,
        )  # fmt: skip
    price = percentile(market.peers, settings.percentile)
    if settings.ceiling is not None:
        price = min(price, settings.ceiling)
    price = max(cents(price), cents_up(floor))
    shown = f"{settings.percentile:.0%}"
    return Target(price, False, f"{shown} of {count} comparable offers", median)


def decayed(price: float, floor: float, settings: PricingSection, unrented_s: float) -> float:
    """`price` stepped down by `decay` per `refresh` past `decay_after` listed and
    unrented; never below the floor (nor raised to it)."""
    past = unrented_s - settings.decay_after.total_seconds()
    if settings.decay <= 0 or past <= 0:
        return price
    steps = math.floor(past / settings.refresh.total_seconds()) + 1
    return max(cents(price - steps * settings.decay), min(price, cents_up(floor)))


def next_ask(
    current: float | None,
    wanted: float | None,
    *,
    rented: bool,
    since_change_s: float | None,
    settings: PricingSection,
) -> float | None:
    """The ask to list at: `wanted` where it may replace `current`, else `current`."""
    if wanted is None or current is None:
        return current if wanted is None else wanted
    if rented:
        return current
    if since_change_s is not None and since_change_s < settings.refresh.total_seconds():
        return current
    if abs(wanted - current) < settings.min_change - EPSILON:
        return current
    return wanted


def rank(ask: float, peers: Sequence[float]) -> int:
    """Our place among the peers, cheapest first (1: no peer asks less)."""
    return 1 + sum(1 for p in peers if p < ask)
