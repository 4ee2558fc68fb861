"""Fleet views over a shared PostgreSQL ledger, through the real command line: `report
--host`, `status --fleet` and `ledger copy`. Two hosts write a day each through the real
PostgresLedger; the fleet's figures must be the hosts' own, added."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fakes.postgres import PgServer
from test_report import CONFIG, Draw, write_energy

from broker.cli import main
from broker.clock import FakeClock
from broker.ledger import EarningsRecord, IdleRecord, Ledger, SqliteLedger
from broker.ledger.base import PriceRecord
from broker.ledger.postgres import SCHEMA_VERSION as PG_SCHEMA
from broker.ledger.postgres import PostgresLedger

DAY = datetime(2026, 11, 24, 23, 0, tzinfo=UTC)  # Berlin midnight, 25 November
NOW = DAY + timedelta(days=1, hours=1)


async def write_host(ledger: Ledger, watts: float, earned: float, listed_hours: int) -> None:
    """A day: LOCAL, then LISTED for `listed_hours`, both GPUs drawing `watts` (more when
    listed), and the provider's figure for the day."""
    listed_at = DAY + timedelta(hours=24 - listed_hours)
    await ledger.record_state("pool", "default", "LOCAL", DAY)
    await ledger.record_state("pool", "default", "LISTED", listed_at)
    for gpu in ("GPU-0", "GPU-1"):
        await ledger.record_state("gpu", gpu, "listed", listed_at)
    draws = [
        d
        for i, uuid in enumerate(("GPU-0", "GPU-1"))
        for d in (
            Draw(uuid, i, "LOCAL", DAY, listed_at, watts, 30),
            Draw(uuid, i, "LISTED", listed_at, DAY + timedelta(days=1), 2 * watts, 30),
        )
    ]
    await write_energy(ledger, draws)
    await ledger.upsert_earnings(
        [EarningsRecord("vast", "42", date(2026, 11, 25), earned, "USD", "provider", NOW)]
    )


def config_for(tmp_path: Path, url: str, host: str) -> Path:
    path = tmp_path / f"{host}.toml"
    text = CONFIG.format(state=tmp_path / host).replace(
        "[broker]\n", f'[broker]\ndatabase_url = "{url}"\nhost_name = "{host}"\n', 1
    )
    path.write_text(text)
    return path


def run(*argv: str) -> str:
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        code = main(list(argv), FakeClock(NOW))
    assert code == 0
    return out.getvalue()


def report(config: Path, *args: str) -> dict[str, Any]:
    since = ["--since", "2026-11-25", "--until", "2026-11-25"]
    result: dict[str, Any] = json.loads(
        run("report", "-c", str(config), "--format", "json", *since, *args)
    )
    return result


NUMBERS = ("rented_gpu_hours", "earnings", "energy_cost", "net", "co2_kg")


@pytest.fixture
def two_hosts(pg_server: PgServer, tmp_path: Path) -> tuple[str, Path]:
    # Written before the commands run: they start their own event loops (asyncio.run).
    url = pg_server.new_database()

    async def write() -> None:
        for host, watts, earned, hours in (
            ("gpu-a", 100.0, 5.0, 8), ("gpu-b", 250.0, 9.0, 14)
        ):  # fmt: skip
            ledger = await PostgresLedger.open(url, host, lock=True)
            try:
                await write_host(ledger, watts, earned, hours)
                # each host its own asks and market reads: the fleet's line sums them all
                median = 0.9 if host == "gpu-a" else 1.2
                await ledger.add_price(PriceRecord(DAY + timedelta(hours=9), "market", median, 12))
                await ledger.add_price(PriceRecord(DAY + timedelta(hours=10), "ask", median))
            finally:
                await ledger.close()

    asyncio.run(write())
    return url, config_for(tmp_path, url, "gpu-a")


def test_report_host_all_is_the_sum_of_each_hosts_own(
    two_hosts: tuple[str, Path], tmp_path: Path
) -> None:
    url, config = two_hosts
    own_a = report(config)  # this host by default
    own_b = report(config_for(tmp_path, url, "gpu-b"))
    named_b = report(config, "--host", "gpu-b")
    assert named_b == own_b
    assert own_a["totals"]["earnings"] == pytest.approx(5.0 / 1.25)
    assert own_b["totals"]["earnings"] == pytest.approx(9.0 / 1.25)
    assert own_a["totals"]["hours"]["listed"] == pytest.approx(8.0)
    assert own_b["totals"]["hours"]["listed"] == pytest.approx(14.0)
    assert own_a["totals"]["energy_kwh"] != own_b["totals"]["energy_kwh"]

    fleet = report(config, "--host", "all")
    assert list(fleet["hosts"]) == ["gpu-a", "gpu-b"]
    assert fleet["hosts"]["gpu-a"] == own_a
    assert fleet["hosts"]["gpu-b"] == own_b
    for key in NUMBERS:
        assert fleet["fleet"]["totals"][key] == pytest.approx(
            own_a["totals"][key] + own_b["totals"][key], abs=1e-6
        )
    for bucket, kwh in fleet["fleet"]["totals"]["energy_kwh"].items():
        assert kwh == pytest.approx(
            own_a["totals"]["energy_kwh"][bucket] + own_b["totals"]["energy_kwh"][bucket]
        )
    assert own_a["prices"]["market_median"] == pytest.approx(0.9)
    assert own_b["prices"]["market_median"] == pytest.approx(1.2)
    assert fleet["fleet"]["prices"]["market_median"] == pytest.approx(1.05)
    assert fleet["fleet"]["prices"]["mean_ask"] == pytest.approx(1.05)
    assert fleet["fleet"]["prices"]["listings"] == 2
    # the CSV carries a host column, "all" for the fleet's rows
    lines = run("report", "-c", str(config), "--format", "csv", "--host", "all",
                "--since", "2026-11-25", "--until", "2026-11-25").splitlines()  # fmt: skip
    assert lines[0].startswith("host,period,")
    assert {line.split(",")[0] for line in lines[1:]} == {"gpu-a", "gpu-b", "all"}


