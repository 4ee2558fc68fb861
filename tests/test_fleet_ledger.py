"""The shared PostgreSQL ledger beyond the contract: its config keys, the per-host claim,
migrations in place, and reaching it through a libpq service file."""

from __future__ import annotations

import asyncio
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fakes.postgres import PgServer, running_server

from broker.config import BrokerSection, ConfigError, parse_config
from broker.errors import LedgerError, LedgerVersionError
from broker.instance_lock import InstanceLocked
from broker.ledger import DemandRecord, EnergyRecord, JournalEntry, open_ledger
from broker.ledger.postgres import SCHEMA_VERSION, PostgresLedger
from broker.ledger.spool import SPOOL_FILE, Spool, StateChange

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)


def problems(toml: str) -> list[str]:
    try:
        parse_config(tomllib.loads(toml))
    except ConfigError as err:
        return err.problems
    return []


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('database_url = "postgresql://broker:hunter2@db.lan/fleet"',
         "broker.database_url: expected no password in the URL"),
        ('database_url = "postgresql://broker@db.lan/fleet?password=hunter2"',
         "broker.database_url: expected no password in the URL"),
        ('database_url = "mysql://broker:hunter2@db.lan/fleet"',
         'broker.database_url: expected a PostgreSQL URL like "postgresql://'),
        ('database_password = "hunter2"',
         "broker.database_password: secrets are not accepted inline; use database_password_env"),
        ('host_name = "gpu box"', "broker.host_name: expected a host name"),
        ('database_password_env = "PGPW"\ndatabase_password_file = "/run/pw"',
         "broker: set database_password_env or database_password_file, not both"),
    ],
)  # fmt: skip
def test_database_keys_name_their_mistake_and_never_echo_a_password(
    toml: str, expected: str
) -> None:
    found = problems("[broker]\n" + toml)
    assert any(p.startswith(expected) for p in found), found
    assert not any("hunter2" in p for p in found)


def test_a_passwordless_url_and_host_name_are_taken() -> None:
    config = parse_config(tomllib.loads(
        '[broker]\ndatabase_url = "postgresql://broker@db.lan/fleet"\nhost_name = "gpu-1"'
    ))
    assert config.broker.database_url == "postgresql://broker@db.lan/fleet"
    assert config.broker.host == "gpu-1"


async def test_open_ledger_picks_postgres_and_keys_rows_by_host_name(
    pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.new_database()
    broker = BrokerSection(state_dir=tmp_path, database_url=url, host_name="gpu-7")
    ledger = await open_ledger(broker)
    try:
        assert isinstance(ledger, PostgresLedger)
        assert (ledger.host, ledger.schema_version) == ("gpu-7", SCHEMA_VERSION)
        await ledger.record_state("pool", "default", "LOCAL", T0)
    finally:
        await ledger.close()
    assert not (tmp_path / "ledger.sqlite3").exists()  # nothing written locally
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT host, state FROM state_intervals").fetchall() == [
            ("gpu-7", "LOCAL")
        ]


async def test_two_brokers_claiming_one_host_on_one_database_are_refused(
    pg_server: PgServer,
) -> None:
    url = pg_server.new_database()
    first = await PostgresLedger.open(url, "gpu-1", lock=True)
    try:
        with pytest.raises(InstanceLocked, match=r"host name 'gpu-1'.*broker\.host_name"):
            await PostgresLedger.open(url, "gpu-1", lock=True)
        # another host, and a report reading gpu-1 (no claim), are welcome
        other = await PostgresLedger.open(url, "gpu-2", lock=True)
        reader = await PostgresLedger.open(url, "gpu-1")
        await other.close()
        await reader.close()
    finally:
        await first.close()
    # the claim ends with the first broker's session
    again = await PostgresLedger.open(url, "gpu-1", lock=True)
    await again.close()


async def test_brokers_starting_at_once_migrate_the_database_once(pg_server: PgServer) -> None:
    url = pg_server.new_database()
    ledgers = await asyncio.gather(*(PostgresLedger.open(url, f"h{i}") for i in range(4)))
    try:
        # one of them found it empty; any that started later found it done (a second run
        # of the migration would have failed on CREATE TABLE)
        assert min(x.migrated_from for x in ledgers if x.migrated_from is not None) == 0
        assert {x.schema_version for x in ledgers} == {SCHEMA_VERSION}
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version FROM gpu_broker_schema").fetchall() == [
                (SCHEMA_VERSION,)
            ]
    finally:
        for x in ledgers:
            await x.close()
    # opening again finds it current and changes nothing
    again = await PostgresLedger.open(url, "h0")
    assert again.migrated_from == SCHEMA_VERSION
    await again.close()


async def test_a_database_from_a_newer_broker_is_refused(pg_server: PgServer) -> None:
    url = pg_server.new_database()
    await (await PostgresLedger.open(url, "h")).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE gpu_broker_schema SET version = 99")
    with pytest.raises(LedgerVersionError, match="schema version 99"):
        await PostgresLedger.open(url, "h")


