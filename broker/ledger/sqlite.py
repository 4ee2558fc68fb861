"""The embedded ledger: one SQLite file in WAL mode, all work in one thread off the event loop.

WAL lets `gpu-broker report` read while the service writes. Every call goes through a single
worker thread that owns the connection, so SQLite's blocking I/O never stalls the event loop
and writes are serialised without locks of our own.

The schema version lives in `PRAGMA user_version`. `MIGRATIONS[n]` takes a database from
version n to n+1, inside one transaction with the version bump, so a failed migration leaves
the file as it was.

Energy is written as the daemon measures it (a record per GPU per minute, about 4 million a
year for 8 GPUs). Records older than a day are folded into one row per GPU, pool state and
15-minute slot (`slot` set; rows as written have it NULL), in the transaction that deletes
them, so every joule is in exactly one row of `energy`. A year is then about 300 000 rows:
small on disk and quick to sum. The same transaction adds them to `energy_slots`, one row
per slot and pool state for the whole machine, which whole-machine totals read instead of
the per-GPU sums (never both). Every UTC offset in use is a multiple of 15 minutes, so
local days, weeks and months, and tariff periods starting on a quarter hour, fall on slot
boundaries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar, cast

from broker.errors import LedgerError, LedgerVersionError
from broker.ledger.base import (
    DemandOutcome,
    DemandRecord,
    EarningsRecord,
    EarningsSource,
    EnergyRecord,
    EnergyTotal,
    IdleRecord,
    JournalEntry,
    JournalStatus,
    ModelLoad,
    PriceKind,
    PriceRecord,
    Scope,
    StateInterval,
    cut_bounds,
    epoch,
    idle_of,
    idle_row,
    model_load_of,
    model_load_row,
    price_of,
    utc,
    utc_or_none,
)
from broker.ledger.folding import (
    COMPACT_BATCH,
    DEMAND_BUCKET_SECONDS,
    ROLLUP_SECONDS,
    demand_cutoff,
    demand_sums,
    energy_cutoff,
    floor_to,
    inside_sql,
    machine_sums,
    share_sql,
    slot_sums,
)

T = TypeVar("T")

log = logging.getLogger(__name__)

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
    # v3: energy older than a day is kept as 15-minute sums per GPU and pool state (see the
    # module's docstring); `slot` is the slot's number (start_ts // 900), NULL for a record
    # as written. `energy_slots` holds the same sums over all GPUs, for whole-machine
    # reports. Rows already there stay as written until the next writes fold them.
    (
        "ALTER TABLE energy ADD COLUMN slot INTEGER",
        """CREATE UNIQUE INDEX energy_rollup
            ON energy (host, gpu_uuid, gpu_index, pool_state, slot) WHERE slot IS NOT NULL""",
        "CREATE INDEX energy_raw ON energy (host, end_ts) WHERE slot IS NULL",
        "CREATE INDEX energy_by_gpu ON energy (host, gpu_index, start_ts)",
        """CREATE TABLE energy_slots (
            host TEXT NOT NULL,
            slot INTEGER NOT NULL,
            pool_state TEXT NOT NULL,
            start_ts REAL NOT NULL,
            end_ts REAL NOT NULL,
            joules REAL NOT NULL,
            overhead_joules REAL NOT NULL,
            PRIMARY KEY (host, slot, pool_state)
        ) WITHOUT ROWID""",
    ),
    # v4: local demand, one row per inference request seen at a gate (`bucket` NULL) until it
    # is older than DEMAND_RAW_RETENTION, then folded into one row per service, outcome and
    # 15-minute bucket (`bucket` = arrival_ts // 900; `count` requests, durations summed).
    (
        """CREATE TABLE demand (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            service TEXT NOT NULL,
            arrival_ts REAL NOT NULL,
            duration_s REAL NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('passed', 'held', 'refused')),
            held_s REAL NOT NULL DEFAULT 0,
            count INTEGER NOT NULL DEFAULT 1,
            bucket INTEGER
        )""",
        "CREATE INDEX demand_by_time ON demand (host, arrival_ts)",
        """CREATE UNIQUE INDEX demand_rollup
            ON demand (host, service, outcome, bucket) WHERE bucket IS NOT NULL""",
    ),
    # v5: models the service watchers saw loaded (Ollama /api/ps, ComfyUI checkpoints), for
    # `gpu-broker sizing`'s model reloads; `gpus` is the service's GPU indices, "0,1".
    (
        """CREATE TABLE model_loads (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            service TEXT NOT NULL,
            ts REAL NOT NULL,
            model TEXT NOT NULL,
            gpus TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX model_loads_by_time ON model_loads (host, ts)",
    ),
    # v6: prices (price_gpu = "market", issue 20): each listing's ask, each rental's price
    # and each market read's median in host terms (with its peer count), USD per GPU-hour.
    (
        """CREATE TABLE prices (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            ts REAL NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('ask', 'rental', 'market')),
            price REAL NOT NULL,
            peers INTEGER
        )""",
        "CREATE INDEX prices_by_time ON prices (host, ts)",
    ),
    # v7: how each GPU idles (eco advice over days): one row per GPU and 15-minute slot,
    # each sample in which the GPU did no work counted by draw, P-state, memory and the
    # processes holding it (JSON objects of counts; see broker.ledger.base.IdleRecord).
    (
        """CREATE TABLE gpu_idle (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            gpu_uuid TEXT NOT NULL,
            gpu_index INTEGER NOT NULL,
            start_ts REAL NOT NULL,
            end_ts REAL NOT NULL,
            samples INTEGER NOT NULL,
            watts TEXT NOT NULL,
            pstates TEXT NOT NULL,
            memory_mb TEXT NOT NULL,
            processes TEXT NOT NULL
        )""",
        "CREATE INDEX gpu_idle_by_time ON gpu_idle (host, start_ts)",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)




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


