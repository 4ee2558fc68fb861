"""price_gpu = "market" end to end: the whole broker in virtual time against the fake Vast.ai
with comparable offers (`add_peer`), its search (`POST /api/v0/bundles/`) and its market
metrics. The fixtures (`make_rig`, `fake_vast`) are in tests/conftest.py; the rig's machine
4242 has two RTX 3090s and the fake charges renters 1.25 x the host's price."""

from __future__ import annotations

import logging
import math
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from fakes.rig import Rig, RigFactory
from fakes.vast import FakeVast

from broker.client import pricing_line
from broker.clock import FakeClock
from broker.pricing.ask import percentile
from broker.providers import RentalKind
from broker.providers.paper import PaperMarket
from broker.scheduling.pool import PoolState
from broker.simulation.competition import CompetingMarket

SHARE = 1.25  # the fake's renter price / host price
# Twelve comparable offers (two RTX 3090s each), in renter terms.
RENTER_PRICES = [0.30, 0.32, 0.35, 0.36, 0.38, 0.40, 0.41, 0.45, 0.48, 0.50, 0.55, 0.60]


def market(fake: FakeVast, prices: list[float] = RENTER_PRICES) -> None:
    fake.peers.clear()
    for k, price in enumerate(prices):
        fake.add_peer(5000 + k, price, num_gpus=2)
    fake.add_peer(5000, 0.70, num_gpus=2)  # a second bundle of machine 5000: not a peer
    fake.add_peer(6001, 0.05, num_gpus=1)  # a bundle of one GPU: another size
    fake.add_peer(6002, 0.05, num_gpus=2, gpu_name="RTX 4090")  # another model
    fake.add_peer(6003, math.nan, num_gpus=2)  # a price that is no price


def host_percentile(prices: list[float], q: float) -> float:
    return percentile([p / SHARE for p in prices], q)


def pricing(**overrides: Any) -> dict[str, Any]:
    return {"price_gpu": "market", "pricing": {"refresh": "60s", "floor": 0.05} | overrides}


def creates(fake: FakeVast) -> list[float]:
    return [r.body["price_gpu"] for r in fake.calls(method="PUT") if "create_asks" in r.path]


async def listed_at(rig: Rig, fake: FakeVast, price: float, limit: float = 900) -> None:
    def there() -> bool:
        offer = fake.machine().book.offer
        return offer.listed and abs(offer.price_gpu - price) < 0.0051

    await rig.until(there, limit=limit)


