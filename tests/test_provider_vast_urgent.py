"""The urgent path against a fake Vast that behaves as the real one does: every answer takes
150 ms, each endpoint answers 429 when called again within 1.5 s, and the adapter keeps the
default request spacing (2 s). A local request waits on an urgent unlist: it must not wait
for spacing, for a stalled background read, or for the background backoff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from fakes.vast import REALISTIC_LATENCY, FakeVast, drive

from broker.clock import FakeClock, SystemClock
from broker.config import VastProvider
from broker.errors import ProviderUnavailable
from broker.providers import Offer, RentalKind
from broker.providers.vast import VastMarket

KEY = "urgent-key"
H = timedelta(hours=1)
RTT = REALISTIC_LATENCY
SINGLE = "/api/v0/machines/4242"
ASKS = "/api/v0/machines/4242/asks/"


def config(fake: FakeVast, **overrides: Any) -> VastProvider:
    data: dict[str, Any] = {
        "kind": "vast", "machine_id": 4242, "price_gpu": 0.3, "base_url": fake.url,
        "docker_socket": "",  # the default request_spacing (2 s) is kept
    }  # fmt: skip
    return VastProvider.model_validate(data | overrides)


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeVast]:
    server = FakeVast.realistic(clock, api_keys={KEY})
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def vast(fake: FakeVast, clock: FakeClock) -> AsyncIterator[VastMarket]:
    async with VastMarket(config(fake), clock, api_key=KEY) as market:
        await drive(clock, market.list(Offer(price_gpu=0.3, end_date=clock.now() + 2 * H)))
        await drive(clock, market.status())  # the background poll, just before
        yield market


async def test_an_urgent_unlist_right_after_a_poll_waits_for_nothing(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    start, real = clock.monotonic(), time.perf_counter()
    read_back = await drive(clock, vast.unlist(urgent=True))
    elapsed = time.perf_counter() - real
    assert read_back is not None and read_back.listed is False
    # No spacing wait and no 429 to back off from: the clock did not move, and the call
    # took its two round trips (the unlist and the read-back).
    assert clock.monotonic() == start
    assert fake.rate_limited == 0
    assert elapsed < 2 * RTT + 0.15
    assert [(r.method, r.path) for r in fake.requests[-2:]] == [
        ("DELETE", ASKS), ("GET", "/api/v0/machines")
    ]  # fmt: skip


async def test_a_429_to_the_urgent_unlist_is_retried_within_a_second(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.fail(429, path=ASKS, method="DELETE")
    start = clock.monotonic()
    read_back = await drive(clock, vast.unlist(urgent=True))
    assert read_back is not None and read_back.listed is False
    assert len(fake.calls(method="DELETE", path=ASKS)) == 2
    assert clock.monotonic() - start < 1.0  # the background backoff waits 1..2 s first


async def test_a_background_unlist_backs_off_as_before(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.fail(429, path=ASKS, method="DELETE")
    start = clock.monotonic()
    await drive(clock, vast.unlist())
    assert clock.monotonic() - start >= 1.0


async def test_a_stalled_poll_does_not_delay_an_urgent_unlist(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.slow(40, path=SINGLE, method="GET")
    await clock.advance(2)  # the poll's turn
    poll = asyncio.ensure_future(vast.status())
    for _ in range(500):  # until the poll has reached the platform, and hangs there
        if fake.calls(method="GET", path=SINGLE)[1:]:
            break
        await asyncio.sleep(0.01)
    real = time.perf_counter()
    read_back = await drive(clock, vast.unlist(urgent=True))
    elapsed = time.perf_counter() - real
    assert read_back is not None and read_back.listed is False
    assert elapsed < 2 * RTT + 0.15
    assert not poll.done()
    poll.cancel()
    with pytest.raises(asyncio.CancelledError):
        await poll


async def test_the_read_back_shows_a_rental_that_slipped_in(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    contract = fake.add_rental(RentalKind.ON_DEMAND, 2)  # after the poll, before the unlist
    read_back = await drive(clock, vast.unlist(urgent=True))
    assert read_back is not None and read_back.listed is False
    assert read_back.rented and read_back.rentals.on_demand == 1
    assert read_back.locked_until == contract.end


async def test_two_urgent_reads_in_a_row_take_both_doors(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    # After the poll (the machine's own endpoint), urgent reads alternate: each takes the
    # endpoint called least recently, so a second urgent read a second after the first
    # finds an endpoint the platform's rate limit lets through.
    await clock.advance(1)
    await drive(clock, vast.status(urgent=True))
    await clock.advance(1)
    await drive(clock, vast.status(urgent=True))
    assert [r.path for r in fake.requests[-2:]] == ["/api/v0/machines", SINGLE]
    assert fake.rate_limited == 0


async def test_with_a_deadline_nothing_waits_for_spacing(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    vast.set_deadline(clock.monotonic() + 5)
    start = clock.monotonic()
    read_back = await drive(clock, vast.unlist())
    assert read_back is not None and read_back.listed is False
    # Every call is urgent under a deadline: no spacing wait, and the read-back takes the
    # endpoint the poll left alone.
    assert clock.monotonic() == start and fake.rate_limited == 0


async def test_a_deadline_cuts_a_stalled_request(fake: FakeVast) -> None:
    # On the real clock: the request's own timeout (30 s) is cut to what the deadline leaves.
    system = SystemClock()
    fake.clock = system
    fake.slow(20, times=10, path=SINGLE, method="GET")
    async with VastMarket(config(fake), system, api_key=KEY) as vast:
        vast.set_deadline(system.monotonic() + 0.5)
        real = time.perf_counter()
        with pytest.raises(ProviderUnavailable):
            await vast.status()
        assert time.perf_counter() - real < 1.0
