"""The embedded ledger: one SQLite file in WAL mode, all work in one thread off the event loop.

WAL lets `gpu-broker report` read while the service writes. Every call goes through a single
worker thread that owns the connection, so SQLite's blocking I/O never stalls the event loop
and writes are serialised without locks of our own.

The schema version lives in `PRAGMA user_version`. `MIGRATIONS[n]` takes a database from
version n to n+1, inside one transaction with the version bump, so a failed migration leaves
the file as it was.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from broker.errors import LedgerError, LedgerVersionError
from broker.ledger.base import (
    EarningsRecord,
    EarningsSource,
    EnergyRecord,
    JournalEntry,
    JournalStatus,
    Scope,
    StateInterval,
)

T = TypeVar("T")

Migration = Sequence[str]

MIGRATIONS: list[Migration] = [
    # v1: the tables.
    (
        """CREATE TABLE state_intervals (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            scope TEXT NOT NULL CHECK (scope IN ('pool', 'gpu')),
            subject TEXT NOT NULL,
            state TEXT NOT NULL,
            start_ts REAL NOT NULL,
            end_ts REAL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        # At most one interval in force per pool or GPU.
        """CREATE UNIQUE INDEX state_intervals_open
            ON state_intervals (host, scope, subject) WHERE end_ts IS NULL""",
        """CREATE TABLE energy (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            gpu_uuid TEXT NOT NULL,
            gpu_index INTEGER NOT NULL,
            pool_state TEXT NOT NULL,
            start_ts REAL NOT NULL,
            end_ts REAL NOT NULL,
            joules REAL NOT NULL,
            overhead_joules REAL NOT NULL DEFAULT 0,
            method TEXT NOT NULL
        )""",
        """CREATE TABLE earnings (
            provider TEXT NOT NULL,
            machine_id TEXT NOT NULL,
            day TEXT NOT NULL,
            amount REAL NOT NULL,
            currency TEXT NOT NULL,
            updated_ts REAL NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}',
            host TEXT NOT NULL,
            PRIMARY KEY (provider, machine_id, day)
        )""",
        """CREATE TABLE journal (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL CHECK (status IN ('intent', 'done', 'failed', 'note')),
            payload TEXT NOT NULL DEFAULT '{}',
            outcome TEXT,
            outcome_ts REAL
        )""",
    ),
    # v2: earnings say whether the provider reported them or the broker estimated them
    # (the paper market only estimates), and time-range indexes for reports and restarts.
    (
        """ALTER TABLE earnings ADD COLUMN source TEXT NOT NULL DEFAULT 'provider'
            CHECK (source IN ('provider', 'estimate'))""",
        "CREATE INDEX energy_by_time ON energy (host, start_ts)",
        "CREATE INDEX state_intervals_by_time ON state_intervals (host, start_ts)",
        "CREATE INDEX journal_by_status ON journal (host, status, ts)",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


def _ts(t: datetime) -> float:
    if t.tzinfo is None:
        raise ValueError("the ledger takes timezone-aware datetimes only")
    return t.timestamp()


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _dt_required(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring `conn` to the newest version; returns the version it was at."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > len(migrations):
        raise LedgerVersionError(
            f"the ledger is at schema version {found}, newer than this gpu-broker knows "
            f"({len(migrations)}); upgrade gpu-broker or point state_dir elsewhere"
        )
    for version in range(found, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in migrations[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


class SqliteLedger:
    def __init__(self, path: Path, host: str, migrations: Sequence[Migration]) -> None:
        self.path = path
        self._host = host
        self._migrations = migrations
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._conn: sqlite3.Connection | None = None
        self._version = 0
        self.migrated_from: int | None = None

    @classmethod
    async def open(
        cls, path: Path, host: str, migrations: Sequence[Migration] = MIGRATIONS
    ) -> SqliteLedger:
        ledger = cls(path, host, migrations)
        try:
            await ledger._call(ledger._connect)
        except BaseException:
            ledger._executor.shutdown(wait=False)
            raise
        return ledger

    @property
    def schema_version(self) -> int:
        return self._version

    @property
    def host(self) -> str:
        return self._host

    async def close(self) -> None:
        if self._conn is not None:
            await self._call(self._disconnect)
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> SqliteLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        except (OSError, sqlite3.Error) as err:
            raise LedgerError(f"cannot open the ledger at {self.path}: {err}") from err
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode survives a crash of the process; only a power cut can
            # lose the last transactions, which the once-a-minute energy flush bounds anyway.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self.migrated_from = migrate(conn, self._migrations)
            self._version = len(self._migrations)
        except LedgerError:
            conn.close()
            raise
        except sqlite3.Error as err:
            conn.close()
            raise LedgerError(f"cannot use the ledger at {self.path}: {err}") from err
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError("the ledger is closed")
        return self._conn

    def _write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[sqlite3.Cursor]:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            cursors = [db.execute(sql, params) for sql, params in statements]
            db.execute("COMMIT")
        except sqlite3.Error as err:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise LedgerError(f"ledger write failed: {err}") from err
        return cursors

    def _read(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        db = self._db
        db.row_factory = sqlite3.Row
        try:
            return cast(list[sqlite3.Row], db.execute(sql, params).fetchall())
        except sqlite3.Error as err:
            raise LedgerError(f"ledger read failed: {err}") from err
        finally:
            db.row_factory = None

    # -- state intervals ------------------------------------------------------------------

    async def record_state(
        self, scope: Scope, subject: str, state: str, at: datetime, reason: str = ""
    ) -> None:
        ts = _ts(at)
        await self._call(
            self._write,
            [
                (
                    "UPDATE state_intervals SET end_ts = MAX(start_ts, ?) "
                    "WHERE host = ? AND scope = ? AND subject = ? AND end_ts IS NULL",
                    (ts, self._host, scope, subject),
                ),
                (
                    "INSERT INTO state_intervals (host, scope, subject, state, start_ts, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (self._host, scope, subject, state, ts, reason),
                ),
            ],
        )

    async def close_states(self, at: datetime) -> int:
        cursors = await self._call(
            self._write,
            [
                (
                    "UPDATE state_intervals SET end_ts = MAX(start_ts, ?) "
                    "WHERE host = ? AND end_ts IS NULL",
                    (_ts(at), self._host),
                )
            ],
        )
        return cursors[0].rowcount

    async def state_intervals(
        self, start: datetime, end: datetime, scope: Scope | None = None, subject: str | None = None
    ) -> list[StateInterval]:
        sql = (
            "SELECT scope, subject, state, start_ts, end_ts, reason, host FROM state_intervals "
            "WHERE host = ? AND start_ts < ? AND (end_ts IS NULL OR end_ts > ?)"
        )
        params: list[Any] = [self._host, _ts(end), _ts(start)]
        if scope is not None:
            sql += " AND scope = ?"
            params.append(scope)
        if subject is not None:
            sql += " AND subject = ?"
            params.append(subject)
        rows = await self._call(self._read, sql + " ORDER BY start_ts, id", params)
        return [
            StateInterval(
                scope=r["scope"],
                subject=r["subject"],
                state=r["state"],
                start=_dt_required(r["start_ts"]),
                end=_dt(r["end_ts"]),
                reason=r["reason"],
                host=r["host"],
            )
            for r in rows
        ]

    # -- energy ---------------------------------------------------------------------------

    async def add_energy(self, records: Sequence[EnergyRecord]) -> None:
        if not records:
            return
        await self._call(
            self._write,
            [
                (
                    "INSERT INTO energy (host, gpu_uuid, gpu_index, pool_state, start_ts, end_ts, "
                    "joules, overhead_joules, method) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self._host,
                        r.gpu_uuid,
                        r.gpu_index,
                        r.pool_state,
                        _ts(r.start),
                        _ts(r.end),
                        r.joules,
                        r.overhead_joules,
                        r.method,
                    ),
                )
                for r in records
            ],
        )

    async def energy(
        self, start: datetime, end: datetime, gpu_uuid: str | None = None
    ) -> list[EnergyRecord]:
        sql = (
            "SELECT gpu_uuid, gpu_index, pool_state, start_ts, end_ts, joules, overhead_joules, "
            "method, host FROM energy WHERE host = ? AND start_ts < ? AND end_ts > ?"
        )
        params: list[Any] = [self._host, _ts(end), _ts(start)]
        if gpu_uuid is not None:
            sql += " AND gpu_uuid = ?"
            params.append(gpu_uuid)
        rows = await self._call(self._read, sql + " ORDER BY start_ts, id", params)
        return [
            EnergyRecord(
                gpu_uuid=r["gpu_uuid"],
                gpu_index=r["gpu_index"],
                pool_state=r["pool_state"],
                start=_dt_required(r["start_ts"]),
                end=_dt_required(r["end_ts"]),
                joules=r["joules"],
                overhead_joules=r["overhead_joules"],
                method=r["method"],
                host=r["host"],
            )
            for r in rows
        ]

    # -- earnings -------------------------------------------------------------------------

    async def upsert_earnings(self, records: Sequence[EarningsRecord]) -> int:
        if not records:
            return 0
        cursors = await self._call(
            self._write,
            [
                (
                    "INSERT INTO earnings (provider, machine_id, day, amount, currency, source, "
                    "updated_ts, detail, host) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (provider, machine_id, day) DO UPDATE SET "
                    "amount = excluded.amount, currency = excluded.currency, "
                    "source = excluded.source, updated_ts = excluded.updated_ts, "
                    "detail = excluded.detail, host = excluded.host "
                    # An estimate never overwrites what the provider itself reported, and
                    # an unchanged figure is not a change.
                    "WHERE NOT (earnings.source = 'provider' AND excluded.source = 'estimate') "
                    "AND (earnings.amount != excluded.amount OR earnings.source != excluded.source "
                    "OR earnings.currency != excluded.currency "
                    "OR earnings.detail != excluded.detail)",
                    (
                        r.provider,
                        r.machine_id,
                        r.day.isoformat(),
                        r.amount,
                        r.currency,
                        r.source,
                        _ts(r.updated),
                        json.dumps(r.detail, sort_keys=True),
                        self._host,
                    ),
                )
                for r in records
            ],
        )
        return sum(c.rowcount for c in cursors)

    async def earnings(self, first_day: date, last_day: date) -> list[EarningsRecord]:
        rows = await self._call(
            self._read,
            "SELECT provider, machine_id, day, amount, currency, source, updated_ts, detail, host "
            "FROM earnings WHERE day >= ? AND day <= ? ORDER BY day, provider, machine_id",
            (first_day.isoformat(), last_day.isoformat()),
        )
        return [
            EarningsRecord(
                provider=r["provider"],
                machine_id=r["machine_id"],
                day=date.fromisoformat(r["day"]),
                amount=r["amount"],
                currency=r["currency"],
                source=cast(EarningsSource, r["source"]),
                updated=_dt_required(r["updated_ts"]),
                detail=json.loads(r["detail"]),
                host=r["host"],
            )
            for r in rows
        ]

    # -- journal --------------------------------------------------------------------------

    async def journal(self, entry: JournalEntry) -> int:
        cursors = await self._call(
            self._write,
            [
                (
                    "INSERT INTO journal (host, ts, kind, subject, status, payload) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        self._host,
                        _ts(entry.at),
                        entry.kind,
                        entry.subject,
                        entry.status,
                        json.dumps(entry.payload, sort_keys=True, default=str),
                    ),
                )
            ],
        )
        row_id = cursors[0].lastrowid
        assert row_id is not None
        return row_id

    async def complete(
        self, entry_id: int, status: JournalStatus, at: datetime, outcome: str = ""
    ) -> None:
        if status not in ("done", "failed"):
            raise ValueError("an intent is completed as 'done' or 'failed'")
        cursors = await self._call(
            self._write,
            [
                (
                    "UPDATE journal SET status = ?, outcome = ?, outcome_ts = ? "
                    "WHERE id = ? AND host = ? AND status = 'intent'",
                    (status, outcome, _ts(at), entry_id, self._host),
                )
            ],
        )
        if cursors[0].rowcount != 1:
            raise LedgerError(f"journal entry {entry_id} is not an open intent")

    async def journal_entries(
        self,
        since: datetime | None = None,
        status: JournalStatus | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[JournalEntry]:
        sql = (
            "SELECT id, ts, kind, subject, status, payload, outcome, outcome_ts, host "
            "FROM journal WHERE host = ?"
        )
        params: list[Any] = [self._host]
        if since is not None:
            sql += " AND ts >= ?"
            params.append(_ts(since))
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        if kinds:
            sql += f" AND kind IN ({', '.join('?' for _ in kinds)})"
            params.extend(kinds)
        rows = await self._call(self._read, sql + " ORDER BY ts, id", params)
        return [
            JournalEntry(
                id=r["id"],
                at=_dt_required(r["ts"]),
                kind=r["kind"],
                subject=r["subject"],
                status=r["status"],
                payload=json.loads(r["payload"]),
                outcome=r["outcome"],
                outcome_at=_dt(r["outcome_ts"]),
                host=r["host"],
            )
            for r in rows
        ]
