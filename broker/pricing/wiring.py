"""Building the market watcher for a scheduler: only for `price_gpu = "market"` on Vast."""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.clock import Clock
from broker.config import Config
from broker.pricing.ask import auto_floor
from broker.pricing.market import Machine, VastMarketReader
from broker.pricing.watch import PriceWatch
from broker.providers.base import Provider, ProviderStatus
from broker.scheduling.actions import Actions

log = logging.getLogger(__name__)


def price_watch(
    config: Config,
    provider: Provider,
    clock: Clock,
    actions: Actions,
    status: Callable[[], ProviderStatus | None],
    *,
    on_update: Callable[[], None],
) -> PriceWatch | None:
    from broker.providers.vast import VastMarket, VastProvider

    section = config.provider
    if not isinstance(section, VastProvider) or not section.market_priced:
        return None
    if not isinstance(provider, VastMarket):
        raise TypeError("price_gpu = market needs the Vast.ai adapter")
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
            section.min_bid_margin,
            section.usd_per_currency,
        )

    def machine() -> Machine | None:
        read = status()
        return Machine.from_status(read) if read is not None else None

    reader = VastMarketReader(provider.market_api(), clock, settings, machine)
    return PriceWatch(
        reader, clock, settings, floor, on_update=on_update, record=actions.record_price
    )
