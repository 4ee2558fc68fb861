"""Displacing interruptible renters on Vast.ai by a self-rental, against the fake Vast.ai."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from fakes.vast import ASK_BASE, FakeVast, drive
from test_provider_vast import KEY, offer, vast_config

from broker.clock import FakeClock
from broker.errors import ProviderRejected, ProviderStateMismatch
from broker.providers.vast import SELF_RENTAL_LABEL, VastMarket

H = timedelta(hours=1)
ASK = ASK_BASE + 4242


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeVast]:
    server = FakeVast(clock, api_keys={KEY})
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def vast(fake: FakeVast, clock: FakeClock) -> AsyncIterator[VastMarket]:
    async with VastMarket(vast_config(fake), clock, api_key=KEY) as market:
        yield market


async def rented_by_bidders(vast: VastMarket, fake: FakeVast, clock: FakeClock) -> None:
    await vast.list(offer(clock.now() + 4 * H, min_bid=0.1))
    fake.add_rental("interruptible", 2, bid=0.15)
    fake.add_rental("interruptible", 2, bid=0.12)


async def test_displace_pauses_bidders_and_status_shows_no_renter(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    assert vast.capabilities.can_displace_interruptible
    await rented_by_bidders(vast, fake, clock)
    assert (await vast.status()).rentals.interruptible == 2

    await vast.displace_interruptible()

    [made] = fake.self_rentals()
    assert vast.self_rental == made.contract.id
    assert made.body["label"] == SELF_RENTAL_LABEL and made.body["price"] is None
    assert made.body["image"] == "alpine:latest" and made.body["disk"] == 1.0
    book = fake.machine().book
    assert all(c.paused for c in book.active() if not c.self_rental)
    # The platform counts our self-rental as an on-demand contract on every GPU ...
    machine = fake.render(fake.machine())
    assert machine["gpu_occupancy"] == "D D D D"
    assert machine["current_rentals_running_on_demand"] == 1
    # ... the adapter does not: nobody rents, every GPU is free for local use.
    status = await vast.status()
    assert status.rentals.total == 0 and not status.rented
    assert status.gpu_occupancy == ("free",) * 4
    assert status.locked_until is None
    assert status.raw["gpu_broker_self_rental"] == made.contract.id
    put = fake.calls(method="PUT", path=f"/api/v0/asks/{ASK}/")[0]
    assert put.body["runtype"] == "args" and put.body["args"] == ["infinity"]

    await vast.end_displacement()

    assert fake.self_rentals() == [] and vast.self_rental is None
    status = await vast.status()
    assert status.rentals.only_interruptible and status.rentals.interruptible == 2
    assert status.gpu_occupancy == ("interruptible",) * 4
    assert fake.calls(method="DELETE", path=f"/api/v0/instances/{made.contract.id}/")
    # Idempotent: nothing is left to end.
    await vast.end_displacement()


async def test_displacing_twice_makes_one_self_rental(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await rented_by_bidders(vast, fake, clock)
    await vast.displace_interruptible()
    await vast.displace_interruptible()
    assert len(fake.self_rentals()) == 1
    assert len(fake.calls(method="PUT", path=f"/api/v0/asks/{ASK}/")) == 1


async def test_on_demand_renters_are_not_displaced(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await vast.list(offer(clock.now() + 4 * H, min_bid=0.1))
    fake.add_rental("interruptible", 2, bid=0.15)
    fake.add_rental("on-demand", 1)
    with pytest.raises(ProviderRejected, match="cannot be displaced"):
        await vast.displace_interruptible()
    assert fake.calls(path=f"/api/v0/asks/{ASK}/") == [] and fake.self_rentals() == []


async def test_rate_limits_and_server_errors_are_retried(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await rented_by_bidders(vast, fake, clock)
    fake.fail(500, path="/api/v0/bundles/")
    fake.fail(429, times=2, path="/api/v0/asks/")
    await drive(clock, vast.displace_interruptible())
    assert len(fake.self_rentals()) == 1
    assert len(fake.calls(path=f"/api/v0/asks/{ASK}/")) == 3
    fake.fail(429, path="/api/v0/instances/")
    fake.fail(500, path="/api/v0/instances/")
    await drive(clock, vast.end_displacement())
    assert fake.self_rentals() == []
    assert (await vast.status()).rentals.interruptible == 2


async def test_a_create_answered_done_that_did_nothing_is_not_a_displacement(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await rented_by_bidders(vast, fake, clock)
    fake.drop_writes()
    with pytest.raises(ProviderStateMismatch, match="not displaced"):
        await vast.displace_interruptible()
    assert vast.self_rental is None
    assert (await vast.status()).rentals.interruptible == 2


async def test_a_create_cut_off_after_it_happened_is_found_not_repeated(
    fake: FakeVast, clock: FakeClock
) -> None:
    async with VastMarket(vast_config(fake, request_timeout="100ms"), clock, api_key=KEY) as vast:
        await rented_by_bidders(vast, fake, clock)
        fake.slow(0.5, path="/api/v0/asks/")  # the create happens; its answer comes too late
        await drive(clock, vast.displace_interruptible())
        [made] = fake.self_rentals()
        assert vast.self_rental == made.contract.id
        assert (await vast.status()).rentals.total == 0


async def test_an_unverified_machine_finds_its_own_offer(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.machine().extra["verification"] = "unverified"
    await rented_by_bidders(vast, fake, clock)
    await vast.displace_interruptible()
    search = fake.calls(method="POST", path="/api/v0/bundles/")[0]
    # No default filters (verified, rentable, external) that could hide our own machine.
    assert search.body == {
        "machine_id": {"eq": "4242"}, "order": [["num_gpus", "desc"]], "type": "on-demand",
        "allocated_storage": 1.0,
    }  # fmt: skip


async def test_without_an_offer_there_is_nothing_to_rent(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await rented_by_bidders(vast, fake, clock)
    await vast.unlist()
    with pytest.raises(ProviderRejected, match="no offer of machine 4242"):
        await vast.displace_interruptible()


async def test_a_restarted_broker_ends_the_self_rental_it_left(
    fake: FakeVast, clock: FakeClock
) -> None:
    async with VastMarket(vast_config(fake), clock, api_key=KEY) as first:
        await rented_by_bidders(first, fake, clock)
        await first.displace_interruptible()
    async with VastMarket(vast_config(fake), clock, api_key=KEY) as second:
        assert second.self_rental is None
        assert [i.id for i in await second.self_rentals()] == [first.self_rental]
        await second.end_displacement()
        assert fake.self_rentals() == []
        assert (await second.status()).rentals.interruptible == 2


async def test_a_self_rental_destroyed_behind_our_back_is_already_ended(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await rented_by_bidders(vast, fake, clock)
    await vast.displace_interruptible()
    fake.end_rental(fake.self_rentals()[0].contract.id)
    fake.self_rentals()[0].destroyed = True
    await vast.end_displacement()  # the DELETE answers 404: already gone
    assert vast.self_rental is None
