"""Brokers on the shared PostgreSQL ledger, end to end (real gates, fake GPUs, fake Vast.ai or
the paper market), with the database stopped under them: local inference goes on, the offer
is withdrawn for a local request, nothing is listed while the ledger cannot be told, and
once the database is back what was measured and decided meanwhile is in the ledger (also
from a broker stopped during the outage); two brokers' day adds up in the fleet report."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.ollama import FakeOllama
from fakes.postgres import PgServer, find_bindir, running_server
from fakes.rig import TOKEN, VAST_KEY, Rig, chat, listed, rig_config
from fakes.vast import FakeVast

from broker.cli import main
from broker.clock import FakeClock
from broker.config import Config
from broker.ledger import EarningsRecord, EnergyRecord, open_ledger
from broker.ledger.postgres import PostgresLedger
from broker.scheduling.pool import PoolState

pytestmark = pytest.mark.skipif(
    find_bindir() is None, reason="no PostgreSQL server binaries (initdb, pg_ctl)"
)


async def test_the_database_going_away_stalls_no_gate_and_lists_nothing(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RIG_VAST_KEY", VAST_KEY)
    monkeypatch.setenv("RIG_API_TOKEN", TOKEN)
    # Reconnect on every call: the throttle runs on real time, this story on virtual time.
    monkeypatch.setattr("broker.ledger.postgres.RECONNECT_SECONDS", 0.0)
    with running_server() as server:  # its own server: this test stops it
        url = server.new_database()
        # Each attempt to list while the database is away counts as a cycle (see docs/fleet.md).
        config = rig_config(
            tmp_path / "state", ollama_url=fake_ollama.url, vast_url=fake_vast.url,
            policy={"max_cycles_per_day": 20}, broker={"database_url": url},
        )  # fmt: skip
        rig = Rig(clock, config, fake_ollama, fake_vast)
        await rig.start()
        try:
            await listed(rig)
            assert rig.offer.listed

            server.stop("fast")
            away = clock.now()
            # A local request: served, the offer withdrawn, with no ledger to write to.
            request = asyncio.create_task(chat(rig))
            await rig.until(request.done, limit=120, step=0.5)
            assert request.result().done
            assert not rig.offer.listed
            # Idle again for longer than idle_window + local_hold: it would list, but
            # cannot journal the intent first (invariant 4), so it does not.
            await rig.run_for(900, step=5)
            assert not rig.offer.listed
            assert rig.daemon.gates[0].control.mode.value == "open"

            server.restart_up()
            back = clock.now()
            await rig.until_state(PoolState.LISTED, limit=900, step=5)
            assert rig.offer.listed
            await rig.run_for(120, step=5)  # an energy flush or two
        finally:
            await rig.aclose()

        # What was measured while the database was away reached it when it came back.
        reader = await open_ledger(config.broker, host="rig")
        try:
            during = await reader.energy(away + timedelta(minutes=2), back)
            kinds = [(e.kind, e.status) for e in await reader.journal_entries()]
        finally:
            await reader.close()
        assert during, "the energy of the outage was lost"
        covered = sum((r.end - r.start).total_seconds() for r in during if r.gpu_index == 0)
        assert covered >= 0.9 * ((back - away).total_seconds() - 120)
        assert kinds.count(("list", "done")) == 2  # before and after; none while away


async def test_api_report_reads_one_host_or_the_whole_fleet(
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
    # Another server of the fleet, as its own broker would have written it.
    other = await PostgresLedger.open(url, "gpu-other", lock=True)
    now = clock.now()
    await other.record_state("pool", "machine", "RENTED", now - timedelta(hours=3))
    await other.add_energy(
        [EnergyRecord("GPU-o", 0, "rented", now - timedelta(hours=3), now, 3 * 3.6e6)]
    )  # 3 kWh
    await other.upsert_earnings(
        [EarningsRecord("vast", "7", now.date(), 2.5, "USD", "provider", now)]
    )
    await other.close()

    config = rig_config(
        tmp_path / "state", ollama_url=fake_ollama.url, vast_url=fake_vast.url,
        broker={"database_url": url},
    )  # fmt: skip
    rig = Rig(clock, config, fake_ollama, fake_vast)
    await rig.start()
    try:
        await listed(rig)
        await rig.run_for(120, step=5)  # energy flushed

        async def get(query: str) -> tuple[int, dict[str, object]]:
            async with aiohttp.ClientSession() as session, session.get(
                rig.api_url + "/api/report?days=1" + query
            ) as response:
                return response.status, await response.json()

        status, own = await get("")
        assert status == 200
        status, fleet = await get("&host=all")
        assert status == 200
        hosts = fleet["hosts"]
        assert isinstance(hosts, dict) and sorted(hosts) == ["gpu-other", "rig"]
        assert hosts["rig"] == own
        status, theirs = await get("&host=gpu-other")
        assert status == 200 and theirs == hosts["gpu-other"]
        assert theirs["totals"]["earnings"] == pytest.approx(2.5)  # type: ignore[index]
        assert theirs["totals"]["energy_kwh"]["rented"] == pytest.approx(3.0)  # type: ignore[index]
        totals = fleet["fleet"]["totals"]  # type: ignore[index]
        for key in ("earnings", "energy_cost", "net"):
            assert totals[key] == pytest.approx(
                own["totals"][key] + theirs["totals"][key]  # type: ignore[index]
            )
        status, body = await get("&host=no%20such%20name")
        assert status == 400 and "host" in str(body["error"])
    finally:
        await rig.aclose()


def fleet_config(state: Path, url: str, ollama_url: str, seed: int) -> Config:
    """A rig broker on the paper market (renters come now and then), on the shared ledger,
    with a window all day so the day has listings, rentals and reclaims."""
    return rig_config(
        state, ollama_url=ollama_url, vast_url=None,
        provider={"kind": "paper", "arrivals_per_hour": 1.5, "seed": seed},
        broker={"database_url": url, "sample_interval": "5s"},
        windows=[{"cron": "0 0 * * *", "duration": "24h"}],
        policy={"max_cycles_per_day": 12},
    )  # fmt: skip


async def run_both(
    rigs: list[Rig],
    clock: FakeClock,
    seconds: float,
    step: float = 60.0,
    until: Callable[[], bool] | None = None,
) -> None:
    """Move the shared clock on `seconds` (or until `until()`), every broker settling."""
    end = clock.monotonic() + seconds
    while clock.monotonic() < end and not (until is not None and until()):
        await clock.advance(min(step, end - clock.monotonic()))
        for rig in rigs:
            await rig.settle()


def cli_report(config: Path, since: str, now: datetime, *args: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["report", "-c", str(config), "--since", since, "--format", "json",
                     "--by", "day", *args], clock=FakeClock(now))  # fmt: skip
    assert code == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


@pytest.mark.timeout(600)  # a day of two brokers: about a minute on an idle box
async def test_two_brokers_share_one_database_for_a_day_and_its_outage(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RIG_API_TOKEN", TOKEN)
    monkeypatch.setattr("broker.ledger.postgres.RECONNECT_SECONDS", 0.0)
    start = clock.now()
    with running_server() as server:  # its own server: this test stops it
        url = server.new_database()
        configs = {
            host: fleet_config(tmp_path / host, url, fake_ollama.url, seed)
            for host, seed in (("gpu-a", 1), ("gpu-b", 2))
        }
        a = Rig(clock, configs["gpu-a"], fake_ollama, None, host="gpu-a")
        b = Rig(clock, configs["gpu-b"], fake_ollama, None, host="gpu-b")
        rigs = [await a.start(), await b.start()]
        try:
            await run_both(rigs, clock, 6 * 3600)
            # The database dies for a few minutes while A is offered (not rented).
            await run_both(rigs, clock, 6 * 3600, until=lambda: a.state is PoolState.LISTED)
            assert a.state is PoolState.LISTED
            server.stop("fast")
            away = clock.now()
            request = asyncio.create_task(chat(a))  # A's gate serves, with no ledger
            waited = await a.until(request.done, limit=120, step=0.5)
            assert request.result().done and waited < 60
            await run_both(rigs, clock, 60)
            await b.aclose()  # B stops during the outage: what it measured is on disk
            rigs = [a]
            await run_both(rigs, clock, 120)
            server.restart_up()
            back = clock.now()
            b = Rig(clock, configs["gpu-b"], fake_ollama, None, host="gpu-b")
            rigs = [a, await b.start()]

            await run_both(rigs, clock, 24 * 3600 - (clock.now() - start).total_seconds())
        finally:
            for rig in rigs:
                await rig.aclose()

        end = clock.now()
        # Nothing measured during the outage was lost: each GPU's energy records cover the
        # day but for the seconds B was stopped, and A's state change for the chat is there.
        for host in ("gpu-a", "gpu-b"):
            reader = await open_ledger(configs[host].broker, host=host)
            try:
                records = await reader.energy(start, end, gpu_uuid="GPU-rig-0")
                pool = await reader.state_intervals(away, back, scope="pool")
                notes = await reader.journal_entries(since=away, status="note")
            finally:
                await reader.close()
            covered = sum((r.end - r.start).total_seconds() for r in records)
            starts = [r.start for r in records]
            assert len(set(starts)) == len(starts), "a record written twice"
            stopped = (back - away).total_seconds() - 60 if host == "gpu-b" else 0.0
            assert covered == pytest.approx((end - start).total_seconds() - stopped, abs=120)
            if host == "gpu-a":
                assert any(i.start >= away for i in pool), "A's transition of the outage lost"
                assert any(n.at < back for n in notes), "A's notes of the outage lost"

        # The fleet's report is the sum of the hosts' own.
        paths = {}
        for host in configs:
            path = tmp_path / f"{host}.toml"
            path.write_text(
                f'[broker]\nstate_dir = "{tmp_path / host}"\ntimezone = "UTC"\n'
                f'database_url = "{url}"\nhost_name = "{host}"\n'
                '[energy]\ncurrency = "USD"\nprice_per_kwh = 0.2\noverhead_watts = 40\n'
                '[provider]\nkind = "paper"\n'
            )
            paths[host] = path
        since = start.date().isoformat()
        # (the command line runs its own event loop: in a thread)
        fleet = await asyncio.to_thread(cli_report, paths["gpu-a"], since, end, "--host", "all")
        own = {
            host: await asyncio.to_thread(cli_report, path, since, end)
            for host, path in paths.items()
        }
        assert sorted(fleet["hosts"]) == ["gpu-a", "gpu-b"]
        for host in own:
            assert fleet["hosts"][host] == own[host]
        for key in ("rented_gpu_hours", "earnings", "energy_cost", "net", "co2_kg"):
            assert fleet["fleet"]["totals"][key] == pytest.approx(
                sum(r["totals"][key] for r in own.values())
            )
        assert all(r["totals"]["rented_gpu_hours"] > 0 for r in own.values())
