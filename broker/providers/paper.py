"""A simulated marketplace with Vast.ai's contract rules, to try gpu-broker without an account.

Renters arrive as a Poisson process. The rate falls with the ask above the market price
and with a shorter offered duration (few renters want a machine for twenty minutes). It is
driven by the injected clock and a seeded `random.Random`: nothing runs in the background;
each call first plays the market forward to `clock.now()`. Arrivals are drawn in "demand
time" (the integral of the rate), so how often the broker polls does not change what
happens: the same seed and the same offers give the same renters.

A renter takes the whole machine unless `min_chunk` allows fewer GPUs. Whoever wants to
know which GPUs renters hold, and from when (the daemon, to load the fake GPUs), sets
`on_renter_load`: it is called with the exact market time of every change, in order.
"""

from __future__ import annotations

import builtins
import math
import random
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator

from broker.clock import Clock
from broker.configtypes import PositiveDuration
from broker.errors import ProviderRejected
from broker.ledger.base import EarningsRecord
from broker.pricing.ask import Market
from broker.pricing.market import MarketRead
from broker.pricing.settings import PricingSection, market_or_price
from broker.providers.base import (
    Capabilities,
    ListResult,
    Offer,
    Provider,
    ProviderStatus,
    RentalKind,
)
from broker.providers.contracts import Contract, ContractBook, RentRefused
from broker.providers.sections import PolledProvider, ProviderContext

if TYPE_CHECKING:
    from broker.simulation.competition import CompetingMarket


class PaperProvider(PolledProvider):
    """`[provider] kind = "paper"`: the simulated market, the default."""

    kind: Literal["paper"]
    seed: int = 0
    # USD per GPU-hour we ask; or "market": the ask follows the competing offers below
    # ([provider.pricing], broker/pricing/), as it would on Vast.ai.
    price_gpu: float | Literal["market"] = 0.20
    pricing: PricingSection = PricingSection()
    market_price_gpu: float = Field(
        default=0.20, gt=0, description="USD per GPU-hour renters expect"
    )
    min_bid: float | None = Field(
        default=None, ge=0, description="USD per GPU-hour interruptible floor; none = any bid"
    )
    arrivals_per_hour: float = Field(
        default=0.5, ge=0, description="renters arriving at the market price, full duration"
    )
    # Demand falls as exp(-elasticity x relative overprice): at elasticity 4 an ask 25 %
    # above the market draws about a third of the renters.
    price_elasticity: float = Field(default=4.0, ge=0)
    full_demand_after: PositiveDuration = Field(
        default=timedelta(hours=4),
        description="offers shorter than this draw proportionally fewer renters",
    )
    interruptible_share: float = Field(default=0.3, ge=0, le=1)
    min_chunk: int | None = Field(
        default=None, ge=1, description="fewest GPUs a renter may take; unset: the whole machine"
    )
    mean_rental: PositiveDuration = timedelta(hours=3)
    # The paper market prices in USD like Vast: USD for one unit of energy.currency.
    usd_per_currency: float = Field(default=1.0, gt=0)
    # Other hosts' machines like ours (broker/simulation/competition.py), asking
    # market_price_gpu x a log-normal factor (sigma `competitor_spread`): in `simulate`
    # renters take the cheapest they can afford; live, they are what price_gpu = "market"
    # reads. 0: ours is the only offer (market pricing then gets 12). `market_prices`
    # (simulate): a CSV `timestamp,price_median` (Vast's metrics history) that moves the
    # market price over time.
    competitors: int = Field(default=0, ge=0)
    competitor_spread: float = Field(default=0.25, ge=0)
    market_prices: Path | None = None

    # Nothing to ask: the market is in this process.
    probes_platform: ClassVar[bool] = False

    def create(self, clock: Clock, context: ProviderContext) -> PaperMarket:
        return PaperMarket(self, clock, gpu_count=context.gpu_count)

    def check(self) -> list[str]:
        return ["paper market (simulated renters, no account needed)"]

    _price_gpu = field_validator("price_gpu", mode="before")(market_or_price)

    @property
    def market_priced(self) -> bool:
        return self.price_gpu == "market"

    def estimate_price_gpu(self) -> float | None:
        return None if self.price_gpu == "market" else self.price_gpu


