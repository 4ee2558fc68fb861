"""The dashboard's eco cards in headless Chromium: one card per GPU, its idle draw and flags
as `GET /api/eco` serves them (the Chromium harness is test_dashboard_chromium.py's)."""

from __future__ import annotations

import json

import aiohttp
from fakes.rig import Rig, RigFactory
from test_dashboard_chromium import (
    browser,  # noqa: F401 - the fixture
    open_page,
)

CARDS = [
    {"uuid": "GPU-rig-0", "idle_watts": 35, "idle_pstate": 2, "persistence_mode": False},
    {"uuid": "GPU-rig-1", "idle_watts": 12},
]

DRAWN = """JSON.stringify([...document.querySelectorAll('#eco-cards .eco-card')].map((c) => ({
  index: c.dataset.index,
  title: c.querySelector('h3').textContent,
  watts: c.querySelector('.eco-watts').textContent,
  flags: [...c.querySelectorAll('li')].map((li) => li.textContent),
  ok: c.querySelector('.eco-ok') !== null,
})))"""


async def test_a_card_per_gpu_with_its_idle_draw_and_flags(
    browser: tuple[aiohttp.ClientSession, str],  # noqa: F811
    make_rig: RigFactory,
) -> None:
    rig: Rig = await make_rig(gpus={"fake": CARDS})
    await rig.run_for(120, step=10)
    session, page_ws = browser
    eco_ready = "document.body !== null && document.body.dataset.ecoReady === '1'"
    async with open_page(session, page_ws, rig.api_url + "/", eco_ready) as dev:
        drawn = json.loads(await dev.evaluate(DRAWN))
        assert dev.errors() == []
    bad, good = drawn
    assert bad["title"].startswith("GPU 0 · ") and bad["watts"] == "35 W idle"
    assert len(bad["flags"]) == 3 and not bad["ok"]
    assert "35.04 USD/year" in bad["flags"][0] and "P2 while idle" in bad["flags"][1]
    assert good["watts"] == "12 W idle" and good["flags"] == [] and good["ok"]
