"""Eco flags on fake cards: the fake backend models the eco fields, the advice judges them."""

from __future__ import annotations

from typing import Any

import pytest

from broker.clock import FakeClock
from broker.config import FakeGpu
from broker.eco.advice import flags
from broker.gpu import FakeBackend


def gpu(**kw: Any) -> FakeGpu:
    return FakeGpu.model_validate(kw)


async def test_a_misconfigured_card_is_flagged_with_both_causes_and_its_cost() -> None:
    fake = FakeBackend(
        [
            gpu(idle_watts=35, idle_pstate=2, persistence_mode=False, power_limit_w=300,
                max_watts=400, power_default_w=350, power_min_w=100),
            gpu(idle_watts=12),
        ],
        FakeClock(),
    )
    bad_dev, good_dev = await fake.start()
    bad, good = await fake.sample()
    assert (bad.power_w, bad.pstate, bad_dev.persistence_mode) == (35, 2, False)
    assert (bad_dev.power_limit_w, bad_dev.power_default_w, bad_dev.power_min_w) == (300, 350, 100)
    assert (good.pstate, good_dev.persistence_mode) == (8, True)

    got = flags(bad_dev, idle_w=bad.power_w, idle_pstate=bad.pstate,
                tariff_per_kwh=0.30, co2_g_per_kwh=400)
    assert [f.kind for f in got] == ["idle_draw", "pstate", "persistence"]
    # 20 W above target for 8760 h = 175.2 kWh; at 0.30/kWh 52.56; at 400 g/kWh 70.08 kg.
    for f in got:
        assert f.yearly_kwh == pytest.approx(175.2)
        assert f.yearly_cost == pytest.approx(52.56)
        assert f.yearly_co2_kg == pytest.approx(70.08)

    assert flags(good_dev, idle_w=good.power_w, idle_pstate=good.pstate,
                 tariff_per_kwh=0.30, co2_g_per_kwh=400) == []


def test_fake_eco_fields_are_validated() -> None:
    with pytest.raises(ValueError):
        gpu(idle_pstate=16)


def test_eco_command_prints_flags_as_json(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from broker.cli import main

    cfg = tmp_path / "broker.toml"
    cfg.write_text(
        '[gpus]\nbackend = "fake"\nfake = [\n'
        '  { idle_watts = 35, idle_pstate = 2, persistence_mode = false },\n'
        '  { idle_watts = 12 },\n]\n'
        '[energy]\nprice_per_kwh = 0.30\ncarbon_g_per_kwh = 400\n'
    )
    assert main(["eco", "-c", str(cfg), "--json"], clock=FakeClock()) == 0
    got = json.loads(capsys.readouterr().out)
    bad, good = got["gpus"]
    assert (got["idle_target_watts"], got["currency"]) == (15, "EUR")
    assert [f["kind"] for f in bad["flags"]] == ["idle_draw", "pstate", "persistence"]
    assert bad["flags"][0]["yearly_cost"] == 52.56 and bad["flags"][0]["yearly_co2_kg"] == 70.08
    assert (bad["idle_watts"], bad["pstate"], bad["persistence_mode"]) == (35, 2, False)
    assert good["flags"] == []
