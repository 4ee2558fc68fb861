"""Building the market watcher for a scheduler: for `price_gpu = "market"` on Vast.ai, and
on the paper market (its competing offers) to try it without an account."""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.clock import Clock
from broker.config import Config
from broker.pricing.ask import auto_floor
from broker.pricing.market import Machine, MarketRead, MarketReader, VastMarketReader
from broker.pricing.watch import PriceWatch
from broker.providers.base import Provider, ProviderStatus
from broker.providers.paper import PaperMarket
from broker.scheduling.actions import Actions

log = logging.getLogger(__name__)

PAPER_MARGIN = 0.25  # the paper market has no min_bid_margin: Vast's default


class PaperMarketReader:
    """The paper market's competing offers, read in this process."""

    ratio: float | None = 1.0  # the paper market shows host prices

    def __init__(self, market: PaperMarket) -> None:
        self._market = market

    def knows_machine(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def read(self) -> MarketRead:
        return self._market.market_read()


def price_watch(
    config: Config,
    provider: Provider,
    clock: Clock,
    actions: Actions,
    status: Callable[[], ProviderStatus | None],
    *,
    on_update: Callable[[], None],
) -> PriceWatch | None:
    from broker.providers.paper import PaperMarket, PaperProvider
    from broker.providers.vast import VastMarket, VastProvider

    section = config.provider
    if not isinstance(section, VastProvider | PaperProvider) or not section.market_priced:
        return None
    margin = section.min_bid_margin if isinstance(section, VastProvider) else PAPER_MARGIN
    settings = section.pricing
    warned: list[bool] = []

    def floor() -> float:
        if settings.floor != "auto":
            return float(settings.floor)
        watts = actions.load_watts_per_gpu()
        if watts is None and not warned:
            warned.append(True)
            log.warning("pricing.floor = auto without a GPU power limit: overhead only")
        rate = actions.tariffs.rate_at(clock.now()).price_per_kwh
        return auto_floor(
            watts or 0.0,
            actions.config.energy.overhead_watts,
            max(len(actions.sampler.devices), 1),
            rate,
            margin,
            section.usd_per_currency,
        )

    def machine() -> Machine | None:
        read = status()
        return Machine.from_status(read) if read is not None else None

    reader: MarketReader
    if isinstance(provider, VastMarket):
        reader = VastMarketReader(provider.market_api(), clock, settings, machine)
    elif isinstance(provider, PaperMarket):
        reader = PaperMarketReader(provider)
    else:
        raise TypeError(f"price_gpu = market: no market reader for {provider.kind}")
    return PriceWatch(
        reader, clock, settings, floor, on_update=on_update, record=actions.record_price
    )
