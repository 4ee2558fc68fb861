"""Eco in the running broker: `GET /api/eco` (the dashboard's cards) and the `/metrics`
gauges, on fake cards in virtual time."""

from __future__ import annotations

from typing import Any

import aiohttp
from fakes.rig import Rig, RigFactory
from test_metrics import scrape, value

CARDS = [
    {"uuid": "GPU-rig-0", "idle_watts": 35, "idle_pstate": 2, "persistence_mode": False},
    {"uuid": "GPU-rig-1", "idle_watts": 12},
]


async def get_eco(rig: Rig, query: str = "") -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(rig.api_url + "/api/eco" + query) as response,
    ):
        return response.status, await response.json()


async def test_eco_route_judges_the_cards_on_this_runs_idle_samples(make_rig: RigFactory) -> None:
    rig = await make_rig(gpus={"fake": CARDS})
    await rig.run_for(20 * 60, step=10)  # past a 15-minute slot: some written, some not yet
    status, got = await get_eco(rig)
    assert status == 200
    bad, good = got["gpus"]
    assert bad["judged_on"] == "history" and bad["history"]["idle_watts"] == 35
    assert [f["kind"] for f in bad["flags"]] == ["idle_draw", "pstate", "persistence"]
    assert bad["flags"][0]["yearly_cost"] == 35.04  # 175.2 kWh a year at the rig's 0.20/kWh
    assert good["flags"] == [] and good["history"]["idle_pstate"] == 8
    assert got["profile"] == {"enabled": False, "situation": None, "refused": None}
    assert got["currency"] == "USD"
    # Every idle sample once: the ledger's slots and the one still open add up.
    assert bad["history"]["idle_samples"] == good["history"]["idle_samples"] >= 1190

    status, _ = await get_eco(rig, "?days=0")
    assert status == 400


async def test_metrics_show_pstate_power_limit_and_idle_draw(make_rig: RigFactory) -> None:
    rig = await make_rig(gpus={"fake": CARDS})
    await rig.run_for(60, step=10)
    samples, text = await scrape(rig)
    for name in ("gpu_broker_gpu_pstate", "gpu_broker_gpu_power_limit_watts",
                 "gpu_broker_gpu_idle_watts"):  # fmt: skip
        assert f"# TYPE {name} gauge" in text
    assert value(samples, "gpu_broker_gpu_pstate", gpu="0", uuid="GPU-rig-0") == 2
    assert value(samples, "gpu_broker_gpu_pstate", gpu="1", uuid="GPU-rig-1") == 8
    assert value(samples, "gpu_broker_gpu_power_limit_watts", gpu="0", uuid="GPU-rig-0") == 350
    assert value(samples, "gpu_broker_gpu_idle_watts", gpu="0", uuid="GPU-rig-0") == 35
    assert value(samples, "gpu_broker_gpu_idle_watts", gpu="1", uuid="GPU-rig-1") == 12