def _private_file(path: Path) -> None:
    """Create `path` readable by its owner only (0600, whatever the umask), or make an
    existing one so: the ledger holds earnings and the machine's whole history."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        return
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, 0o600)  # someone else's (a report run by another user) is left alone


class SqliteLedger:
    def __init__(self, path: Path, host: str, migrations: Sequence[Migration]) -> None:
        self.path = path
        self._host = host
        self._migrations = migrations
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._conn: sqlite3.Connection | None = None
        self._version = 0
        self._compacted_to: float | None = None
        self._demand_compacted_to: float | None = None
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

    @property
    def reachable(self) -> bool:
        return True  # a local file: a failing write is an error, not an outage

    async def close(self) -> None:
        if self._conn is not None:
            await self._call(self._disconnect)
        self._executor.shutdown(wait=True)

    async def hosts(self) -> list[str]:
        rows = await self._call(
            self._read,
            "SELECT host FROM state_intervals UNION SELECT host FROM energy "
            "UNION SELECT host FROM journal UNION SELECT host FROM earnings ORDER BY 1",
            (),
        )
        return [str(r[0]) for r in rows]

    async def for_host(self, host: str) -> SqliteLedger:
        return await SqliteLedger.open(self.path, host, self._migrations)

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
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.chmod(self.path.parent, 0o700)  # whatever the umask took from mkdir's
            _private_file(self.path)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        except (OSError, sqlite3.Error) as err:
            raise LedgerError(f"cannot open the ledger at {self.path}: {err}") from err
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode survives a crash of the process; only a power cut can
            # lose the last transactions, which the once-a-minute energy flush bounds anyway.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # SQLite gives -wal and -shm the database file's mode; ones left by an older
            # version may be wider.
            for suffix in ("-wal", "-shm"):
                sidecar = self.path.with_name(self.path.name + suffix)
                if sidecar.exists():
                    _private_file(sidecar)
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

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed as a whole, or rolled back and reported as a
        LedgerError."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as err:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise LedgerError(f"ledger write failed: {err}") from err

    def _write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[sqlite3.Cursor]:
        with self._transaction() as db:
            cursors = [db.execute(sql, params) for sql, params in statements]
        return cursors

    def _write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._transaction() as db:
            db.executemany(sql, rows)

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
        ts = epoch(at)
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
                    (epoch(at), self._host),
                )
            ],
        )
        return cursors[0].rowcount

    async def state_intervals(
        self,
        start: datetime,
        end: datetime,
        scope: Scope | None = None,
        subject: str | None = None,
        states: Sequence[str] | None = None,
    ) -> list[StateInterval]:
        found = await self.state_intervals_by_host(
            [self._host], start, end, scope, subject, states
        )
        return found.get(self._host, [])

    async def state_intervals_by_host(
        self,
        hosts: Sequence[str],
        start: datetime,
        end: datetime,
        scope: Scope | None = None,
        subject: str | None = None,
        states: Sequence[str] | None = None,
    ) -> dict[str, list[StateInterval]]:
        """`state_intervals` of each of `hosts` in one query."""
        if not hosts:
            return {}
        sql = (
            "SELECT scope, subject, state, start_ts, end_ts, reason, host FROM state_intervals "
            f"WHERE host IN ({', '.join('?' for _ in hosts)}) "
            "AND start_ts < ? AND (end_ts IS NULL OR end_ts > ?)"
        )
        params: list[Any] = [*hosts, epoch(end), epoch(start)]
        if scope is not None:
            sql += " AND scope = ?"
            params.append(scope)
        if subject is not None:
            sql += " AND subject = ?"
            params.append(subject)
        if states is not None:
            sql += f" AND state IN ({', '.join('?' for _ in states)})"
            params.extend(states)
        rows = await self._call(self._read, sql + " ORDER BY host, start_ts, id", params)
        out: dict[str, list[StateInterval]] = {}
        for r in rows:
            out.setdefault(r["host"], []).append(
                StateInterval(
                    scope=r["scope"],
                    subject=r["subject"],
                    state=r["state"],
                    start=utc(r["start_ts"]),
                    end=utc_or_none(r["end_ts"]),
                    reason=r["reason"],
                    host=r["host"],
                )
            )
        return out

    # -- energy ---------------------------------------------------------------------------

    async def add_energy(self, records: Sequence[EnergyRecord]) -> None:
        if not records:
            return
        await self._call(
            self._write_many,
            "INSERT INTO energy (host, gpu_uuid, gpu_index, pool_state, start_ts, end_ts, "
            "joules, overhead_joules, method) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    self._host,
                    r.gpu_uuid,
                    r.gpu_index,
                    r.pool_state,
                    epoch(r.start),
                    epoch(r.end),
                    r.joules,
                    r.overhead_joules,
                    r.method,
                )
                for r in records
            ],
        )
        newest = max(epoch(r.end) for r in records)
        cutoff = energy_cutoff(newest)
        if self._compacted_to is not None and cutoff <= self._compacted_to:
            return
        try:
            folded = await self._call(self._compact, cutoff, COMPACT_BATCH)
        except LedgerError as err:
            # The records are written; folding them is only housekeeping, tried again with
            # the next write. Raising here would make the caller write them a second time.
            log.warning("could not fold old energy records into 15-minute sums: %s", err)
            return
        if folded < COMPACT_BATCH:
            self._compacted_to = cutoff

    async def compact_energy(self, before: datetime) -> int:
        """Fold every record as written that ends by `before` (rounded down to a slot) into
        the 15-minute sums now, instead of as later writes come. Returns how many."""
        cutoff = floor_to(epoch(before), ROLLUP_SECONDS)
        total = 0
        while True:
            folded = await self._call(self._compact, cutoff, COMPACT_BATCH)
            total += folded
            if folded < COMPACT_BATCH:
                return total

    def _compact(self, cutoff: float, limit: int) -> int:
        """Fold up to `limit` records as written that end by `cutoff` into slot sums, and
        delete them, in one transaction. A record spanning slots is shared by time."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, gpu_uuid, gpu_index, pool_state, start_ts, end_ts, joules, "
                "overhead_joules, method FROM energy "
                "WHERE host = ? AND slot IS NULL AND end_ts <= ? ORDER BY end_ts LIMIT ?",
                (self._host, cutoff, limit),
            ).fetchall()
            sums = slot_sums(rows)
            db.executemany(
                "INSERT INTO energy (host, gpu_uuid, gpu_index, pool_state, start_ts, end_ts, "
                "joules, overhead_joules, method, slot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (host, gpu_uuid, gpu_index, pool_state, slot) "
                "WHERE slot IS NOT NULL DO UPDATE SET "
                "start_ts = MIN(start_ts, excluded.start_ts), "
                "end_ts = MAX(end_ts, excluded.end_ts), "
                "joules = joules + excluded.joules, "
                "overhead_joules = overhead_joules + excluded.overhead_joules, "
                "method = CASE WHEN method = excluded.method THEN method ELSE 'mixed' END",
                [
                    (self._host, uuid, index, state, a, b, joules, overhead, method, slot)
                    for (uuid, index, state, slot), (a, b, joules, overhead, method) in (
                        sums.items()
                    )
                ],
            )
            machine = machine_sums(sums)
            db.executemany(
                "INSERT INTO energy_slots (host, slot, pool_state, start_ts, end_ts, joules, "
                "overhead_joules) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (host, slot, pool_state) DO UPDATE SET "
                "start_ts = MIN(start_ts, excluded.start_ts), "
                "end_ts = MAX(end_ts, excluded.end_ts), "
                "joules = joules + excluded.joules, "
                "overhead_joules = overhead_joules + excluded.overhead_joules",
                [
                    (self._host, slot, state, a, b, joules, overhead)
                    for (slot, state), (a, b, joules, overhead) in machine.items()
                ],
            )
            db.executemany("DELETE FROM energy WHERE id = ?", [(row[0],) for row in rows])
        return len(rows)

    async def energy(
        self, start: datetime, end: datetime, gpu_uuid: str | None = None
    ) -> list[EnergyRecord]:
        sql = (
            "SELECT gpu_uuid, gpu_index, pool_state, start_ts, end_ts, joules, overhead_joules, "
            "method, host FROM energy WHERE host = ? AND start_ts < ? AND end_ts > ?"
        )
        params: list[Any] = [self._host, epoch(end), epoch(start)]
        if gpu_uuid is not None:
            sql += " AND gpu_uuid = ?"
            params.append(gpu_uuid)
        rows = await self._call(self._read, sql + " ORDER BY start_ts, id", params)
        return [
            EnergyRecord(
                gpu_uuid=r["gpu_uuid"],
                gpu_index=r["gpu_index"],
                pool_state=r["pool_state"],
                start=utc(r["start_ts"]),
                end=utc(r["end_ts"]),
                joules=r["joules"],
                overhead_joules=r["overhead_joules"],
                method=r["method"],
                host=r["host"],
            )
            for r in rows
        ]

    async def energy_totals(
        self, cuts: Sequence[datetime], gpu_index: int | None = None
    ) -> list[EnergyTotal]:
        totals = await self.energy_totals_by_host([self._host], cuts, gpu_index)
        return totals.get(self._host, [])

    async def energy_totals_by_host(
        self, hosts: Sequence[str], cuts: Sequence[datetime], gpu_index: int | None = None
    ) -> dict[str, list[EnergyTotal]]:
        """`energy_totals` of each of `hosts` (one file rarely holds more than one)."""
        bounds = cut_bounds(cuts)
        out: dict[str, list[EnergyTotal]] = {}
        for host in hosts if len(bounds) >= 2 else ():
            totals = await self._call(self._energy_totals, host, bounds, gpu_index)
            if totals:
                out[host] = totals
        return out

    def _energy_totals(
        self, host: str, bounds: list[float], gpu_index: int | None
    ) -> list[EnergyTotal]:
        # A record can only reach into a span if it ends less than the longest record's
        # length after the span's end (and starts less than that before its start): that
        # bound lets each span be read as one index range. Slot sums are never longer than
        # a slot; records as written are few (the last day).
        [(longest,)] = self._read(
            "SELECT MAX(end_ts - start_ts) FROM energy "
            "WHERE host = ? AND slot IS NULL AND end_ts >= ?",
            (host, bounds[0]),
        )
        raw_reach = float(longest or 0.0)
        reach = max(raw_reach, float(ROLLUP_SECONDS))
        spans = (
            "WITH s (i, a, b) AS MATERIALIZED (SELECT CAST(key AS INTEGER), "
            "json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)) "
        )
        cuts = json.dumps(list(pairwise(bounds)))

        def share(t: str) -> str:
            return share_sql(t, "MIN", "MAX")

        if gpu_index is not None:
            # One GPU: its records as written and its slot sums, by its index.
            rows = self._read(
                spans
                + f"SELECT s.i, e.pool_state, SUM({share('e')} * e.joules), "
                f"SUM({share('e')} * e.overhead_joules), e.gpu_uuid, e.gpu_index "
                "FROM s CROSS JOIN energy AS e INDEXED BY energy_by_gpu "
                "WHERE e.host = ? AND e.gpu_index = ? AND e.start_ts >= s.a - ? "
                f"AND {inside_sql('e')} "
                "GROUP BY s.i, e.pool_state, e.gpu_uuid, e.gpu_index "
                "ORDER BY s.i, e.pool_state, e.gpu_uuid, e.gpu_index",
                (cuts, host, gpu_index, reach),
            )
            return [EnergyTotal(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
        # The machine: records as written (by their end, in the partial index of them) and
        # the machine's slot sums; the per-GPU slot sums hold the same joules and are not read.
        rows = self._read(
            spans
            + "SELECT i, pool_state, SUM(j), SUM(o) FROM ("
            f"SELECT s.i AS i, e.pool_state AS pool_state, {share('e')} * e.joules AS j, "
            f"{share('e')} * e.overhead_joules AS o "
            "FROM s CROSS JOIN energy AS e INDEXED BY energy_raw "
            "WHERE e.host = ? AND e.slot IS NULL AND e.end_ts >= s.a AND e.end_ts < s.b + ? "
            f"AND {inside_sql('e')} "
            "UNION ALL "
            f"SELECT s.i, m.pool_state, {share('m')} * m.joules, "
            f"{share('m')} * m.overhead_joules "
            "FROM s CROSS JOIN energy_slots AS m "
            f"WHERE m.host = ? AND m.slot >= CAST(s.a / {ROLLUP_SECONDS} AS INTEGER) "
            f"AND m.slot <= CAST(s.b / {ROLLUP_SECONDS} AS INTEGER) AND {inside_sql('m')}"
            ") GROUP BY i, pool_state ORDER BY i, pool_state",
            (cuts, host, raw_reach, host),
        )
        return [EnergyTotal(r[0], r[1], r[2], r[3]) for r in rows]

    # -- demand ---------------------------------------------------------------------------

    async def add_demand(self, records: Sequence[DemandRecord]) -> None:
        if not records:
            return
        await self._call(
            self._write_many,
            "INSERT INTO demand (host, service, arrival_ts, duration_s, outcome, held_s, count) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    self._host,
                    r.service,
                    epoch(r.arrival),
                    r.duration_s,
                    r.outcome,
                    r.held_s,
                    r.count,
                )
                for r in records
            ],
        )
        newest = max(epoch(r.arrival) for r in records)
        cutoff = demand_cutoff(newest)
        if self._demand_compacted_to is not None and cutoff <= self._demand_compacted_to:
            return
        try:
            folded = await self._call(self._compact_demand, cutoff, COMPACT_BATCH)
        except LedgerError as err:
            # As for energy: the records are in; folding is housekeeping for a later write.
            log.warning("could not fold old demand records into 15-minute sums: %s", err)
            return
        if folded < COMPACT_BATCH:
            self._demand_compacted_to = cutoff

    async def compact_demand(self, before: datetime) -> int:
        """Fold every request as written that arrived before `before` (rounded down to a
        bucket) now, instead of as later writes come. Returns how many rows were folded."""
        cutoff = floor_to(epoch(before), DEMAND_BUCKET_SECONDS)
        total = 0
        while True:
            folded = await self._call(self._compact_demand, cutoff, COMPACT_BATCH)
            total += folded
            if folded < COMPACT_BATCH:
                return total

    def _compact_demand(self, cutoff: float, limit: int) -> int:
        """Fold up to `limit` requests as written that arrived before `cutoff` into their
        bucket's row (first arrival, summed count, durations and held time) and delete them,
        in one transaction, so every request is in exactly one row."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, service, outcome, arrival_ts, duration_s, held_s, count FROM demand "
                "WHERE host = ? AND bucket IS NULL AND arrival_ts < ? ORDER BY arrival_ts LIMIT ?",
                (self._host, cutoff, limit),
            ).fetchall()
            sums = demand_sums(rows)
            db.executemany(
                "INSERT INTO demand (host, service, outcome, bucket, arrival_ts, duration_s, "
                "held_s, count) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (host, service, outcome, bucket) WHERE bucket IS NOT NULL "
                "DO UPDATE SET arrival_ts = MIN(arrival_ts, excluded.arrival_ts), "
                "duration_s = duration_s + excluded.duration_s, "
                "held_s = held_s + excluded.held_s, count = count + excluded.count",
                [
                    (self._host, service, outcome, bucket, arrival, duration, held, count)
                    for (service, outcome, bucket), (arrival, duration, held, count) in (
                        sums.items()
                    )
                ],
            )
            db.executemany("DELETE FROM demand WHERE id = ?", [(row[0],) for row in rows])
        return len(rows)

    async def add_price(self, record: PriceRecord) -> None:
        await self._call(
            self._write_many,
            "INSERT INTO prices (host, ts, kind, price, peers) VALUES (?, ?, ?, ?, ?)",
            [(self._host, epoch(record.at), record.kind, record.price, record.peers)],
        )

    async def prices(
        self, start: datetime, end: datetime, kind: PriceKind | None = None
    ) -> list[PriceRecord]:
        sql = (
            "SELECT ts, kind, price, peers, host FROM prices "
            "WHERE host = ? AND ts >= ? AND ts < ?"
        )
        params: list[Any] = [self._host, epoch(start), epoch(end)]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        rows = await self._call(self._read, sql + " ORDER BY ts, id", params)
        return [price_of(r) for r in rows]
    # -- idle statistics ------------------------------------------------------------------

    async def add_idle(self, records: Sequence[IdleRecord]) -> None:
        if not records:
            return
        await self._call(
            self._write_many,
            "INSERT INTO gpu_idle (host, gpu_uuid, gpu_index, start_ts, end_ts, samples, "
            "watts, pstates, memory_mb, processes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [idle_row(self._host, r) for r in records],
        )

    async def idle(
        self, start: datetime, end: datetime, gpu_uuid: str | None = None
    ) -> list[IdleRecord]:
        sql = (
            "SELECT gpu_uuid, gpu_index, start_ts, end_ts, samples, watts, pstates, memory_mb, "
            "processes, host FROM gpu_idle WHERE host = ? AND start_ts < ? AND end_ts > ?"
        )
        params: list[Any] = [self._host, epoch(end), epoch(start)]
        if gpu_uuid is not None:
            sql += " AND gpu_uuid = ?"
            params.append(gpu_uuid)
        rows = await self._call(self._read, sql + " ORDER BY start_ts, id", params)
        return [idle_of(r) for r in rows]

    async def demand(
        self, start: datetime, end: datetime, service: str | None = None
    ) -> list[DemandRecord]:
        sql = (
            "SELECT service, arrival_ts, duration_s, outcome, held_s, count, host FROM demand "
            "WHERE host = ? AND arrival_ts >= ? AND arrival_ts < ?"
        )
        params: list[Any] = [self._host, epoch(start), epoch(end)]
        if service is not None:
            sql += " AND service = ?"
            params.append(service)
        return await self._call(self._demand, sql + " ORDER BY arrival_ts, id", params)

    def _demand(self, sql: str, params: Sequence[Any]) -> list[DemandRecord]:
        # Built in the ledger's thread from plain tuples: a month of a large team is some
        # 100 000 rows, which a replay reads whole.
        try:
            rows = self._db.execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise LedgerError(f"ledger read failed: {err}") from err
        zone = UTC
        stamp = datetime.fromtimestamp
        return [
            DemandRecord(
                service, stamp(arrival, zone), duration, cast(DemandOutcome, outcome), held,
                count, host,
            )
            for service, arrival, duration, outcome, held, count, host in rows
        ]  # fmt: skip

    # -- model loads ----------------------------------------------------------------------

    async def add_model_loads(self, records: Sequence[ModelLoad]) -> None:
        if not records:
            return
        await self._call(
            self._write_many,
            "INSERT INTO model_loads (host, service, ts, model, gpus) VALUES (?, ?, ?, ?, ?)",
            [model_load_row(self._host, r) for r in records],
        )

    async def model_loads(
        self, start: datetime, end: datetime, service: str | None = None
    ) -> list[ModelLoad]:
        sql = (
            "SELECT service, ts, model, gpus, host FROM model_loads "
            "WHERE host = ? AND ts >= ? AND ts < ?"
        )
        params: list[Any] = [self._host, epoch(start), epoch(end)]
        if service is not None:
            sql += " AND service = ?"
            params.append(service)
        rows = await self._call(self._read, sql + " ORDER BY ts, id", params)
        return [model_load_of(r) for r in rows]

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
                        epoch(r.updated),
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
                updated=utc(r["updated_ts"]),
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
                        epoch(entry.at),
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
                    (status, outcome, epoch(at), entry_id, self._host),
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
            params.append(epoch(since))
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
                at=utc(r["ts"]),
                kind=r["kind"],
                subject=r["subject"],
                status=r["status"],
                payload=json.loads(r["payload"]),
                outcome=r["outcome"],
                outcome_at=utc_or_none(r["outcome_ts"]),
                host=r["host"],
            )
            for r in rows
        ]