async def test_reached_through_a_libpq_service_file(
    pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_server.new_database()
    dbname = url.rsplit("/", 1)[1]
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[fleet]\nhost=127.0.0.1\nport={pg_server.port}\nuser=broker\ndbname={dbname}\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service))
    broker = BrokerSection(
        state_dir=tmp_path, database_url="postgresql://?service=fleet", host_name="gpu-3"
    )
    ledger = await open_ledger(broker)
    try:
        await ledger.record_state("pool", "default", "LISTED", T0)
    finally:
        await ledger.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT host FROM state_intervals").fetchall() == [("gpu-3",)]


async def test_what_happens_during_an_outage_outlives_a_restart_on_disk_but_intents_do_not(
    tmp_path: Path,
) -> None:
    with running_server() as server:  # its own server: this test stops it
        url = server.new_database()
        spool = tmp_path / "state" / SPOOL_FILE
        ledger = await PostgresLedger.open(
            url, "gpu-1", lock=True, spool=spool, reconnect_seconds=0.0
        )
        minute = timedelta(minutes=1)
        before = [EnergyRecord("GPU-0", 0, "listed", T0, T0 + minute, 60.0)]
        during = [
            EnergyRecord("GPU-0", 0, "listed", T0 + i * minute, T0 + (i + 1) * minute, 60.0)
            for i in range(1, 31)
        ]
        asked = [DemandRecord("ollama", T0 + 5 * minute, 2.0, "passed")]
        await ledger.record_state("pool", "default", "LISTED", T0)
        unlisting = await ledger.journal(JournalEntry(T0 + minute, "unlist", "intent"))
        await ledger.add_energy(before)
        server.stop("fast")
        # None of these raise: they are kept on disk, in order.
        await ledger.complete(unlisting, "done", T0 + 2 * minute, "withdrawn")
        await ledger.record_state("pool", "default", "LOCAL", T0 + 2 * minute)
        await ledger.journal(JournalEntry(T0 + 3 * minute, "request_held", "note", "ollama"))
        await ledger.add_energy(during)
        await ledger.add_demand(asked)
        assert await ledger.close_states(T0 + 31 * minute) == 0  # spooled, not yet closed
        with pytest.raises(LedgerError):
            await ledger.journal(JournalEntry(T0, "list", "intent"))  # never spooled
        assert spool.exists()
        await ledger.close()  # the broker stops during the outage

        server.restart_up()
        again = await PostgresLedger.open(url, "gpu-1", lock=True, spool=spool)
        try:
            stored = await again.energy(T0, T0 + timedelta(hours=1))
            assert [r.start for r in stored] == [r.start for r in before + during]
            assert [r.arrival for r in await again.demand(T0, T0 + minute * 60)] == [
                asked[0].arrival
            ]
            intervals = await again.state_intervals(T0, T0 + timedelta(hours=1))
            assert [(i.state, i.start, i.end) for i in intervals] == [
                ("LISTED", T0, T0 + 2 * minute),
                ("LOCAL", T0 + 2 * minute, T0 + 31 * minute),
            ]
            entries = await again.journal_entries()
            assert [(e.kind, e.status, e.outcome) for e in entries] == [
                ("unlist", "done", "withdrawn"),
                ("request_held", "note", None),
            ]
            await again.add_energy([EnergyRecord("GPU-0", 0, "listed", T0, T0, 0.0)])
            assert len(await again.energy(T0, T0 + timedelta(hours=1))) == 31  # no replay twice
        finally:
            await again.close()


async def test_a_full_spool_refuses_so_the_caller_keeps_the_records(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / SPOOL_FILE, limit=3)
    record = DemandRecord("ollama", T0, 1.0, "passed")
    await spool.put("demand", [record, record])
    with pytest.raises(LedgerError, match="holds 2 rows, its limit"):
        await spool.put("demand", [record, record])
    rows = await spool.take()
    assert [(kind, r) for _, kind, r in rows] == [("demand", record), ("demand", record)]
    await spool.done([row_id for row_id, _, _ in rows])
    assert spool.pending == 0


async def test_the_spool_refuses_naive_datetimes_as_the_database_does(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / SPOOL_FILE)
    with pytest.raises(ValueError, match="timezone-aware"):
        await spool.put("state", [StateChange("pool", "default", "LOCAL", datetime(2026, 1, 1))])
    with pytest.raises(ValueError, match="timezone-aware"):
        await spool.put("demand", [DemandRecord("ollama", datetime(2026, 1, 1), 1.0, "passed")])
    assert spool.pending == 0


async def test_a_full_spool_loses_a_state_change_with_an_error_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_server() as server:
        url = server.new_database()
        ledger = await PostgresLedger.open(url, "gpu-1", lock=True, reconnect_seconds=0.0)
        try:
            ledger._spool = await Spool.open(tmp_path / SPOOL_FILE, limit=1)
            server.stop("fast")
            await ledger.record_state("pool", "default", "LOCAL", T0)  # the one row it holds
            await ledger.record_state("pool", "default", "IDLE", T0 + timedelta(minutes=1))
        finally:
            await ledger.close()
    assert "lost 1 ledger row(s) (state)" in caplog.text
    assert "holds 1 rows, its limit" in caplog.text
