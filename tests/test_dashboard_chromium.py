"""The dashboard in a real headless Chromium, driven over the DevTools protocol (a websocket,
through aiohttp: no selenium). A whole broker (the Rig) serves the page with two weeks of
history in its ledger; the page must load with no console error, draw one timeline row per
GPU and one chart group per day the API serves, and follow the broker live.

Skipped when no Chromium is installed (Debian: `apt-get install chromium chromium-driver`;
`.ci/run` installs it where it can). Set GPU_BROKER_DASHBOARD_PNG=docs/dashboard.png to
refresh the screenshot in the docs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.ollama import FakeOllama
from fakes.postgres import PgServer
from fakes.rig import TOKEN, VAST_KEY, Rig, rig_config
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.ledger import open_ledger
from broker.ledger.base import DemandRecord, EarningsRecord, EnergyRecord
from broker.ledger.postgres import PostgresLedger
from broker.providers import RentalKind
from broker.scheduling.pool import PoolState

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB: too small for a renderer
    "--remote-debugging-port=0",
    "--window-size=1280,1000",
)
START_LIMIT = 60.0  # seconds of real time for Chromium to start, on 2 busy cores


def chromium() -> str | None:
    wanted = os.environ.get("GPU_BROKER_CHROMIUM")
    if wanted:
        return wanted
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """A minimal DevTools protocol client: numbered calls, events kept in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            future = self._waiting.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def errors(self) -> list[str]:
        found: list[str] = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url')}")
        return found

    async def aclose(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._ws.close()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A fresh headless Chromium; yields a session and the page target's websocket URL."""
    binary = chromium()
    if binary is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
            ".ci/run installs it when it can)"
        )
    profile = tmp_path / "chromium-profile"
    log_path = tmp_path / "chromium.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdout=log_file, stderr=log_file,
        )  # fmt: skip
    try:
        # Chromium writes the port it chose to DevToolsActivePort in the profile.
        active = profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_LIMIT
        while not (active.exists() and active.read_text().strip()):
            if process.returncode is not None or loop.time() > deadline:
                raise AssertionError(f"Chromium did not start: {log_path.read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        port = int(active.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            yield session, page["webSocketDebuggerUrl"]
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def write_history(rig_state: Path, config: Any, today: date, days: int) -> None:
    """`days` days before `today` of plausible pool and GPU states, energy and earnings."""
    rng = random.Random(7)
    ledger = await open_ledger(config.broker, "rig")
    uuids = ["GPU-rig-0", "GPU-rig-1"]
    try:
        for k in range(days, 0, -1):
            day = today - timedelta(days=k)
            midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
            listed_at = 8 + rng.randint(0, 4)
            rented_at = listed_at + rng.choice((0.5, 1, 2))
            local_at = min(23.0, rented_at + rng.randint(3, 9))
            plan = [
                (0.0, "LOCAL"), (listed_at - 0.1, "IDLE"), (listed_at - 0.05, "DRAINING"),
                (listed_at, "LISTED"), (rented_at, "RENTED"), (local_at, "RECLAIMING"),
                (local_at + 0.02, "LOCAL"),
            ]  # fmt: skip
            both = rng.random() < 0.6  # otherwise the renter holds GPU 0 only
            for n, (hour, state) in enumerate(plan):
                at = midnight + timedelta(hours=hour)
                end = midnight + timedelta(hours=plan[n + 1][0] if n + 1 < len(plan) else 24)
                await ledger.record_state("pool", "machine", state, at, "history")
                for i, uuid in enumerate(uuids):
                    gpu_state = state
                    if state in ("RENTED", "RECLAIMING") and i == 1 and not both:
                        gpu_state = "LISTED" if state == "RENTED" else "IDLE"
                    await ledger.record_state("gpu", uuid, gpu_state, at, state)
                    watts = {"LOCAL": 180.0, "RENTED": 300.0}.get(state, 25.0)
                    seconds = (end - at).total_seconds()
                    await ledger.add_energy(
                        [
                            EnergyRecord(
                                uuid, i, state.lower(), at, end, watts * seconds, 20.0 * seconds
                            )
                        ]
                    )
            if k > 2:  # the provider reports a day late: the last days are estimates
                hours = local_at - rented_at
                amount = round(hours * 0.3 * (2 if both else 1) * rng.uniform(0.8, 1.0), 2)
                await ledger.upsert_earnings(
                    [
                        EarningsRecord(
                            "vast", "4242", day, amount, "USD", "provider",
                            midnight + timedelta(days=1, hours=3),
                        )
                    ]
                )  # fmt: skip
        # The last state stays open: the broker's start closes it, as after a real restart.
    finally:
        await ledger.close()


async def write_demand(config: Any, now: datetime) -> list[datetime]:
    """Local requests on three days of the last weeks, for the heat map; their arrivals."""
    arrivals = [
        (now - timedelta(days=d)).replace(hour=h, minute=20, second=0, microsecond=0)
        for d, h in ((2, 10), (9, 10), (3, 15))
    ]
    ledger = await open_ledger(config.broker, "rig")
    try:
        await ledger.add_demand([DemandRecord("ollama", at, 30.0, "passed") for at in arrivals])
    finally:
        await ledger.close()
    return arrivals


async def wait_for(dev: DevTools, expression: str, limit: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await dev.evaluate(expression):
        if loop.time() > deadline:
            raise AssertionError(f"not true within {limit} s: {expression}; {dev.errors()}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def open_page(
    session: aiohttp.ClientSession,
    page_ws: str,
    url: str,
    ready: str,
    *,
    viewport: tuple[int, int] | None = None,
) -> AsyncIterator[DevTools]:
    """The browser's page at `url`, once `ready` is true there; console errors collected."""
    async with session.ws_connect(page_ws, max_msg_size=0) as ws:
        dev = DevTools(ws)
        try:
            for domain in ("Page", "Runtime", "Log"):
                await dev.call(f"{domain}.enable")
            if viewport is not None:
                width, height = viewport
                await dev.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=width, height=height, deviceScaleFactor=1, mobile=False,
                )  # fmt: skip
            await dev.call("Page.navigate", url=url)
            await wait_for(dev, ready)
            yield dev
        finally:
            with contextlib.suppress(Exception):
                await dev.aclose()


def save_screenshot(png: bytes, path: Path) -> None:
    path.write_bytes(png)
    wanted = os.environ.get("GPU_BROKER_DASHBOARD_PNG")
    if wanted:
        Path(wanted).write_bytes(png)


READY = "document.body !== null && document.body.dataset.ready === '1'"
DOM_COUNTS = """JSON.stringify({
  gpuRows: [...document.querySelectorAll('#timeline .tl-row[data-kind=gpu]')].map(
    (g) => ({uuid: g.dataset.uuid, segments: g.querySelectorAll('rect.seg').length})),
  poolSegments: document.querySelectorAll('#timeline .tl-row[data-kind=pool] rect.seg').length,
  days: [...document.querySelectorAll('#chart g.day')].map((g) => g.dataset.period),
  sources: [...document.querySelectorAll('#chart rect.bar-earnings')].map(
    (r) => r.dataset.source),
  costBars: [...document.querySelectorAll('#chart rect.bar-cost')].map(
    (r) => Number(r.getAttribute('height')) > 0),
  netOverExtraNet: [...document.querySelectorAll('#chart g.day')].map(
    (g) => Number(g.querySelector('line.net').getAttribute('y1'))
      - Number(g.querySelector('line.extra-net').getAttribute('y1'))),
  totalsText: document.getElementById('totals').textContent,
  tableRows: document.querySelectorAll('#gpus tbody tr').length,
  poolState: document.getElementById('pool-state').textContent,
  errorShown: !document.getElementById('error').hidden,
  fleetShown: !document.getElementById('fleet').hidden,
})"""


async def test_dashboard_draws_what_the_api_serves_in_headless_chromium(
    browser: tuple[aiohttp.ClientSession, str],
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RIG_VAST_KEY", VAST_KEY)
    monkeypatch.setenv("RIG_API_TOKEN", TOKEN)
    config = rig_config(tmp_path / "state", ollama_url=fake_ollama.url, vast_url=fake_vast.url)
    await write_history(tmp_path / "state", config, clock.now().date(), days=13)
    arrivals = await write_demand(config, clock.now())
    rig = Rig(clock, config, fake_ollama, fake_vast)
    await rig.start()
    session, page_ws = browser
    try:
        await rig.until_state(PoolState.LISTED, limit=600)
        page = open_page(session, page_ws, rig.api_url + "/", READY, viewport=(1280, 1000))
        async with page as dev:
            await wait_for(dev, "document.getElementById('pool-state').textContent"
                                " === 'LISTED'")  # fmt: skip

            # Live: a renter arrives; the page follows within its polling interval.
            fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
            await rig.until_state(PoolState.RENTED, limit=60)
            await rig.run_for(600, step=30)
            await wait_for(dev, "document.getElementById('pool-state').textContent"
                                " === 'RENTED'", limit=20)  # fmt: skip
            # The chart polls every 30 s: load the page again rather than wait for it.
            await dev.evaluate("window.oldPage = true")
            await dev.call("Page.navigate", url=rig.api_url + "/")
            await wait_for(dev, f"!window.oldPage && {READY}")

            drawn = json.loads(await dev.evaluate(DOM_COUNTS))
            async with session.get(rig.api_url + "/api/timeline?hours=24") as response:
                timeline = await response.json()
            async with session.get(rig.api_url + "/api/report?days=14") as response:
                report = await response.json()
            assert drawn["gpuRows"] == [
                {"uuid": g["uuid"], "segments": len(g["intervals"])} for g in timeline["gpus"]
            ]
            assert len(drawn["gpuRows"]) == 2
            assert drawn["poolSegments"] == len(timeline["pool"]["intervals"])
            assert drawn["days"] == [row["period"] for row in report["rows"]]
            assert len(drawn["days"]) == 14
            assert drawn["sources"] == [row["earnings_source"] for row in report["rows"]]
            assert "provider" in drawn["sources"] and "estimate" in drawn["sources"]
            assert drawn["costBars"] == [row["energy_cost"] > 0 for row in report["rows"]]
            # the extra-net line sits above net (a smaller y) by what idle draw cost
            assert [d > 0 for d in drawn["netOverExtraNet"]] == [
                row["extra_net"] > row["net"] for row in report["rows"]
            ]
            assert any(d > 0 for d in drawn["netOverExtraNet"])
            assert "extra energy only: cost" in drawn["totalsText"]
            assert drawn["tableRows"] == 2
            assert drawn["errorShown"] is False

            # The week heat map of local use draws /api/local-use, cell for cell.
            await wait_for(dev, "document.getElementById('local-use-map').dataset.ready"
                                " === '1'")  # fmt: skip
            cells = json.loads(await dev.evaluate(HEAT_CELLS))
            async with session.get(rig.api_url + "/api/local-use?days=28") as response:
                week = await response.json()
            assert len(cells) == 7 * 24
            assert {(c["day"], c["hour"]): c["used"] for c in cells} == {
                (d, h): week["used"][d][h] for d in range(7) for h in range(24)
            }
            tz = config.broker.tz
            hot = {(a.astimezone(tz).weekday(), a.astimezone(tz).hour) for a in arrivals}
            assert {(c["day"], c["hour"]) for c in cells if c["used"] > 0} == hot
            assert all(c["fill"] != "#f7f8fa" for c in cells if c["used"] > 0)
            assert all(c["fill"] == "#f7f8fa" for c in cells if c["used"] == 0)
            assert week["total_requests"] == 3
            assert drawn["fleetShown"] is False  # a ledger of its own: no fleet table
            assert dev.errors() == []

            shot = await dev.call("Page.captureScreenshot", format="png")
            png = base64.b64decode(shot["data"])
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            save_screenshot(png, tmp_path / "dashboard.png")
    finally:
        await rig.aclose()


HEAT_CELLS = """JSON.stringify([...document.querySelectorAll('#local-use-map rect.cell')].map(
  (r) => ({day: Number(r.dataset.day), hour: Number(r.dataset.hour),
           used: Number(r.dataset.used), fill: r.getAttribute('fill')})))"""

AXIS = """JSON.stringify({
  money: [...document.querySelectorAll('#chart svg > text')].map((t) => t.textContent),
  days: [...document.querySelectorAll('#chart g.day')].map((g) => g.dataset.period),
  ticks: [...document.querySelectorAll('#timeline svg > text')].map((t) => t.textContent),
})"""


async def test_a_first_days_dashboard_follows_its_data(
    browser: tuple[aiohttp.ClientSession, str],
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A broker started today, rented for ten minutes: cents, not euros, and minutes, not days.
    monkeypatch.setenv("RIG_VAST_KEY", VAST_KEY)
    monkeypatch.setenv("RIG_API_TOKEN", TOKEN)
    config = rig_config(tmp_path / "state", ollama_url=fake_ollama.url, vast_url=fake_vast.url)
    rig = Rig(clock, config, fake_ollama, fake_vast)
    await rig.start()
    session, page_ws = browser
    try:
        await rig.until_state(PoolState.LISTED, limit=600)
        fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
        await rig.until_state(PoolState.RENTED, limit=60)
        await rig.run_for(600, step=30)
        async with open_page(session, page_ws, rig.api_url + "/", READY) as dev:
            drawn = json.loads(await dev.evaluate(AXIS))
    finally:
        await rig.aclose()
    # One day drawn, not thirteen empty ones before it.
    assert drawn["days"] == [clock.now().date().isoformat()]
    # Five distinct money ticks (the old axis read "0.01, 0.01, 0.01, 0.00, 0.00").
    assert len(drawn["money"]) == 5 and len(set(drawn["money"])) == 5, drawn["money"]
    # The timeline spans the broker's 15 minutes with minute ticks, not a blank 24 h bar.
    assert len(drawn["ticks"]) >= 3, drawn["ticks"]


FLEET = """JSON.stringify({
  shown: !document.getElementById('fleet').hidden,
  rows: [...document.querySelectorAll('#fleet-hosts tbody tr')].map((r) => ({
    host: r.dataset.host, silent: r.dataset.silent,
    cells: [...r.querySelectorAll('td')].map((td) => td.textContent)})),
})"""


async def test_the_fleet_table_shows_every_host_of_a_shared_ledger(
    browser: tuple[aiohttp.ClientSession, str],
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    monkeypatch: pytest.MonkeyPatch,
    pg_server: PgServer,
) -> None:
    monkeypatch.setenv("RIG_VAST_KEY", VAST_KEY)
    monkeypatch.setenv("RIG_API_TOKEN", TOKEN)
    url = pg_server.new_database()
    # Another server of the fleet, rented since 3 hours, silent for the last hour.
    other = await PostgresLedger.open(url, "gpu-other", lock=True)
    now = clock.now()
    await other.record_state("pool", "machine", "RENTED", now - timedelta(hours=3))
    for uuid in ("GPU-o0", "GPU-o1"):
        await other.record_state("gpu", uuid, "RENTED", now - timedelta(hours=3))
    await other.add_energy(
        [EnergyRecord("GPU-o0", 0, "rented", now - timedelta(hours=3), now - timedelta(hours=1),
                      2 * 3.6e6)]
    )  # fmt: skip
    await other.close()
    config = rig_config(
        tmp_path / "state", ollama_url=fake_ollama.url, vast_url=fake_vast.url,
        broker={"database_url": url},
    )  # fmt: skip
    rig = Rig(clock, config, fake_ollama, fake_vast)
    await rig.start()
    session, page_ws = browser
    try:
        await rig.until_state(PoolState.LISTED, limit=600)
        await rig.run_for(120, step=30)
        async with open_page(session, page_ws, rig.api_url + "/", READY) as dev:
            drawn = json.loads(await dev.evaluate(FLEET))
            errors = dev.errors()
        async with session.get(rig.api_url + "/api/fleet") as response:
            fleet = await response.json()
    finally:
        await rig.aclose()
    assert errors == []
    assert fleet["shared"] is True and fleet["this_host"] == "rig"
    assert [h["host"] for h in fleet["hosts"]] == ["gpu-other", "rig"]
    assert drawn["shown"] is True
    assert [(r["host"], r["silent"]) for r in drawn["rows"]] == [
        (h["host"], str(h["silent"]).lower()) for h in fleet["hosts"]
    ]
    theirs, ours = drawn["rows"]
    assert theirs["cells"][1].startswith("RENTED since") and theirs["cells"][2] == "2"
    assert theirs["cells"][6].endswith("(silent)")  # nothing written for an hour
    assert ours["cells"][0] == "rig (this one)" and ours["cells"][1].startswith("LISTED")
    assert not ours["cells"][6].endswith("(silent)")
    # The energy cost of the other host's rented hours today, in the config's currency.
    cost = next(h for h in fleet["hosts"] if h["host"] == "gpu-other")["energy_cost_today"]
    assert cost > 0 and theirs["cells"][4] == f"{cost:.2f} USD"