def test_status_fleet_lists_every_host_from_the_ledger(
    two_hosts: tuple[str, Path],
) -> None:
    _, config = two_hosts
    rows = json.loads(run("status", "-c", str(config), "--fleet", "--json"))
    assert [(r["host"], r["state"], r["gpus"]) for r in rows] == [
        ("gpu-a", "LISTED", 2),
        ("gpu-b", "LISTED", 2),
    ]
    assert rows[0]["since"] == (DAY + timedelta(hours=16)).isoformat()
    assert rows[1]["last_seen"] == (DAY + timedelta(days=1)).isoformat()
    table = run("status", "-c", str(config), "--fleet")
    assert "gpu-a" in table and "gpu-b" in table and "silent" in table  # an hour since


def test_ledger_copy_moves_a_sqlite_history_once(pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.new_database()
    config = config_for(tmp_path, url, "gpu-old")
    sqlite_config = tmp_path / "local.toml"
    sqlite_config.write_text(
        CONFIG.format(state=tmp_path / "gpu-old").replace(
            "[broker]\n", '[broker]\nhost_name = "gpu-old"\n', 1
        )
    )

    async def write() -> None:
        local = await SqliteLedger.open(tmp_path / "gpu-old" / "ledger.sqlite3", host="gpu-old")
        try:
            await write_host(local, 180.0, 7.0, 10)
            await local.compact_energy(DAY + timedelta(hours=12))  # some folded, some not
            await local.add_price(PriceRecord(DAY, "ask", 0.3))
            await local.add_idle([IdleRecord("GPU-0", 0, DAY, DAY + timedelta(minutes=15), 900,
                                              {35: 900}, {2: 900}, {0: 900}, {})])  # fmt: skip
        finally:
            await local.close()

    asyncio.run(write())
    before = report(sqlite_config)
    assert before["totals"]["hours"]["listed"] == pytest.approx(10.0)

    first = run("ledger", "copy", "-c", str(sqlite_config), "--to", url)
    assert "energy: " in first and "rows" in first
    again = run("ledger", "copy", "-c", str(sqlite_config), "--to", url)
    assert again.rstrip().endswith(f"from {tmp_path / 'gpu-old' / 'ledger.sqlite3'}")
    assert "copied 0 rows" in again

    assert report(config) == before  # the shared ledger tells the same story
    with psycopg.connect(url) as conn:
        [(hosts,)] = conn.execute("SELECT array_agg(DISTINCT host) FROM energy").fetchall()
        idle = conn.execute("SELECT host, samples, watts FROM gpu_idle").fetchall()
    assert hosts == ["gpu-old"]
    with psycopg.connect(url) as conn:
        prices = conn.execute("SELECT host, kind, price FROM prices").fetchall()
    assert prices == [("gpu-old", "ask", 0.3)]
    assert idle == [("gpu-old", 900, '{"35": 900}')]  # copied once, though copied twice


def test_ledger_copy_refuses_a_password_in_the_url(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(state=tmp_path / "s"))
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stderr", err)
        code = main(["ledger", "copy", "-c", str(config), "--to", "postgresql://u:hunter2@h/d"],
                    FakeClock(NOW))  # fmt: skip
    assert code == 1
    assert "--to: expected no password in the URL" in err.getvalue()
    assert "hunter2" not in err.getvalue()


def test_check_reads_the_shared_ledger_without_changing_it(
    two_hosts: tuple[str, Path], pg_server: PgServer, tmp_path: Path
) -> None:
    _, config = two_hosts
    fresh = config_for(tmp_path, pg_server.new_database(), "gpu-new")
    outputs = []
    for path in (config, fresh):
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stdout", out)
            main(["check", "-c", str(path)], FakeClock(NOW))  # other checks may fail here
        outputs.append(out.getvalue())
    assert "ok   ledger postgresql://broker@127.0.0.1" in outputs[0]
    v = PG_SCHEMA
    assert f"(schema {v}); this host writes as 'gpu-a'; 1 other host(s) in it" in outputs[0]
    assert f"(schema 0, will migrate to {v}); this host writes as 'gpu-new'" in outputs[1]
    fresh_url = fresh.read_text().split('database_url = "')[1].split('"')[0]
    with psycopg.connect(fresh_url) as conn:
        assert conn.execute("SELECT to_regclass('gpu_broker_schema')").fetchone() == (None,)


def test_simulate_and_sizing_read_the_shared_ledger(two_hosts: tuple[str, Path]) -> None:
    """No SQLite file in state_dir: the shared database is the ledger (both commands once
    looked for the file alone)."""
    _, config = two_hosts
    span = ["--since", "2026-11-25", "--until", "2026-11-25"]
    rows = json.loads(
        run("simulate", "-c", str(config), "--demand", "ledger", *span, "--format", "json")
    )["rows"]
    assert rows[-1]["policy"] == "oracle" and rows[0]["requests"] == 0
    sizing = json.loads(run("sizing", "-c", str(config), *span, "--json"))
    assert sizing["gpus_present"] == 2  # the two GPUs this host recorded