async def test_the_ask_is_the_percentile_of_the_peers_in_host_terms(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    market(fake_vast)
    fake_vast.metrics = [
        {"gpu_name": "RTX 4090", "price_median": 0.9},
        {"gpu_name": "RTX 3090", "price_median": 0.45, "price_p10": 0.25, "price_p90": 0.6,
         "usage": 0.8},
    ]  # the whole population's, renter terms
    rig = await make_rig(provider=pricing(percentile=0.35))
    await rig.until_state(PoolState.LISTED, limit=900)
    # Before our own offer was ever public the peers could only be compared in renter
    # terms; the first read that sees it corrects the ask at once.
    want = host_percentile(RENTER_PRICES, 0.35)
    await listed_at(rig, fake_vast, want, limit=120)
    assert abs(fake_vast.machine().book.offer.price_gpu - want) <= 0.01
    shown = rig.daemon.scheduler.pricing
    assert shown is not None
    status = shown.status()
    assert status.peers == 12 and status.ask == fake_vast.machine().book.offer.price_gpu
    assert status.market_median == pytest.approx(0.45 / SHARE)
    assert (status.market_p10, status.market_p90, status.usage) == (0.2, 0.48, 0.8)
    assert status.rank == 5  # four peers ask less than the 35th percentile
    # Shown by `status --json` (GET /api/status), in words by `status`, and in /metrics.
    async with aiohttp.ClientSession() as session:
        async with session.get(rig.api_url + "/api/status") as response:
            shown_json = (await response.json())["provider"]["pricing"]
        async with session.get(rig.api_url + "/metrics") as response:
            metrics = await response.text()
    assert shown_json["ask"] == status.ask and shown_json["peers"] == 12
    assert shown_json["rank"] == 5 and shown_json["searched_at"].endswith("+00:00")
    assert shown_json["market_median"] == pytest.approx(status.market_median, abs=1e-4)
    assert f"gpu_broker_price_ask_usd {status.ask}" in metrics
    assert "gpu_broker_price_peers 12.0" in metrics and "gpu_broker_price_rank 5.0" in metrics
    assert "gpu_broker_price_market_below_floor 0.0" in metrics
    line = pricing_line(shown_json, ZoneInfo("UTC"))
    assert line.startswith(f"ask {status.ask:.2f} USD/GPU-h (floor 0.05), market median 0.36")
    assert "rank 5 of 13, 12 peers" in line and "35% of 12 comparable offers" in line
    # The search is the official CLI's, for our model and count.
    search = next(r.body for r in fake_vast.calls(method="POST") if "gpu_name" in r.body)
    assert search["gpu_name"] == {"eq": "RTX 3090"} and search["num_gpus"] == {"eq": "2"}
    [metrics] = fake_vast.calls(method="GET", path="/api/v0/metrics/gpu/current/")[:1]
    assert metrics.query == "verified=yes&hosting_type=all&num_gpus=2"


async def test_a_truncated_search_or_too_few_peers_keeps_the_ask_and_says_why(
    make_rig: RigFactory, fake_vast: FakeVast, caplog: pytest.LogCaptureFixture
) -> None:
    market(fake_vast)
    rig = await make_rig(provider=pricing(percentile=0.5, search_limit=16))
    want = host_percentile(RENTER_PRICES, 0.5)
    await listed_at(rig, fake_vast, want)
    caplog.set_level(logging.INFO, logger="broker.pricing")
    # Cheaper offers flood in: as many come back as the limit, a cheapest-first sample.
    market(fake_vast, [0.2] * 20 + RENTER_PRICES)
    await rig.run_for(300, step=5)
    assert abs(fake_vast.machine().book.offer.price_gpu - want) < 0.006
    assert "truncated" in caplog.text
    # Then nearly everyone leaves: too few peers to price from.
    market(fake_vast, RENTER_PRICES[:3])
    await rig.run_for(300, step=5)
    assert abs(fake_vast.machine().book.offer.price_gpu - want) < 0.006
    assert "only 3 comparable offer(s) (min_peers 5)" in caplog.text
    assert rig.state is PoolState.LISTED


async def test_market_below_the_floor_means_no_listing_and_says_so(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    market(fake_vast, [p / 2 for p in RENTER_PRICES])  # median 0.2025 (no ratio yet)
    rig = await make_rig(provider=pricing(floor=0.25))
    await rig.run_for(900, step=5)
    assert rig.state is not PoolState.LISTED and not fake_vast.machine().book.offer.listed
    assert creates(fake_vast) == []
    reason = rig.daemon.scheduler.last_reason
    assert "market median 0.20 below your power cost 0.25 per GPU-hour" in reason, reason


async def test_a_listed_unrented_machine_is_withdrawn_when_the_market_falls_below_the_floor(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    market(fake_vast)
    rig = await make_rig(provider=pricing(floor=0.2))
    await rig.until_state(PoolState.LISTED, limit=900)
    market(fake_vast, [p / 3 for p in RENTER_PRICES])
    await rig.until(lambda: not fake_vast.machine().book.offer.listed, limit=120)
    await rig.until_state(PoolState.LOCAL, limit=60)
    assert "below your power cost 0.20" in rig.daemon.scheduler.last_reason


async def test_no_price_change_while_a_renter_runs_the_first_renewal_after_may(
    make_rig: RigFactory, fake_vast: FakeVast, clock: FakeClock
) -> None:
    market(fake_vast)
    rig = await make_rig(provider=pricing(percentile=0.35))
    first = host_percentile(RENTER_PRICES, 0.35)
    await listed_at(rig, fake_vast, first)
    renter = fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
    await rig.until_state(PoolState.RENTED, limit=60)
    asked = len(creates(fake_vast))
    market(fake_vast, [p * 1.5 for p in RENTER_PRICES])  # the market rises
    await rig.run_for(40 * 60, step=10)  # renewals and market reads go on meanwhile
    while_rented = creates(fake_vast)[asked:]
    assert while_rented, "renewed while rented (the end date moved later)"
    assert all(abs(p - first) < 0.006 for p in while_rented), while_rented
    assert renter.price_gpu == pytest.approx(first, abs=0.006)
    # The ledger has the ask of every listing and the price of the rental.
    ledger = rig.daemon.ledger
    assert ledger is not None
    span = (clock.now() - timedelta(days=1), clock.now() + timedelta(days=1))
    [rental] = await ledger.prices(*span, kind="rental")
    assert rental.price == renter.price_gpu
    asks = [r.price for r in await ledger.prices(*span, kind="ask")]
    assert asks == creates(fake_vast)
    markets = await ledger.prices(*span, kind="market")
    assert markets and markets[-1].peers == 12
    fake_vast.end_rental(renter.id)
    later = host_percentile([p * 1.5 for p in RENTER_PRICES], 0.35)
    await listed_at(rig, fake_vast, later, limit=600)
    assert rig.state is PoolState.LISTED


@pytest.mark.parametrize("fault", ["hang", "429", "500"])
async def test_a_failing_search_keeps_the_ask_and_the_listing(
    make_rig: RigFactory, fake_vast: FakeVast, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    market(fake_vast)
    rig = await make_rig(provider=pricing(percentile=0.35))
    want = host_percentile(RENTER_PRICES, 0.35)
    await listed_at(rig, fake_vast, want)
    market(fake_vast, [p * 2 for p in RENTER_PRICES])
    if fault == "hang":
        fake_vast.slow(40, times=3, path="/api/v0/bundles/")
    else:
        fake_vast.fail(int(fault), times=3, path="/api/v0/bundles/")
    await rig.run_for(150, step=5)
    assert rig.state is PoolState.LISTED
    assert abs(fake_vast.machine().book.offer.price_gpu - want) < 0.006
    status = rig.daemon.scheduler.pricing.status()  # type: ignore[union-attr]
    assert status.read_error is not None and status.peers == 12


async def test_the_paper_market_lists_at_the_percentile_of_its_competing_offers(
    make_rig: RigFactory,
) -> None:
    provider = {"price_gpu": "market", "competitors": 12, "pricing": {"percentile": 0.25}}
    rig = await make_rig(paper=True, provider=provider)
    await rig.until_state(PoolState.LISTED, limit=900)
    rivals = CompetingMarket(0.20, 12, 0.25, seed=0).all_prices(0)
    paper = rig.daemon.scheduler.provider
    assert isinstance(paper, PaperMarket)
    offer = paper.book.offer
    assert offer.price_gpu == pytest.approx(percentile(rivals, 0.25), abs=0.0051)
    status = rig.daemon.scheduler.pricing
    assert status is not None and status.status().peers == 12
