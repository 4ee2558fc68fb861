"""The paper market: seeded, clock-driven, with Vast.ai's contract rules."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.config import Config, PaperProvider
from broker.errors import ProviderRejected
from broker.providers import Offer, create_provider
from broker.providers.paper import PaperMarket

H = timedelta(hours=1)


def paper(clock: FakeClock, gpus: int = 4, **overrides: Any) -> PaperMarket:
    config = PaperProvider.model_validate({"kind": "paper", "arrivals_per_hour": 2.0} | overrides)
    return PaperMarket(config, clock, gpu_count=gpus)


async def run_day(clock: FakeClock, market: PaperMarket, poll: timedelta) -> list[Any]:
    """List in rolling 2-hour offers for 24 hours, polling every `poll`."""
    seen = []
    for _ in range(12):
        await market.list(market.make_offer(clock.now() + 2 * H))
        stop = clock.monotonic() + 2 * 3600
        while clock.monotonic() < stop:
            await clock.advance(poll)
            seen.append(await market.status())
    return seen


async def test_the_same_seed_gives_the_same_market_however_often_it_is_polled() -> None:
    slow_clock, fast_clock = FakeClock(), FakeClock()
    slow, fast = paper(slow_clock), paper(fast_clock)
    await run_day(slow_clock, slow, 2 * H)
    await run_day(fast_clock, fast, timedelta(minutes=5))
    day = slow_clock.now().date()
    a = await slow.earnings(day - timedelta(days=1), day)
    b = await fast.earnings(day - timedelta(days=1), day)
    assert [(r.day, r.amount) for r in a] == [(r.day, r.amount) for r in b]
    assert sum(r.amount for r in a) > 0
    assert [(c.id, c.kind, c.gpus, c.start) for c in slow.book.contracts] == [
        (c.id, c.kind, c.gpus, c.start) for c in fast.book.contracts
    ]


async def test_renters_of_both_kinds_stay_within_the_offer_end(clock: FakeClock) -> None:
    market = paper(clock, arrivals_per_hour=6.0, interruptible_share=0.5)
    for status in await run_day(clock, market, timedelta(minutes=15)):
        if status.locked_until is not None:
            assert status.offer_end is None or status.locked_until <= status.offer_end
    kinds = {c.kind.value for c in market.book.contracts}
    assert kinds == {"on-demand", "interruptible"}
    for contract in market.book.contracts:
        assert contract.ended_at is None or contract.ended_at <= contract.end


async def test_an_unlisted_machine_gets_no_renters(clock: FakeClock) -> None:
    market = paper(clock, arrivals_per_hour=50.0)
    await clock.advance(10 * H)
    status = await market.status()
    assert status.listed is False and status.rentals.total == 0
    assert market.book.contracts == []


async def test_demand_falls_with_price_and_with_shorter_offers(clock: FakeClock) -> None:
    market = paper(clock, market_price_gpu=0.2, full_demand_after="4h")
    now = clock.now()
    at_market = market.arrival_rate(Offer(price_gpu=0.2, end_date=now + 4 * H), now)
    cheap = market.arrival_rate(Offer(price_gpu=0.1, end_date=now + 4 * H), now)
    dear = market.arrival_rate(Offer(price_gpu=0.25, end_date=now + 4 * H), now)
    short = market.arrival_rate(Offer(price_gpu=0.2, end_date=now + H), now)
    assert at_market == cheap == pytest.approx(2.0)
    assert dear == pytest.approx(2.0 * 2.718281828 ** -1.0)  # elasticity 4 x 25 % over
    assert short == pytest.approx(0.5)


async def test_rentals_outlive_unlisting_and_earnings_are_estimates(clock: FakeClock) -> None:
    market = paper(clock, arrivals_per_hour=20.0, interruptible_share=0.0)
    await market.list(market.make_offer(clock.now() + 3 * H))
    await clock.advance(H)
    assert (await market.status()).rentals.on_demand >= 1
    await market.unlist()
    status = await market.status()
    assert status.listed is False and status.rentals.on_demand >= 1
    assert status.locked_until == clock.now() + 2 * H
    today = clock.now().date()
    records = await market.earnings(today, today)
    assert records and {(r.source, r.provider, r.currency) for r in records} == {
        ("estimate", "paper", "USD")
    }
    assert market.capabilities.earnings_source == "estimate"


async def test_displacing_interruptible_renters(clock: FakeClock) -> None:
    market = paper(clock, arrivals_per_hour=20.0, interruptible_share=1.0)
    await market.list(market.make_offer(clock.now() + 4 * H))
    await clock.advance(H)
    assert (await market.status()).rentals.only_interruptible
    await market.displace_interruptible()
    status = await market.status()
    assert status.rentals.total == 0
    assert "interruptible" not in status.gpu_occupancy
    await market.end_displacement()
    assert (await market.status()).rentals.only_interruptible


async def test_on_demand_renters_cannot_be_displaced(clock: FakeClock) -> None:
    market = paper(clock, arrivals_per_hour=20.0, interruptible_share=0.0)
    await market.list(market.make_offer(clock.now() + 4 * H))
    await clock.advance(H)
    with pytest.raises(ProviderRejected, match="cannot be displaced"):
        await market.displace_interruptible()


async def test_the_factory_sizes_the_paper_market_from_the_fake_gpus(clock: FakeClock) -> None:
    provider = create_provider(Config(), clock)
    assert isinstance(provider, PaperMarket)
    async with provider:
        status = await provider.status()
        assert len(status.gpu_occupancy) == 2
        assert (await provider.probe())[0].startswith("paper market with 2 GPUs")


async def test_a_renter_takes_the_whole_machine_unless_min_chunk_allows_less(
    clock: FakeClock,
) -> None:
    whole = paper(clock, arrivals_per_hour=20.0, interruptible_share=0.0, mean_rental="20m")
    assert whole.make_offer(clock.now() + 4 * H).min_chunk == 4
    await run_day(clock, whole, timedelta(minutes=15))
    assert len(whole.book.contracts) > 5
    assert {c.gpus for c in whole.book.contracts} == {4}

    other = FakeClock()
    chunks = paper(other, arrivals_per_hour=20.0, interruptible_share=0.0, mean_rental="20m",
                   min_chunk=2)  # fmt: skip
    assert chunks.make_offer(other.now() + 4 * H).min_chunk == 2
    await run_day(other, chunks, timedelta(minutes=15))
    assert {c.gpus for c in chunks.book.contracts} == {2, 3, 4}
    # more than the machine has is the whole machine
    assert paper(clock, gpus=2, min_chunk=8).make_offer(None).min_chunk == 2


async def test_renter_load_is_told_at_the_moment_of_each_change(clock: FakeClock) -> None:
    market = paper(clock, arrivals_per_hour=6.0, interruptible_share=0.5, mean_rental="1h",
                   min_chunk=1)  # fmt: skip
    told: list[tuple[Any, frozenset[int]]] = []
    market.on_renter_load = lambda at, gpus: told.append((at, gpus))
    await run_day(clock, market, timedelta(hours=2))  # polled rarely: told all the same
    assert len(told) > 4
    assert [at for at, _ in told] == sorted(at for at, _ in told)

    def held_at(t: Any) -> frozenset[int]:
        """GPUs on-demand renters held just after `t`, from the contracts."""
        return frozenset(
            i for c in market.book.contracts
            if c.start <= t < (c.ended_at or c.stops_at)
            for i in c.gpu_indices
        )  # fmt: skip

    moments = {c.start for c in market.book.contracts} | {
        c.ended_at for c in market.book.contracts if c.ended_at is not None
    }
    for at, _ in told:
        assert at in moments  # a renter's arrival or departure, not a poll
    on_demand_only = [
        (at, gpus) for at, gpus in told
        if all(c.kind.value == "on-demand" for c in market.book.contracts
               if c.start <= at < (c.ended_at or c.stops_at))
    ]  # fmt: skip
    for at, gpus in on_demand_only:
        assert gpus == held_at(at)
