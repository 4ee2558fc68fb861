"""A broker on the shared PostgreSQL ledger, end to end (real gate, fake Vast.ai, fake GPUs),
with the database stopped under it: local inference goes on, the offer is withdrawn for
a local request, nothing is listed while the ledger cannot be told, and once the database
is back the broker lists again and the energy measured meanwhile is in the ledger."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from fakes.ollama import FakeOllama
from fakes.postgres import PgServer, find_bindir, running_server
from fakes.rig import TOKEN, VAST_KEY, Rig, chat, listed, rig_config
from fakes.vast import FakeVast

from broker.clock import FakeClock
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
            policy={"max_cycles_per_day": 20},
        )  # fmt: skip
        config = config.model_copy(
            update={"broker": config.broker.model_copy(update={"database_url": url})}
        )
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

    config = rig_config(tmp_path / "state", ollama_url=fake_ollama.url, vast_url=fake_vast.url)
    config = config.model_copy(
        update={"broker": config.broker.model_copy(update={"database_url": url})}
    )
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
