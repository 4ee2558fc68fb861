"""`[provider.pricing]`: how the ask follows the market (only with `price_gpu = "market"`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from broker.configtypes import Duration, PositiveDuration, StrictModel


def market_or_price(value: object) -> object:
    """`price_gpu`: "market" (the ask follows the market) or a fixed price above 0."""
    if value == "market":
        return value
    if isinstance(value, bool) or not isinstance(value, float | int) or value <= 0:
        raise ValueError(f'expected "market" or a price above 0, got {value!r}')
    return value


class PricingSection(StrictModel):
    # Where our ask sits among the comparable rentable offers, in host terms (0.5: their
    # median). Chosen by scripts/bench-pricing: the most robust within 10 % of the best
    # net on the bundled scenarios (0.35 fell to 85 % with some competitor prices).
    percentile: float = Field(default=0.5, ge=0, le=1)
    # "auto": one GPU-hour's energy under load at the tariff in force, plus its share of
    # energy.overhead_watts, x (1 + min_bid_margin); or USD per GPU-hour.
    floor: float | Literal["auto"] = "auto"
    ceiling: float | None = Field(default=None, gt=0, description="USD per GPU-hour")
    min_change: float = Field(default=0.01, ge=0, description="USD per GPU-hour")
    refresh: PositiveDuration = timedelta(minutes=30)
    min_peers: int = Field(default=5, ge=1)
    # While listed and unrented for longer than decay_after, the ask steps down by `decay`
    # (USD per GPU-hour) every `refresh`, never below the floor; a rental resets it.
    decay: float = Field(default=0.0, ge=0)
    decay_after: Duration = timedelta(hours=4)
    # The search asks for this many offers, cheapest first; as many back = truncated.
    search_limit: int = Field(default=256, ge=2)

    @field_validator("floor", mode="before")
    @classmethod
    def _floor(cls, value: object) -> object:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, float | int) or value < 0:
            raise ValueError(f'expected "auto" or a price of at least 0, got {value!r}')
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (
            self.ceiling is not None
            and isinstance(self.floor, float | int)
            and self.ceiling < self.floor
        ):
            raise ValueError(f"ceiling {self.ceiling} is below floor {self.floor}")
        if self.decay_after < timedelta(0):
            raise ValueError("decay_after: expected a duration of at least zero")
        return self
