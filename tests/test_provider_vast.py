"""The Vast.ai adapter against a fake Vast.ai that follows the platform's rules."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fakes.vast import FakeVast, RentRefused, drive

from broker.clock import FakeClock
from broker.config import VastProvider
from broker.errors import (
    ProviderAuthError,
    ProviderRejected,
    ProviderStateMismatch,
    ProviderUnavailable,
)
from broker.providers import Offer, auto_min_bid
from broker.providers.vast import VastMarket

KEY = "sekrit-key-123"
H = timedelta(hours=1)


def vast_config(fake: FakeVast, **overrides: Any) -> VastProvider:
    data: dict[str, Any] = {
        "kind": "vast",
        "machine_id": 4242,
        "price_gpu": 0.3,
        "base_url": fake.url,
        "request_spacing": "0s",
        "request_timeout": "2s",
        "docker_socket": None,
    }
    return VastProvider.model_validate(data | overrides)


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


def offer(end: datetime | None, price: float = 0.3, **kw: Any) -> Offer:
    return Offer(price_gpu=price, end_date=end, **kw)


# -- listing and reading back ---------------------------------------------------------


async def test_list_sends_the_full_offer_and_reads_it_back(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    end = clock.now() + 2 * H
    result = await vast.list(offer(end, min_bid=0.12, min_chunk=2, price_disk=0.1))
    assert result.extended == 0
    put = fake.calls(method="PUT")[0]
    assert put.path == "/api/v0/machines/create_asks/"
    assert put.authorization == f"Bearer {KEY}"
    assert put.content_type == "application/json"
    assert put.body == {
        "machine": 4242, "price_gpu": 0.3, "price_disk": 0.1, "price_inetu": None,
        "price_inetd": None, "price_min_bid": 0.12, "min_chunk": 2,
        "end_date": end.timestamp(), "credit_discount_max": None, "duration": None,
        "vol_size": None, "vol_price": None,
    }  # fmt: skip
    # The write was confirmed by reading the machine back.
    assert fake.requests[-1].method == "GET"
    assert fake.requests[-1].path == "/api/v0/machines/4242"
    assert fake.requests[-1].query == "owner=me"

    status = await vast.status()
    assert status.listed is True
    assert status.offer_end == end
    assert status.price_gpu == 0.3 and status.min_bid == 0.12
    assert status.rentals.total == 0 and not status.rented
    assert status.gpu_occupancy == ("free",) * 4
    assert status.locked_until is None
    assert status.online is True


async def test_unlist_sends_an_empty_json_body_and_confirms(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await vast.list(offer(clock.now() + H))
    await vast.unlist()
    delete = fake.calls(method="DELETE")[0]
    assert delete.path == "/api/v0/machines/4242/asks/"
    assert delete.raw_body == b"{}"
    assert (await vast.status()).listed is False


async def test_the_offer_lapses_at_its_end_date(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await vast.list(offer(clock.now() + H))
    await clock.advance(2 * H)
    status = await vast.status()
    assert status.listed is False and status.offer_end is None


# -- the platform's contract rules, as the adapter reports them ------------------------


async def test_a_rental_keeps_its_end_date_through_repricing_and_unlisting(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    first_end = clock.now() + 2 * H
    await vast.list(offer(first_end))
    fake.add_rental("on-demand", 2)
    # Moving the end date earlier (and repricing) shortens nothing.
    assert (await vast.list(offer(clock.now() + H, price=0.5))).extended == 0
    await vast.unlist()
    status = await vast.status()
    assert status.listed is False
    assert status.rentals.on_demand == 1 and status.rentals.total == 1
    assert status.gpu_occupancy == ("on-demand", "on-demand", "free", "free")
    assert status.locked_until == first_end
    with pytest.raises(RentRefused):
        fake.add_rental("on-demand", 1)  # unlisted: no new renters
    await clock.advance(2 * H)
    status = await vast.status()
    assert status.rentals.total == 0 and status.locked_until is None


async def test_a_later_end_date_extends_running_contracts(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await vast.list(offer(clock.now() + H))
    fake.add_rental("on-demand", 1)
    fake.add_rental("on-demand", 1)
    later = clock.now() + 3 * H
    # A higher price does not carry the renters along ...
    assert (await vast.list(offer(later, price=0.4))).extended == 0
    assert (await vast.status()).locked_until == clock.now() + H
    # ... the same price does.
    assert (await vast.list(offer(later, price=0.3))).extended == 2
    assert (await vast.status()).locked_until == later


async def test_on_demand_displaces_interruptible_which_resume_after(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await vast.list(offer(clock.now() + 4 * H, min_bid=0.1))
    with pytest.raises(RentRefused):
        fake.add_rental("interruptible", 2, bid=0.05)  # under the floor
    fake.add_rental("interruptible", 4, bid=0.15)
    status = await vast.status()
    assert status.rentals.only_interruptible
    assert status.gpu_occupancy == ("interruptible",) * 4
    on_demand = fake.add_rental("on-demand", 2)
    status = await vast.status()
    assert status.rentals.on_demand == 1 and status.rentals.interruptible == 0
    assert status.gpu_occupancy == ("on-demand", "on-demand", "free", "free")
    fake.end_rental(on_demand.id)
    status = await vast.status()
    assert status.rentals.only_interruptible


async def test_reserved_rentals_are_told_apart(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await vast.list(offer(clock.now() + H))
    fake.add_rental("reserved", 1)
    fake.add_rental("interruptible", 1, bid=0.2)
    rentals = (await vast.status()).rentals
    assert (rentals.reserved, rentals.on_demand, rentals.interruptible) == (1, 0, 1)


async def test_an_offline_machine_is_reported(vast: VastMarket, fake: FakeVast) -> None:
    fake.set_online(False)
    assert (await vast.status()).online is False


async def test_earnings_per_day_across_midnight(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    clock.set_wall(datetime(2026, 11, 25, 22, 0, tzinfo=UTC))
    await vast.list(offer(clock.now() + 4 * H))
    fake.add_rental("on-demand", 2)
    await clock.advance(6 * H)  # the contract ends with the offer, at 02:00
    records = await vast.earnings(date(2026, 11, 25), date(2026, 11, 26))
    assert [r.day for r in records] == [date(2026, 11, 25), date(2026, 11, 26)]
    assert [r.amount for r in records] == pytest.approx([1.2, 1.2])
    assert {(r.provider, r.machine_id, r.currency, r.source) for r in records} == {
        ("vast", "4242", "USD", "provider")
    }
    assert records[0].detail["gpu_earn"] == pytest.approx(1.2)
    call = fake.calls(path="/api/v0/users/me/machine-earnings")[0]
    day = (date(2026, 11, 25) - date(1970, 1, 1)).days
    assert call.query == f"owner=me&sday={day}.0&eday={day + 2}.0&machid=4242"
    # A day outside the range is not reported, even though the platform returns it.
    assert [r.day for r in await vast.earnings(date(2026, 11, 26), date(2026, 11, 26))] == [
        date(2026, 11, 26)
    ]


# -- faults -------------------------------------------------------------------------------


async def test_a_429_burst_is_waited_out_on_the_clock(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.fail(429, times=3)
    start = clock.monotonic()
    status = await drive(clock, vast.status())
    assert status.listed is False
    assert len(fake.requests) == 4
    # Exponential backoff: at least 1 + 2 + 4 seconds, in virtual time only.
    assert clock.monotonic() - start >= 7


async def test_a_500_then_success(vast: VastMarket, fake: FakeVast, clock: FakeClock) -> None:
    fake.fail(500)
    await drive(clock, vast.list(offer(clock.now() + H)))
    assert [r.method for r in fake.requests[:2]] == ["PUT", "PUT"]
    assert (await vast.status()).listed is True


async def test_a_timeout_is_retried(fake: FakeVast, clock: FakeClock) -> None:
    fake.slow(1.0)
    config = vast_config(fake, request_timeout="100ms")
    async with VastMarket(config, clock, api_key=KEY) as vast:
        assert (await drive(clock, vast.status())).listed is False
    assert len(fake.requests) == 2


async def test_a_timeout_that_persists_is_reported(fake: FakeVast, clock: FakeClock) -> None:
    fake.slow(1.0, times=2)
    config = vast_config(fake, request_timeout="100ms", retry_attempts=2)
    async with VastMarket(config, clock, api_key=KEY) as vast:
        with pytest.raises(ProviderUnavailable, match="timed out"):
            await drive(clock, vast.status())


async def test_garbage_json_is_retried_then_reported(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.garbage()
    assert (await drive(clock, vast.status())).listed is False
    fake.garbage(times=5)
    with pytest.raises(ProviderUnavailable, match="not JSON"):
        await drive(clock, vast.status())


async def test_a_connection_refused_is_temporary(clock: FakeClock) -> None:
    server = FakeVast(clock)
    await server.start()
    await server.close()  # nothing listens there any more
    config = vast_config(server, retry_attempts=2)
    async with VastMarket(config, clock, api_key=KEY) as vast:
        with pytest.raises(ProviderUnavailable, match="failed"):
            await drive(clock, vast.status())


async def test_401_names_the_key_variable_never_the_key(
    fake: FakeVast, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.api_keys = {"another-key"}
    async with VastMarket(vast_config(fake), clock, api_key=KEY) as vast:
        with pytest.raises(ProviderAuthError) as caught:
            await vast.status()
    message = str(caught.value)
    assert "VAST_API_KEY" in message and "provider.api_key_env" in message
    assert "Invalid user key" in message
    assert KEY not in message and KEY not in caplog.text
    assert len(fake.requests) == 1  # never retried


async def test_401_names_the_key_file(fake: FakeVast, clock: FakeClock, tmp_path: Path) -> None:
    key_file = tmp_path / "vast-key"
    key_file.write_text("wrong-key\n")
    config = vast_config(fake, api_key_file=str(key_file))
    async with VastMarket(config, clock) as vast:
        with pytest.raises(ProviderAuthError, match=f"the file {key_file}"):
            await vast.status()


async def test_the_key_comes_from_the_environment(
    fake: FakeVast, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_VAST_KEY", KEY)
    async with VastMarket(vast_config(fake, api_key_env="MY_VAST_KEY"), clock) as vast:
        assert (await vast.status()).listed is False
    assert KEY not in repr(vast._api)


async def test_another_4xx_is_not_retried_and_carries_the_platform_message(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.fail(400, body='{"success": false, "error": "invalid_args", "msg": "price too high"}')
    with pytest.raises(ProviderRejected, match=r"rejected PUT .*\(400\): price too high"):
        await vast.list(offer(clock.now() + H))
    assert len(fake.requests) == 1


async def test_a_success_false_answer_is_a_rejection(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.fail(200, body='{"success": false, "msg": "machine is being verified"}')
    with pytest.raises(ProviderRejected, match="machine is being verified"):
        await vast.list(offer(clock.now() + H))


async def test_a_write_the_read_back_contradicts(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.drop_writes()
    with pytest.raises(ProviderStateMismatch, match="listed is False, not True"):
        await vast.list(offer(clock.now() + H))
    await vast.list(offer(clock.now() + H))
    fake.drop_writes()
    with pytest.raises(ProviderStateMismatch, match=r"unlist .* listed is True"):
        await vast.unlist()


async def test_a_changed_price_in_the_read_back_is_a_mismatch(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    await vast.list(offer(clock.now() + H, price=0.3))
    fake.drop_writes()
    with pytest.raises(ProviderStateMismatch, match=r"listed_gpu_cost is 0\.3, not 0\.5"):
        await vast.list(offer(clock.now() + H, price=0.5))


async def test_calls_are_spaced_per_endpoint(fake: FakeVast, clock: FakeClock) -> None:
    fake.rate_limit("/api/v0/machines/4242", 3.0)
    async with VastMarket(vast_config(fake, request_spacing="3s"), clock, api_key=KEY) as vast:
        start = clock.monotonic()
        for _ in range(3):
            await drive(clock, vast.status())
        # Another endpoint is not held back by this one's spacing.
        await vast.machines()
    assert clock.monotonic() - start == pytest.approx(6.0)
    assert len(fake.requests) == 4  # no 429 was provoked, so nothing was retried


async def test_without_spacing_the_rate_limit_is_met_with_backoff(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.rate_limit("/api/v0/machines/4242", 3.0)
    await vast.status()
    assert (await drive(clock, vast.status())).listed is False
    assert len(fake.requests) >= 3


# -- offers and check ------------------------------------------------------------------


def test_auto_min_bid_is_the_power_cost_with_a_margin(fake: FakeVast, clock: FakeClock) -> None:
    # 350 W x 0.30 EUR/kWh x 1.10 USD/EUR x 1.25 = 0.144375 USD/h, rounded up.
    assert auto_min_bid(350, 0.30, 0.25, 1.10) == 0.145
    assert auto_min_bid(0, 0.30, 0.25) == 0.0
    config = vast_config(fake, usd_per_currency=1.10, min_bid_margin=0.25)
    vast = VastMarket(config, clock, api_key=KEY)
    end = clock.now() + H
    made = vast.make_offer(end, load_watts_per_gpu=350, price_per_kwh=0.30)
    assert made == Offer(
        price_gpu=0.3, end_date=end, min_bid=0.145, min_chunk=1, price_disk=0.10
    )
    # Without a measurement the floor is the on-demand price: never under the power bill.
    assert vast.make_offer(end).min_bid == 0.3
    fixed = VastMarket(vast_config(fake, min_bid=0.2), clock, api_key=KEY)
    assert fixed.make_offer(end, load_watts_per_gpu=350, price_per_kwh=0.3).min_bid == 0.2


async def test_probe_finds_the_machine(vast: VastMarket, fake: FakeVast, clock: FakeClock) -> None:
    await vast.list(offer(clock.now() + H))
    lines = await vast.probe()
    assert lines[0] == "API key accepted"
    assert "machine 4242: 4x RTX 3090, online, listed at 0.3 USD/GPU-h" in lines[1]
    assert fake.calls(path="/api/v0/machines")[0].query == "owner=me"


async def test_probe_names_the_machines_the_account_has(fake: FakeVast, clock: FakeClock) -> None:
    async with VastMarket(vast_config(fake, machine_id=7), clock, api_key=KEY) as vast:
        with pytest.raises(ProviderRejected, match=r"machine 7 is not .* \(found: 4242\)"):
            await vast.probe()


# -- the fake's realistic knobs (other tests rely on them) --------------------------------


async def test_a_new_rental_shows_only_after_rental_visible_after(
    vast: VastMarket, fake: FakeVast, clock: FakeClock
) -> None:
    fake.rental_visible_after = 15
    await vast.list(offer(clock.now() + 2 * H))
    fake.add_rental("on-demand", 2)
    status = await vast.status()
    assert not status.rented and status.locked_until is None
    assert status.gpu_occupancy == ("free",) * 4
    await clock.advance(15)
    status = await vast.status()
    assert status.rented and status.rentals.on_demand == 1
    assert status.gpu_occupancy.count("on-demand") == 2


async def test_the_realistic_fake_limits_each_endpoint(clock: FakeClock) -> None:
    fake = FakeVast.realistic(clock, api_keys={KEY}, latency=0.0)
    await fake.start()
    try:
        config = vast_config(fake, retry_attempts=1)  # request_spacing 0: no waiting turns
        async with VastMarket(config, clock, api_key=KEY) as vast:
            await vast.status()
            await vast.machines()  # another endpoint: its own limit
            with pytest.raises(ProviderUnavailable, match=r"429\): Too Many Requests"):
                await vast.status()
            await clock.advance(1.5)  # refused calls do not count: the window has passed
            assert (await vast.status()).listed is False
        assert fake.rate_limited == 1
    finally:
        await fake.close()
