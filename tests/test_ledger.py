"""SQLite-only ledger tests (WAL, files, its migrations); the behaviour both stores share is
in tests/test_ledger_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import date, timedelta
from pathlib import Path

import pytest
from test_ledger_contract import T0, _days, _minute_records, minutes

from broker.config import BrokerSection
from broker.errors import LedgerError, LedgerVersionError
from broker.ledger import (
    EarningsRecord,
    EnergyRecord,
    SqliteLedger,
    energy_totals_of,
    ledger_path,
    open_ledger,
)
from broker.ledger.sqlite import MIGRATIONS, SCHEMA_VERSION


@pytest.fixture
async def ledger(tmp_path: Path) -> SqliteLedger:
    ledger = await SqliteLedger.open(tmp_path / "state" / "ledger.sqlite3", host="box")
    yield ledger  # type: ignore[misc]
    await ledger.close()


async def test_created_on_first_use_in_wal_mode(tmp_path: Path) -> None:
    broker = BrokerSection(state_dir=tmp_path / "new" / "dir")
    ledger = await open_ledger(broker, host="box")
    try:
        path = ledger_path(broker)
        assert path.exists()
        assert ledger.schema_version == SCHEMA_VERSION
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.close()
    finally:
        await ledger.close()


async def test_database_work_runs_off_the_event_loop(ledger: SqliteLedger) -> None:
    threads: list[str] = []
    original = ledger._read

    def spy(sql: str, params: object) -> object:
        threads.append(threading.current_thread().name)
        return original(sql, params)  # type: ignore[arg-type]

    ledger._read = spy  # type: ignore[assignment,method-assign]
    await ledger.journal_entries()
    assert threads and threads[0].startswith("ledger")
    assert threads[0] != threading.current_thread().name


async def test_a_reader_sees_committed_rows_while_the_service_writes(
    ledger: SqliteLedger,
) -> None:
    await ledger.record_state("pool", "default", "LISTED", minutes(0))
    reader = sqlite3.connect(f"file:{ledger.path}?mode=ro", uri=True)
    try:
        await asyncio.gather(
            *(ledger.record_state("gpu", f"GPU-{i}", "listed", minutes(i)) for i in range(20))
        )
        assert reader.execute("SELECT COUNT(*) FROM state_intervals").fetchone()[0] == 21
    finally:
        reader.close()


# -- migrations ---------------------------------------------------------------------------


def _v1_database(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO earnings (provider, machine_id, day, amount, currency, updated_ts, host) "
        "VALUES ('vast', '42', '2026-11-01', 4.5, 'USD', 0, 'box')"
    )
    conn.execute(
        "INSERT INTO state_intervals (host, scope, subject, state, start_ts) "
        "VALUES ('box', 'pool', 'default', 'RENTED', ?)",
        (T0.timestamp(),),
    )
    conn.close()


async def test_migrates_a_version_1_ledger_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    _v1_database(path)
    ledger = await SqliteLedger.open(path, host="box")
    try:
        assert (ledger.migrated_from, ledger.schema_version) == (1, SCHEMA_VERSION)
        [row] = await ledger.earnings(date(2026, 11, 1), date(2026, 11, 1))
        assert (row.amount, row.source) == (4.5, "provider")  # old rows were provider-reported
        [interval] = await ledger.state_intervals(T0, T0 + timedelta(hours=1))
        assert (interval.state, interval.end) == ("RENTED", None)
        await ledger.upsert_earnings(
            [EarningsRecord("paper", "local", date(2026, 11, 2), 1.0, "USD", "estimate", T0)]
        )
    finally:
        await ledger.close()
    reopened = await SqliteLedger.open(path, host="box")
    assert reopened.migrated_from == SCHEMA_VERSION  # nothing left to do the second time
    await reopened.close()


async def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    _v1_database(path)
    broken = [MIGRATIONS[0], ("CREATE INDEX fine ON energy (host)", "NOT SQL AT ALL")]
    with pytest.raises(LedgerError, match="cannot use the ledger"):
        await SqliteLedger.open(path, host="box", migrations=broken)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "fine" not in indexes
    conn.close()


async def test_a_ledger_from_a_newer_broker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerVersionError, match="newer than this gpu-broker knows"):
        await SqliteLedger.open(path, host="box")


async def test_an_unusable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        await SqliteLedger.open(blocker / "ledger.sqlite3", host="box")


# -- energy: folding into 15-minute sums, totals per span -------------------------------------


def _v2_database(path: Path, records: list[EnergyRecord]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:2]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO energy (host, gpu_uuid, gpu_index, pool_state, start_ts, end_ts, joules, "
        "overhead_joules, method) VALUES ('box', ?, ?, ?, ?, ?, ?, ?, 'counter')",
        [
            (r.gpu_uuid, r.gpu_index, r.pool_state, r.start.timestamp(), r.end.timestamp(),
             r.joules, r.overhead_joules)
            for r in records
        ],
    )  # fmt: skip
    conn.execute("COMMIT")
    conn.close()


async def test_migrates_a_version_2_ledger_and_folds_its_energy_as_it_goes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    old = _minute_records("GPU-a", 0, [(T0, "listed")], T0 + timedelta(days=2), 200)
    _v2_database(path, old)
    ledger = await SqliteLedger.open(path, host="box")
    try:
        assert (ledger.migrated_from, ledger.schema_version) == (2, SCHEMA_VERSION) == (2, 7)
        cuts = _days(2)
        before = await ledger.energy_totals(cuts)
        assert sum(t.joules for t in before) == pytest.approx(sum(r.joules for r in old))
        # The service writes its next minute: what is over a day old gets folded.
        after_t = T0 + timedelta(days=2)
        new = EnergyRecord("GPU-a", 0, "listed", after_t, after_t + timedelta(minutes=1), 1.0)
        await ledger.add_energy([new])
        conn = sqlite3.connect(path)
        raw = conn.execute("SELECT COUNT(*) FROM energy WHERE slot IS NULL").fetchone()[0]
        conn.close()
        assert raw < len(old) // 2 + 30
        after = await ledger.energy_totals(cuts)
        assert [t.joules for t in after] == pytest.approx(
            [t.joules for t in energy_totals_of([*old, new], cuts)]
        )
    finally:
        await ledger.close()


# -- demand -------------------------------------------------------------------------------


