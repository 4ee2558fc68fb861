"""The money side of a replay: what a renter pays, what the machine draws, what a kWh costs.

Both energy views of the report (SPEC section 6): `energy_cost` is everything drawn while
listed or rented (the GPUs and the host overhead), `extra_energy_cost` only what renting
drew above the idle server's own draw (the renters' load above idle; a listed machine
draws nothing extra).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import UTC, datetime

from broker.config import Config
from broker.scheduling.tariffs import TariffSchedule
from broker.simulation.inputs import Renter


@dataclass(frozen=True)
class Machine:
    gpu_count: int
    idle_watts: float  # the whole pool idle
    load_watts: float  # the whole pool under a renter's load
    overhead_watts: float
    price_gpu: float  # USD per GPU-hour we ask
    min_bid: float | None
    usd_per_currency: float

    @classmethod
    def from_config(cls, config: Config) -> Machine:
        fakes = config.gpus.fake
        indices = {i for s in config.services for i in s.gpus}
        count = max(len(fakes), max(indices, default=-1) + 1, 1)
        idle = sum(f.idle_watts for f in fakes) if fakes else 22.0 * count
        load = sum(f.load_watts for f in fakes) if fakes else 350.0 * count
        provider = config.provider
        price = provider.estimate_price_gpu() or 0.20
        min_bid = getattr(provider, "min_bid", None)
        return cls(
            gpu_count=count,
            idle_watts=idle,
            load_watts=load,
            overhead_watts=config.energy.overhead_watts,
            price_gpu=price,
            min_bid=min_bid if isinstance(min_bid, float | int) else None,
            usd_per_currency=float(getattr(provider, "usd_per_currency", 1.0) or 1.0),
        )

    def pays(self, renter: Renter) -> float | None:
        """USD per hour for the whole machine, or None when the renter does not rent.

        On Vast a listing covers the machine: a renter that fits takes it whole at the
        ask (on-demand) or at its bid (interruptible, above `min_bid`)."""
        if renter.gpus > self.gpu_count:
            return None
        if renter.kind == "interruptible":
            if self.min_bid is not None and renter.max_price < self.min_bid:
                return None
            return renter.max_price * self.gpu_count
        if renter.max_price < self.price_gpu:
            return None
        return self.price_gpu * self.gpu_count


class EnergyPrice:
    """Currency per kWh over a replay's span, tariff periods included, as a step function."""

    def __init__(self, config: Config, start: float, end: float) -> None:
        schedule = TariffSchedule.from_config(config.energy, config.broker.tz)
        segments = schedule.segments(
            datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end + 86400, UTC)
        )
        self._starts = [s.interval.start.timestamp() for s in segments] or [start]
        self._prices = [s.rate.price_per_kwh for s in segments] or [
            config.energy.price_per_kwh
        ]
        self._default = config.energy.price_per_kwh
        # cumulative cost of one watt from the first cut, so a span costs two bisections
        self._cum = [0.0]
        for k in range(1, len(self._starts)):
            span_h = (self._starts[k] - self._starts[k - 1]) / 3600
            self._cum.append(self._cum[-1] + span_h * self._prices[k - 1] / 1000)

    def _at(self, t: float) -> float:
        k = bisect.bisect_right(self._starts, t) - 1
        if k < 0:
            return (t - self._starts[0]) / 3600 * self._prices[0] / 1000
        return self._cum[k] + (t - self._starts[k]) / 3600 * self._prices[k] / 1000

    def cost(self, t0: float, t1: float, watts: float) -> float:
        """Currency for drawing `watts` from t0 to t1."""
        if t1 <= t0 or watts == 0:
            return 0.0
        return (self._at(t1) - self._at(t0)) * watts