class PaperMarket(Provider):
    kind = "paper"
    machine_id = "paper"

    def __init__(self, config: PaperProvider, clock: Clock, *, gpu_count: int) -> None:
        if gpu_count < 1:
            raise ValueError("the paper market needs at least one GPU")
        self.config = config
        self._clock = clock
        self._rng = random.Random(config.seed)
        self.book = ContractBook(num_gpus=gpu_count)
        self._sim_time = clock.now()
        self._rate = 0.0  # arrivals per hour under the current offer
        self._demand_due = self._rng.expovariate(1.0)  # demand time of the next arrival
        self._displacement: Contract | None = None
        # Told (market time, GPU indices renters hold) at each change; see the docstring.
        self.on_renter_load: Callable[[datetime, frozenset[int]], None] | None = None
        self._loaded: frozenset[int] = frozenset()
        self._rivals: CompetingMarket | None = None  # built at the first market read

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            can_list=True,
            granularity="machine",
            can_displace_interruptible=True,
            earnings_source="estimate",
            note="paper market: simulated renters, earnings are estimates",
        )

    # -- the simulation ---------------------------------------------------------------

    def arrival_rate(self, offer: Offer, now: datetime) -> float:
        """Renters per hour this offer draws."""
        config = self.config
        over = max(0.0, offer.price_gpu / config.market_price_gpu - 1.0)
        price_factor = math.exp(-config.price_elasticity * over)
        if offer.end_date is None:
            duration_factor = 1.0
        else:
            offered = (offer.end_date - now).total_seconds()
            duration_factor = min(1.0, max(0.0, offered / config.full_demand_after.total_seconds()))
        return config.arrivals_per_hour * price_factor * duration_factor

    def _advance(self, to: datetime) -> None:
        """`book.advance(to)`, a contract's end at a time, so each change of the GPUs
        renters hold is told at its own moment."""
        book = self.book
        while True:
            ends = [c.stops_at for c in book.active() if c.stops_at <= to]
            if not ends:
                break
            moment = min(ends)
            book.advance(moment)
            self._tell_load(moment)
        book.advance(to)
        self._tell_load(to)

    def renter_gpus(self) -> frozenset[int]:
        """GPUs that running renters hold (the host's own displacement rental is no load)."""
        return frozenset(
            i for c in self.book.running() if not c.self_rental for i in c.gpu_indices
        )

    def _tell_load(self, at: datetime) -> None:
        loaded = self.renter_gpus()
        if loaded == self._loaded:
            return
        self._loaded = loaded
        if self.on_renter_load is not None:
            self.on_renter_load(at, loaded)

    def _play_until(self, now: datetime) -> None:
        while True:
            self._advance(self._sim_time)
            if not self.book.offer.listed:
                self._rate = 0.0
            step_end = now
            offer_end = self.book.offer.end_date if self.book.offer.listed else None
            if offer_end is not None and self._sim_time < offer_end < step_end:
                step_end = offer_end  # the rate drops to zero when the offer lapses
            hours = max(0.0, (step_end - self._sim_time).total_seconds() / 3600)
            if self._rate > 0 and self._rate * hours >= self._demand_due:
                arrival = self._sim_time + timedelta(hours=self._demand_due / self._rate)
                self._sim_time = max(arrival, self._sim_time)
                self._demand_due = self._rng.expovariate(1.0)
                self._advance(self._sim_time)
                self._arrive(self._sim_time)
                self._tell_load(self._sim_time)
                continue
            self._demand_due -= self._rate * hours
            self._sim_time = step_end
            if step_end >= now:
                break
        self._advance(now)

    def _arrive(self, at: datetime) -> None:
        """One renter: interruptible with a bid under the market, or on-demand at our ask,
        for up to the offer's end date."""
        rng = self._rng
        config = self.config
        gpus = rng.randint(max(1, self.book.offer.min_chunk), self.book.num_gpus)
        stay = timedelta(hours=rng.expovariate(3600 / config.mean_rental.total_seconds()))
        try:
            if rng.random() < config.interruptible_share:
                bid = round(config.market_price_gpu * rng.uniform(0.4, 0.9), 3)
                self.book.rent(at, RentalKind.INTERRUPTIBLE, gpus, bid=bid, leaves_at=at + stay)
            else:
                self.book.rent(at, RentalKind.ON_DEMAND, gpus, leaves_at=at + stay)
        except RentRefused:
            pass  # the renter went elsewhere

    def _sync(self) -> datetime:
        now = self._clock.now()
        self._play_until(now)
        return now

    # -- the provider interface -------------------------------------------------------

    def make_offer(
        self,
        end_date: datetime | None,
        *,
        load_watts_per_gpu: float | None = None,
        price_per_kwh: float | None = None,
        ask: float | None = None,
    ) -> Offer:
        whole = self.book.num_gpus
        price = self.config.price_gpu if self.config.price_gpu != "market" else ask
        if price is None:
            raise ProviderRejected('price_gpu = "market" and no market ask yet: not listed')
        return Offer(
            price_gpu=price,
            end_date=end_date,
            min_bid=self.config.min_bid,
            min_chunk=min(self.config.min_chunk or whole, whole),
        )

    async def list(self, offer: Offer) -> ListResult:
        now = self._sync()
        extended = self.book.list_offer(
            now, offer.price_gpu, offer.end_date, offer.min_bid, offer.min_chunk
        )
        self._rate = self.arrival_rate(offer, now)
        return ListResult(extended=extended)

    async def unlist(self, *, urgent: bool = False) -> ProviderStatus | None:
        now = self._sync()
        self.book.unlist(now)
        self._rate = 0.0
        return await self.status()

    async def status(self, *, urgent: bool = False) -> ProviderStatus:
        now = self._sync()
        offer = self.book.offer
        return ProviderStatus(
            machine_id=self.machine_id,
            observed_at=now,
            listed=offer.listed,
            offer_end=offer.end_date if offer.listed else None,
            rentals=self.book.rentals(),
            gpu_occupancy=self.book.occupancy(),
            locked_until=self.book.locked_until(),
            online=True,
            price_gpu=offer.price_gpu if offer.listed else None,
            min_bid=offer.min_bid if offer.listed else None,
            note=self.capabilities.note,
        )

    async def earnings(self, first_day: date, last_day: date) -> builtins.list[EarningsRecord]:
        now = self._sync()
        return [
            EarningsRecord(
                provider="paper",
                machine_id=self.machine_id,
                day=day,
                amount=round(amount, 6),
                currency="USD",
                source="estimate",
                updated=now,
            )
            for day, amount in sorted(self.book.earnings_by_day.items())
            if first_day <= day <= last_day
        ]

    async def displace_interruptible(self) -> None:
        """Rent our own offer on-demand, free of charge, as a Vast host would: it pushes
        interruptible renters off and blocks new ones until `end_displacement()`."""
        now = self._sync()
        if self._displacement is not None and self._displacement.active:
            return
        firm = self.book.rentals()
        if firm.on_demand or firm.reserved:
            raise ProviderRejected("paper: on-demand renters hold GPUs; they cannot be displaced")
        self._displacement = self.book.rent(
            now, RentalKind.ON_DEMAND, self.book.num_gpus, self_rental=True
        )
        self._tell_load(now)

    async def end_displacement(self) -> None:
        now = self._sync()
        if self._displacement is not None:
            self.book.end(now, self._displacement.id)
            self._displacement = None
            self._tell_load(now)

    def market_read(self) -> MarketRead:
        """What price_gpu = "market" reads: the competing offers' asks now (the paper
        market's own renters do not take them, so all are free), in host terms."""
        from broker.simulation.competition import DEFAULT_COMPETITORS, CompetingMarket

        if self._rivals is None:
            config = self.config
            self._rivals = CompetingMarket(
                config.market_price_gpu, config.competitors or DEFAULT_COMPETITORS,
                config.competitor_spread, seed=config.seed,
            )  # fmt: skip
        now = self._clock.now()
        prices = tuple(sorted(self._rivals.free_prices(now.timestamp())))
        market = Market(prices, truncated=False, median=self.config.market_price_gpu)
        return MarketRead(market, now, ratio=1.0, offers=len(prices))

    async def probe(self) -> builtins.list[str]:
        return [
            f"paper market with {self.book.num_gpus} GPUs (seed {self.config.seed}): "
            "simulated renters, no account needed"
        ]
