"""The paper market's competing offers and price_gpu = "market" in `simulate`
(broker/simulation/competition.py): who a renter takes, the ask a replay lists at, the
market price series, and `--policy pricing.KEY=VALUE`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_simulate import CONFIG_TOML, START, T0, TIMINGS, config, renter, simulate

from broker.cli import main
from broker.pricing.settings import PricingSection
from broker.simulation.competition import CompetingMarket, read_price_series
from broker.simulation.inputs import InputError, Renter
from broker.simulation.replay import replay

H = 3600.0


def rival_market(factors: list[float], price: float = 0.2) -> CompetingMarket:
    market = CompetingMarket(price, 0, 0.0)
    market._factors = factors
    market._busy_until = [0.0] * len(factors)
    return market


def test_a_renter_takes_the_cheapest_offer_it_can_afford() -> None:
    market = rival_market([1.0, 0.8, 1.5])  # 0.20, 0.16, 0.30
    first = Renter(T0, 2, 2.0, "on-demand", 0.25, 0)
    assert market.arrive(first, 0.18) is False  # the 0.16 competitor is cheaper
    assert market.free_prices(T0 + 1) == pytest.approx([0.2, 0.3])
    assert market.arrive(Renter(T0 + 1, 2, 1.0, "on-demand", 0.25, 0), 0.18) is True
    assert market.arrive(Renter(T0 + 2, 2, 1.0, "on-demand", 0.25, 0), 0.2) is True  # a tie
    assert market.arrive(Renter(T0 + 3, 2, 1.0, "on-demand", 0.19, 0), None) is False
    assert market.free_prices(T0 + 4) == pytest.approx([0.2, 0.3])  # 0.20 > 0.19: none taken
    assert market.arrive(Renter(T0 + 5, 2, 1.0, "on-demand", 0.22, 0), 0.3) is False
    assert market.free_prices(T0 + 6) == pytest.approx([0.3])
    assert market.free_prices(T0 + 2 * H) == pytest.approx([0.2, 0.16, 0.3])
    assert market.arrive(Renter(T0 + 7, 2, 1.0, "interruptible", 0.1, 0), 0.3) is True


def test_each_competitor_brings_a_renter_stream_like_ours() -> None:
    market = CompetingMarket(0.2, 3, 0.25, seed=1)
    mine = [renter(h, 1, 0) for h in (1, 2, 3)]
    everyone = market.market_renters(mine, T0, T0 + 10 * H)
    assert len(everyone) == 12
    assert all(T0 <= r.at < T0 + 10 * H for r in everyone)
    assert [r.at for r in everyone] == sorted(r.at for r in everyone)


def test_a_price_series_moves_the_market(tmp_path: Path) -> None:
    series = tmp_path / "prices.csv"
    series.write_text(
        "timestamp,price_median\n2026-11-02T12:00:00Z,0.20\n2026-11-02T18:00:00+00:00,0.40\n"
    )
    rows = read_price_series(series)
    market = CompetingMarket(0.1, 2, 0.0, series=rows)
    assert market.market_price(T0 - 1) == 0.20  # before the first row: the first
    assert market.market_price(T0 + 5 * H) == 0.20
    assert market.market_price(T0 + 6 * H) == 0.40
    assert market.free_prices(T0 + 7 * H) == pytest.approx([0.4, 0.4])
    for text, problem in [
        ("timestamp,price\n2026-11-02T12:00:00Z,0.2\n", "expected timestamp,price_median"),
        ("timestamp,price_median\n2026-11-02T12:00:00,0.2\n", "with its offset"),
        ("timestamp,price_median\n2026-11-02T12:00:00Z,0\n", "above 0"),
        ("timestamp,price_median\n", "no prices"),
    ]:
        series.write_text(text)
        with pytest.raises(InputError, match=problem):
            read_price_series(series)


def test_the_replay_lists_at_the_market_ask_and_not_below_the_floor() -> None:
    cfg = config()
    renters = [Renter(T0 + 3 * H, 2, 1.0, "on-demand", 1.0, 0)]
    ask = PricingSection(percentile=0.5, floor=0.01, min_peers=2)
    rivals = rival_market([0.9, 1.0, 1.1, 1.2, 1.3])  # 0.18 .. 0.26
    sim = replay(
        cfg, cfg.policy, [], renters, START, START + timedelta(hours=6), timings=TIMINGS,
        competition=rivals, pricing=ask,
    )  # fmt: skip
    assert sim.machine.price_gpu == 0.22  # the median of the five
    assert sim.totals.rentals == 0  # the renters took the cheaper competitors
    cheapest = replay(
        cfg, cfg.policy, [], renters, START, START + timedelta(hours=6), timings=TIMINGS,
        competition=rival_market([0.9, 1.0, 1.1, 1.2, 1.3]),
        pricing=PricingSection(percentile=0.0, floor=0.01, min_peers=2),
    )  # fmt: skip
    assert cheapest.machine.price_gpu == 0.18 and cheapest.totals.rentals >= 1
    high = PricingSection(percentile=0.5, floor=0.3, min_peers=2)
    blocked = replay(
        cfg, cfg.policy, [], renters, START, START + timedelta(hours=6), timings=TIMINGS,
        competition=rival_market([0.9, 1.0, 1.1, 1.2, 1.3]), pricing=high,
    )  # fmt: skip
    assert blocked.totals.listings == 0 and blocked.pm.state.value == "LOCAL"
    assert blocked.market_ask is not None
    reason = blocked.pm.step(blocked._observe(T0 + 5 * H)).reason
    assert reason == "local: market median 0.22 below your power cost 0.30 per GPU-hour"


def test_simulate_prints_a_row_per_percentile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG_TOML.format(state=tmp_path / "state") + "competitors = 8\n")
    demand = tmp_path / "demand.csv"
    demand.write_text("timestamp,duration_s,service\n2026-11-02T12:00:00Z,5,ollama\n")
    market = tmp_path / "market.csv"
    start = datetime(2026, 11, 2, 13, tzinfo=UTC)
    market.write_text(
        "timestamp,gpus,hours,kind,max_price,min_offer_hours\n"
        + "".join(
            f"{(start + timedelta(minutes=20 * k)).isoformat()},2,1,on-demand,0.9,0\n"
            for k in range(60)
        )
    )
    files = {"config": cfg, "demand": demand, "market": market}
    args = simulate(files, "--format", "json", "--until", "2026-11-03T12:00:00Z")
    for q in ("0.1", "0.9"):
        args += ["--policy", f"pricing.percentile={q}"]
    assert main(args) == 0
    rows = {r["policy"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"configured", "pricing.percentile=0.1", "pricing.percentile=0.9",
                         "oracle"}  # fmt: skip
    low, high = rows["pricing.percentile=0.1"], rows["pricing.percentile=0.9"]
    assert low["rented_gpu_hours"] > high["rented_gpu_hours"]
    assert low["net"] != high["net"]


def test_a_bad_pricing_variant_names_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG_TOML.format(state=tmp_path / "state"))
    demand = tmp_path / "demand.csv"
    demand.write_text("timestamp,duration_s,service\n2026-11-02T12:00:00Z,5,ollama\n")
    files = {"config": cfg, "demand": demand, "market": demand}
    assert main(simulate(files, "--policy", "pricing.percentile=2")) == 2
    err = capsys.readouterr().err
    assert "provider.pricing.percentile: input should be less than or equal to 1" in err
