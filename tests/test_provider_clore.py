"""The Clore.ai adapter against the fake Clore.ai (tests/fakes/clore.py): the wire, the
codes answered with HTTP 200, the `mrl` bound, status, earnings, and `check`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fakes.clore import KEY, FakeClore
from fakes.vast import ServerThread, drive

from broker.cli import main
from broker.clock import FakeClock, SystemClock
from broker.config import parse_config
from broker.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderStateMismatch,
)
from broker.providers import Offer, create_provider
from broker.providers.clore import CloreMarket

H = timedelta(hours=1)
SETTINGS = "/v1/set_server_settings"
SERVER_CONFIG = "/v1/server_config"


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeClore]:
    server = FakeClore(clock, servers={"rig": 2})
    await server.start()
    yield server
    await server.close()


def market(
    clock: FakeClock,
    fake: FakeClore,
    *,
    commitment: str = "8h",
    min_listed: str = "6h",
    **section: Any,
) -> CloreMarket:
    config = parse_config({
        "provider": {"kind": "clore", "server_name": "rig", "base_url": fake.url,
                     "api_key_env": "TEST_CLORE_KEY", "price_on_demand": 0.0002,
                     "price_spot": 0.0001, "retry_attempts": 3} | section,
        "policy": {"max_commitment": commitment, "min_listed": min_listed},
        "energy": {"currency": "EUR", "price_per_kwh": 0.3},
    })  # fmt: skip
    provider = create_provider(config, clock, gpu_count=2)
    assert isinstance(provider, CloreMarket)
    return provider


@pytest.fixture
async def clore(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[CloreMarket]:
    monkeypatch.setenv("TEST_CLORE_KEY", KEY)
    async with market(clock, fake) as provider:
        yield provider


def offer(clock: FakeClock, left: timedelta) -> Offer:
    return Offer(price_gpu=1.0, end_date=clock.now() + left)


# -- the wire -------------------------------------------------------------------------


async def test_list_sends_the_key_in_auth_and_mrl_in_whole_hours(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    await drive(clock, clore.list(offer(clock, 7 * H + timedelta(minutes=40))))
    write = fake.calls(SETTINGS)[-1]
    assert write.method == "POST" and write.auth == KEY
    assert write.content_type == "application/json"
    assert write.body == {"name": "rig", "availability": True, "mrl": 7,
                          "on_demand": 0.0002, "spot": 0.0001}  # fmt: skip
    # Read back with GET and a JSON body, as Clore's server_config wants it.
    read = fake.calls(SERVER_CONFIG)[-1]
    assert read.method == "GET" and read.body == {"server_name": "rig"}
    assert fake.server().visibility == "public" and fake.server().mrl == 7
    # One request a second per key: the read waited its turn, nothing was refused.
    assert fake.rate_limited == 0


async def test_an_end_a_few_seconds_short_of_the_hour_still_counts_as_the_hour(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    await drive(clock, clore.list(offer(clock, 8 * H - timedelta(seconds=3))))
    assert fake.server().mrl == 8


async def test_an_offer_shorter_than_the_shortest_rental_is_not_sent(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    with pytest.raises(ProviderRejected, match="under Clore's shortest rental"):
        await drive(clock, clore.list(offer(clock, 5 * H)))
    assert fake.requests == []


async def test_a_renewal_too_short_for_clore_hides_the_server(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    # Listed with mrl 8 h; near the window's end a renewal could only offer 5 h. Leaving
    # the 8 h listing up would let an order run 3 h past the window: hide it instead.
    await drive(clock, clore.list(offer(clock, 8 * H)))
    await clock.advance(3 * H)
    with pytest.raises(ProviderRejected, match="hidden instead"):
        await drive(clock, clore.list(offer(clock, 5 * H)))
    assert fake.server().visibility == "hidden"
    assert (await drive(clock, clore.status())).listed is False


async def test_code_5_is_retried_with_backoff_and_never_taken_as_done(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    fake.code(5, times=2, path=SETTINGS)
    start = clock.monotonic()
    await drive(clock, clore.list(offer(clock, 8 * H)))
    assert len(fake.calls(SETTINGS)) == 3  # two answered code 5, then done
    assert clock.monotonic() - start >= 2  # backed off (1..2 s, then more) in between
    assert fake.server().visibility == "public"


async def test_an_error_code_is_not_success(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    fake.code(6, times=10, path=SETTINGS, error="server_is_busy")
    with pytest.raises(ProviderRejected, match="code 6, error: server_is_busy"):
        await drive(clock, clore.list(offer(clock, 8 * H)))
    assert fake.server().visibility == "hidden"
    assert clore.listed_until is None


async def test_a_write_answered_done_but_not_shown_is_a_mismatch(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    fake.code(0, times=1, path=SETTINGS)  # "done", without doing it
    with pytest.raises(ProviderStateMismatch, match="visibility is 'hidden'"):
        await drive(clock, clore.list(offer(clock, 8 * H)))


async def test_a_refused_key_says_where_the_key_came_from(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CLORE_KEY", "wrong")
    async with market(clock, fake) as provider:
        with pytest.raises(ProviderAuthError) as raised:
            await drive(clock, provider.status())
    assert "TEST_CLORE_KEY" in str(raised.value) and "code 3" in str(raised.value)
    assert "wrong" not in str(raised.value)
    assert len(fake.requests) == 1  # a refused key is not retried


async def test_an_urgent_unlist_right_after_a_read_waits_out_the_rate_limit(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    await drive(clock, clore.list(offer(clock, 8 * H)))
    before = clock.monotonic()
    status = await drive(clock, clore.unlist(urgent=True))
    assert status is not None and status.listed is False
    assert fake.rate_limited == 0
    # The write and its read-back: one second apart each, not the background 1.1 s.
    assert clock.monotonic() - before == pytest.approx(2.0)


# -- status ---------------------------------------------------------------------------


async def test_a_hidden_server_keeps_its_order_until_the_order_ends(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    await drive(clock, clore.list(offer(clock, 8 * H)))
    order = fake.rent(hours=7)
    status = await drive(clock, clore.status())
    assert status.rented and status.listed is True
    assert status.gpu_occupancy == ("rented", "rented")
    # remaining_time, rounded up to the second.
    assert status.locked_until is not None
    assert order.end <= status.locked_until < order.end + timedelta(seconds=1)
    hidden = await drive(clock, clore.unlist())
    assert hidden is not None and hidden.listed is False and hidden.rented
    await clock.advance(6 * H)
    assert (await drive(clock, clore.status())).rented
    await clock.advance(H)
    status = await drive(clock, clore.status())
    assert not status.rented and status.locked_until is None


async def test_without_remaining_time_the_end_is_first_seen_plus_mrl(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    fake.show_remaining_time = False
    await drive(clock, clore.list(offer(clock, 8 * H)))
    await clock.advance(timedelta(minutes=10))
    order = fake.rent(hours=8)
    await clock.advance(timedelta(minutes=5))  # seen 5 minutes after it started
    status = await drive(clock, clore.status())
    assert status.locked_until is not None
    assert order.end <= status.locked_until <= order.end + timedelta(minutes=6)


# -- the promise: max_commitment below Clore's shortest rental -------------------------------


async def test_a_commitment_below_the_shortest_rental_never_lists(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CLORE_KEY", KEY)
    async with market(clock, fake, commitment="2h") as provider:
        assert provider.capabilities.can_list is False
        assert "policy.max_commitment (2 h) is shorter than Clore's shortest rental (6 h" in (
            provider.capabilities.note
        )
        with pytest.raises(ProviderRejected):
            provider.make_offer(clock.now() + 2 * H)
        with pytest.raises(ProviderRejected):
            await drive(clock, provider.list(offer(clock, 8 * H)))
        with pytest.raises(ProviderRejected, match="will not list"):
            await drive(clock, provider.probe())
    assert not fake.calls(SETTINGS)


async def test_a_shortest_listing_below_the_shortest_rental_never_lists_either(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scheduler would put up offers of 30 min near a window's end, which Clore cannot
    # take: rather than drain the services for a listing that fails, do not list.
    monkeypatch.setenv("TEST_CLORE_KEY", KEY)
    async with market(clock, fake, min_listed="30m") as provider:
        assert provider.capabilities.can_list is False
        assert provider.capabilities.note.startswith(
            "policy.min_listed (0.5 h) is shorter than Clore's shortest rental (6 h"
        )
    async with market(clock, fake, commitment="1h", min_listed="30m") as provider:
        assert provider.capabilities.note.startswith(
            "policy.max_commitment (1 h) and policy.min_listed (0.5 h) are shorter"
        )


def write_config(tmp_path: Path, url: str, commitment: str, name: str = "rig") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[broker]\nstate_dir = "{tmp_path}"\n'
        f'[policy]\nmax_commitment = "{commitment}"\nmin_listed = "6h"\n'
        f'[provider]\nkind = "clore"\nserver_name = "{name}"\nbase_url = "{url}"\n'
        "price_on_demand = 0.0002\n"
    )
    return path


def test_check_verifies_key_and_server_and_refuses_a_short_commitment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real time: `check` waits Clore's second between its two requests.
    clock = SystemClock()
    fake = FakeClore(clock, servers={"rig": 2})
    monkeypatch.setenv("CLORE_API_KEY", KEY)
    with ServerThread(fake.start, fake.close):
        assert main(["check", "-c", str(write_config(tmp_path, fake.url, "8h"))]) == 0
        out = capsys.readouterr().out
        assert "ok   provider.clore: API key accepted" in out
        assert "ok   provider.clore: server rig: 2 GPU(s), online, hidden, mrl 72 h, " \
               "not rented" in out  # fmt: skip

        assert main(["check", "-c", str(write_config(tmp_path, fake.url, "2h"))]) == 2
        out = capsys.readouterr().out
        assert "FAIL provider.clore: server rig: " in out
        assert "policy.max_commitment (2 h) is shorter than Clore's shortest rental" in out

        assert main(["check", "-c", str(write_config(tmp_path, fake.url, "8h", "gpu1"))]) == 2
        out = capsys.readouterr().out
        assert "FAIL provider.server_name: server 'gpu1' is not among this account's " \
               "servers (found: 'rig')" in out  # fmt: skip

        monkeypatch.setenv("CLORE_API_KEY", "bad-key")
        assert main(["check", "-c", str(write_config(tmp_path, fake.url, "8h"))]) == 2
        out = capsys.readouterr().out
        assert "FAIL provider.clore: Clore.ai refused the API key from the environment " \
               "variable CLORE_API_KEY (provider.api_key_env) (code 3" in out  # fmt: skip
        assert "bad-key" not in out
    assert not fake.calls(SETTINGS), "check changes nothing"


# -- earnings -------------------------------------------------------------------------


async def test_earnings_are_the_wallets_rise_per_day_converted_and_marked_estimates(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CLORE_KEY", KEY)
    fake.coins_per_price_unit = 50_000.0  # CLORE per unit of the price's coin
    async with market(clock, fake, earnings_rate=0.02) as provider:  # EUR per CLORE
        assert await drive(clock, provider.earnings(clock.now().date(), clock.now().date()))
        await drive(clock, provider.list(offer(clock, 24 * H)))
        fake.rent(hours=24)  # from 12:00 on day one, on-demand
        await clock.advance(18 * H)  # 06:00 on day two
        first = clock.now().date() - timedelta(days=1)
        records = await drive(clock, provider.earnings(first, clock.now().date()))
    per_day = 0.0002 * 0.95 * 50_000 * 0.02  # price/day, less the 5 % fee, in CLORE, in EUR
    assert [r.day for r in records] == [first, first + timedelta(days=1)]
    # 12 h on day one, 6 h on day two (shared by time between the two readings).
    assert records[0].amount == pytest.approx(per_day * 12 / 24, rel=1e-3)
    assert records[1].amount == pytest.approx(per_day * 6 / 24, rel=1e-3)
    assert all(r.source == "estimate" and r.currency == "EUR" for r in records)
    assert records[0].detail["derived_from"] == "wallet balance change"


async def test_a_withdrawal_is_not_negative_earnings(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CLORE_KEY", KEY)
    fake.wallets["CLORE-Blockchain"] = 1000.0
    async with market(clock, fake, earnings_rate=0.02) as provider:
        day = clock.now().date()
        await drive(clock, provider.earnings(day, day))
        fake.wallets["CLORE-Blockchain"] = 400.0  # the host withdrew
        await clock.advance(H)
        records = await drive(clock, provider.earnings(day, day))
    assert [(r.day, r.amount) for r in records] == [(day, 0.0)]


async def test_without_a_rate_no_earnings_and_no_request(
    clock: FakeClock, fake: FakeClore, clore: CloreMarket
) -> None:
    day = clock.now().date()
    assert await drive(clock, clore.earnings(day, day)) == []
    assert fake.requests == []


async def test_a_missing_wallet_is_an_error_not_zero(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CLORE_KEY", KEY)
    async with market(clock, fake, earnings_rate=1.0, earnings_wallet="USD-Blockchain") as p:
        day = clock.now().date()
        with pytest.raises(ProviderError, match="earnings_wallet"):
            await drive(clock, p.earnings(day, day))


def test_the_section_refuses_bad_values_with_key_paths() -> None:
    from broker.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config({"provider": {"kind": "clore", "server_name": "", "price_on_demand": 0}})
    problems = " ".join(raised.value.problems)
    assert "provider.server_name" in problems and "provider.price_on_demand" in problems

