"""The ask as pure functions (broker/pricing/ask.py): tables, no I/O, no clock."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from broker.cli import main
from broker.clock import FakeClock
from broker.errors import ProviderRejected
from broker.pricing.ask import (
    Market,
    auto_floor,
    cents,
    cents_up,
    decayed,
    market_median,
    next_ask,
    percentile,
    rank,
    target,
)
from broker.pricing.settings import PricingSection
from broker.providers.vast import VastMarket, VastProvider

PEERS = (0.24, 0.256, 0.28, 0.288, 0.304, 0.32, 0.328, 0.36, 0.384, 0.4, 0.44, 0.48)


def settings(**kw: object) -> PricingSection:
    return PricingSection.model_validate(kw)


@pytest.mark.parametrize(
    ("price", "rounded", "up"),
    [
        (0.125, 0.13, 0.13),
        (0.1249, 0.12, 0.13),
        (0.12, 0.12, 0.12),
        (0.3 + 1e-12, 0.3, 0.3),  # float noise is no extra cent
        (0.3 - 1e-12, 0.3, 0.3),
        (0.001, 0.0, 0.01),
        (1.005, 1.01, 1.01),
    ],
)
def test_cents(price: float, rounded: float, up: float) -> None:
    assert cents(price) == rounded
    assert cents_up(price) == up


@pytest.mark.parametrize(
    ("values", "q", "want"),
    [
        ([5.0], 0.35, 5.0),
        ([1.0, 2.0], 0.0, 1.0),
        ([1.0, 2.0], 1.0, 2.0),
        ([2.0, 1.0], 0.5, 1.5),
        ([1.0, 2.0, 4.0], 0.75, 3.0),
        ([4.0, 1.0, 2.0, 3.0], 0.35, 2.05),
        ([1.0, 3.0, 2.0, 10.0, 4.0], 0.9, 7.6),
    ],
)
def test_percentile_interpolates_between_ranks(values: list[float], q: float, want: float) -> None:
    assert percentile(values, q) == pytest.approx(want)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_auto_floor_is_power_under_load_with_the_overhead_share_and_margin() -> None:
    # (300 W + 60 W / 2) = 330 W -> 0.33 kWh x 0.30 x 1.25 = 0.12375 -> 0.13 (up).
    assert auto_floor(300, 60, 2, 0.30, 0.25) == 0.13
    assert auto_floor(300, 60, 2, 0.30, 0.25, usd_per_currency=2.0) == 0.25  # 0.2475 up
    assert auto_floor(400, 0, 1, 0.25, 0.0) == 0.10
    assert auto_floor(400, 100, 0, 0.25, 0.0) == 0.13  # no GPU count: the whole overhead
    assert auto_floor(0, 0, 1, 0.30, 0.25) == 0.0
    assert auto_floor(1000.5, 0, 1, 0.1, 0.0) == 0.11  # 0.10005: a started cent counts


def test_target_is_the_percentile_clamped_and_in_cents() -> None:
    got = target(Market(PEERS, truncated=False), settings(percentile=0.35), floor=0.1)
    assert got.price == 0.30  # rank 3.85 of 0..11: 0.288 + 0.85 x 0.016 = 0.3016
    assert got.below_floor is False
    assert got.median == pytest.approx(0.324)
    assert got.reason == "35% of 12 comparable offers"
    high = target(Market(PEERS, False), settings(percentile=0.9, ceiling=0.4), floor=0.1)
    assert high.price == 0.4
    low = target(Market(PEERS, False), settings(percentile=0.0), floor=0.251)
    assert low.price == 0.26  # the floor, rounded up: never below cost
    assert target(Market(PEERS, False), settings(percentile=1.0), floor=0.0).price == 0.48


def test_the_population_median_decides_below_floor_when_known() -> None:
    market = Market(PEERS, truncated=False, median=0.2)
    got = target(market, settings(), floor=0.21)
    assert got.price is None and got.below_floor and got.median == 0.2
    assert got.reason == "market median 0.20 below your power cost 0.21 per GPU-hour"
    at_floor = target(market, settings(percentile=0.0), floor=0.2)
    assert not at_floor.below_floor and at_floor.price == 0.24
    peers_only = target(Market(PEERS, False), settings(), floor=0.33)
    assert peers_only.below_floor and peers_only.median == pytest.approx(0.324)


def test_market_median_of_a_read_without_peers() -> None:
    assert market_median(Market((), truncated=False)) is None  # nothing to tell
    assert market_median(Market((), truncated=False, median=0.3)) == 0.3  # the metrics'
    assert market_median(Market(PEERS, truncated=False)) == pytest.approx(0.324)


def test_no_target_from_a_truncated_search_or_too_few_peers() -> None:
    truncated = target(Market(PEERS, truncated=True), settings(), floor=0.0)
    assert truncated.price is None and truncated.below_floor is False
    assert truncated.reason.startswith("the search came back truncated (12 offers")
    few = target(Market(PEERS[:4], False), settings(min_peers=5), floor=0.0)
    assert few.price is None and few.below_floor is False
    assert few.reason == "only 4 comparable offer(s) (min_peers 5): the last ask is kept"
    enough = target(Market(PEERS[:5], False), settings(min_peers=5), floor=9.0)
    assert enough.below_floor  # five are enough to judge


DECAY = {"decay": 0.02, "decay_after": "1h", "refresh": "30m"}


@pytest.mark.parametrize(
    ("unrented_s", "want"),
    [
        (0, 0.40),
        (3600, 0.40),  # not yet longer than decay_after
        (3601, 0.38),  # the first step
        (3600 + 1799, 0.38),
        (3600 + 1800, 0.36),
        (3600 + 5400, 0.32),
        (3600 + 36000, 0.25),  # never below the floor (0.245 rounded up)
    ],
)
def test_decay_steps_down_to_the_floor(unrented_s: float, want: float) -> None:
    assert decayed(0.40, 0.245, settings(**DECAY), unrented_s) == want


def test_no_decay_by_default_and_never_a_raise_to_the_floor() -> None:
    assert decayed(0.40, 0.1, settings(), 10 * 86400) == 0.40
    assert decayed(0.20, 0.3, settings(**DECAY), 86400) == 0.20


S = settings(min_change=0.01, refresh="30m")


@pytest.mark.parametrize(
    ("current", "wanted", "rented", "since", "want"),
    [
        (None, None, False, None, None),
        (None, 0.3, False, None, 0.3),  # the first ask
        (None, 0.3, True, 0.0, 0.3),
        (0.3, None, False, None, 0.3),  # nothing new: keep
        (0.3, 0.4, True, 9999.0, 0.3),  # a renter runs: never
        (0.3, 0.4, False, 1799.0, 0.3),  # not once per refresh yet
        (0.3, 0.4, False, 1800.0, 0.4),
        (0.3, 0.4, False, None, 0.4),
        (0.3, 0.305, False, None, 0.3),  # less than min_change
        (0.3, 0.31, False, None, 0.31),  # exactly min_change
        (0.3, 0.29, False, None, 0.29),  # down as well as up
        (0.3, 0.295, False, None, 0.3),
    ],
)
def test_next_ask(
    current: float | None,
    wanted: float | None,
    rented: bool,
    since: float | None,
    want: float | None,
) -> None:
    got = next_ask(current, wanted, rented=rented, since_change_s=since, settings=S)
    assert got == want


def test_rank_counts_cheaper_peers() -> None:
    assert rank(0.2, PEERS) == 1
    assert rank(0.24, PEERS) == 1
    assert rank(0.25, PEERS) == 2
    assert rank(0.5, PEERS) == 13


@pytest.mark.parametrize(
    ("pricing", "problem"),
    [
        ({"percentile": 1.5}, "less than or equal to 1"),
        ({"floor": -0.1}, 'expected "auto" or a price'),
        ({"floor": "cheap"}, "auto"),
        ({"floor": 0.3, "ceiling": 0.2}, "ceiling 0.2 is below floor 0.3"),
        ({"refresh": "0s"}, "longer than zero"),
        ({"refresh": "soon"}, "duration"),
        ({"min_peers": 0}, "greater than or equal to 1"),
        ({"decay_after": "-1h"}, "duration"),
        ({"min_change": -1}, "greater than or equal to 0"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_bad_settings_are_refused(pricing: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        PricingSection.model_validate(pricing)


def test_any_duration_is_a_refresh() -> None:
    assert settings(refresh="5s").refresh == timedelta(seconds=5)
    assert settings(refresh="1h30m").refresh == timedelta(minutes=90)


def test_bad_pricing_keys_stop_check_with_exit_2_and_their_key_paths(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path}"\n'
        '[provider]\nkind = "vast"\nmachine_id = 1\nprice_gpu = "markt"\n'
        '[provider.pricing]\npercentile = 35\nrefresh = "soon"\nfloor = "cheap"\n'
    )
    assert main(["check", "-c", str(config)], clock=FakeClock()) == 2
    err = capsys.readouterr().err
    assert "provider.price_gpu: expected \"market\" or a price above 0, got 'markt'" in err
    assert "provider.pricing.percentile: input should be less than or equal to 1" in err
    assert 'provider.pricing.refresh: expected a duration like "15m", got "soon"' in err
    assert 'provider.pricing.floor: expected "auto" or a price of at least 0' in err


def test_a_fixed_price_is_listed_as_before_and_market_without_an_ask_is_refused() -> None:
    fixed = VastProvider.model_validate({"kind": "vast", "machine_id": 1, "price_gpu": 0.3})
    assert not fixed.market_priced and fixed.estimate_price_gpu() == 0.3
    market = VastProvider.model_validate({"kind": "vast", "machine_id": 1, "price_gpu": "market"})
    assert market.market_priced and market.estimate_price_gpu() is None
    assert market.pricing == PricingSection()
    vast = VastMarket(market, FakeClock(), api_key="k")  # not started: no call is made
    offer = vast.make_offer(None, load_watts_per_gpu=300, price_per_kwh=0.3, ask=0.27)
    assert offer.price_gpu == 0.27 and offer.min_bid == 0.113  # min_bid "auto" as before
    with pytest.raises(ProviderRejected, match="no market ask yet"):
        vast.make_offer(None)
