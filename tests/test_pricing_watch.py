"""The market watcher's bookkeeping (broker/pricing/watch.py) over a stub reader and a fake
clock: the ask in force, once per refresh, never while rented, decay, provisional asks."""

from __future__ import annotations

import asyncio
from typing import Any

from broker.clock import FakeClock
from broker.errors import ProviderError
from broker.pricing.ask import Market
from broker.pricing.market import MarketRead
from broker.pricing.settings import PricingSection
from broker.pricing.watch import PriceWatch

PEERS = tuple(0.20 + 0.02 * k for k in range(10))  # 0.20 .. 0.38, median 0.29


class StubReader:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.ratio: float | None = 1.25
        self.peers = PEERS

    def knows_machine(self) -> bool:
        return True

    async def read(self) -> MarketRead:
        return MarketRead(Market(self.peers, False), self.clock.now(), self.ratio or 1.0, 10)


def watch(clock: FakeClock, **settings: Any) -> tuple[PriceWatch, StubReader]:
    reader = StubReader(clock)
    section = PricingSection.model_validate({"refresh": "30m", "floor": 0.1} | settings)
    price = PriceWatch(reader, clock, section, lambda: 0.1)  # type: ignore[arg-type]
    return price, reader


async def test_the_ask_changes_once_per_refresh_and_never_while_rented(
    clock: FakeClock,
) -> None:
    price, reader = watch(clock)
    assert price.blocker() == "no market price read yet"
    await price.poller.read_now()
    assert price.blocker() is None
    assert price.take(rented=False) == 0.29
    reader.peers = tuple(p + 0.1 for p in PEERS)
    await price.poller.read_now()
    assert not price.reprice_due(rented=False)  # not once per refresh yet
    await clock.advance(1800)
    assert price.reprice_due(rented=False)
    assert not price.reprice_due(rented=True)
    assert price.take(rented=True) == 0.29  # a renewal while rented keeps the ask
    assert price.take(rented=False) == 0.39
    assert price.status().ask == 0.39 and price.status().rank == 6


async def test_decay_while_listed_and_unrented_and_back_after_a_rental(
    clock: FakeClock,
) -> None:
    price, _ = watch(clock, decay=0.02, decay_after="1h")
    await price.poller.read_now()
    price.note_rented(rented=False, listed=True)
    assert price.take(rented=False) == 0.29
    await clock.advance(3600 + 1800 + 1)  # two steps past decay_after
    assert price.wanted() == 0.25
    assert price.take(rented=False) == 0.25
    price.note_rented(rented=True, listed=True)
    assert price.wanted() == 0.29  # the rental resets the decay


async def test_a_provisional_ask_is_corrected_without_waiting_for_refresh(
    clock: FakeClock,
) -> None:
    price, reader = watch(clock)
    reader.ratio = None  # our own offer never seen: renter terms
    await price.poller.read_now()
    assert price.take(rented=False) == 0.29 and price.provisional
    reader.ratio = 1.25
    reader.peers = tuple(p / 1.25 for p in PEERS)  # now in host terms
    await price.poller.read_now()
    assert price.reprice_due(rented=False)
    assert price.take(rented=False) == 0.23 and not price.provisional


async def test_too_few_peers_keep_the_ask_below_floor_blocks(clock: FakeClock) -> None:
    price, reader = watch(clock, min_peers=5)
    await price.poller.read_now()
    assert price.take(rented=False) == 0.29
    reader.peers = PEERS[:3]
    await price.poller.read_now()
    await clock.advance(3600)
    assert price.take(rented=False) == 0.29 and price.blocker() is None
    assert "only 3 comparable offer(s)" in price.status().reason
    reader.peers = tuple(p / 10 for p in PEERS)
    await price.poller.read_now()
    assert price.blocker() == "market median 0.03 below your power cost 0.10 per GPU-hour"
    assert price.status().below_floor


async def test_after_a_restart_the_listed_price_is_the_ask_in_force(clock: FakeClock) -> None:
    price, _ = watch(clock)
    price.adopt(0.33)  # read from the platform before any market read
    assert price.take(rented=True) == 0.33
    await price.poller.read_now()
    assert price.take(rented=True) == 0.33  # a renter runs: unchanged
    price.adopt(0.5)  # an ask in force is not replaced by what the platform shows
    assert price.ask == 0.33


class UnknownMachineReader(StubReader):
    """Vast's machine row without gpu_name/num_gpus: no search can be built."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.known = False
        self.reads = 0

    def knows_machine(self) -> bool:
        return self.known

    async def read(self) -> MarketRead:
        self.reads += 1
        if not self.known:
            raise ProviderError("our machine's GPU model is not known yet")
        return await super().read()


async def test_a_read_waiting_for_our_machine_goes_once_it_is_known_not_every_tick(
    clock: FakeClock,
) -> None:
    reader = UnknownMachineReader(clock)
    section = PricingSection.model_validate({"refresh": "30m", "floor": 0.1})
    price = PriceWatch(reader, clock, section, lambda: 0.1)  # type: ignore[arg-type]
    await price.poller.read_now()
    assert reader.reads == 1 and price.awaiting_machine
    for _ in range(5):  # loop ticks while the machine stays unknown: no read each time
        price.note_rented(False, True)
        await asyncio.sleep(0)
    assert reader.reads == 1 and not price.poller.refreshing
    reader.known = True
    price.note_rented(False, True)
    for _ in range(5):  # the background read runs to its end in a few loop turns
        await asyncio.sleep(0)
    assert not price.poller.refreshing
    assert reader.reads == 2 and price.blocker() is None
