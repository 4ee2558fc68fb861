"""The shared ledger: one PostgreSQL database for a fleet, every row keyed by host.

Each broker writes its own host's rows and reads them back exactly as the SQLite ledger does
(same tables, same 15-minute folding of old energy and demand, times as epoch seconds), so
one contract suite runs over both. A fleet report reads other hosts' rows by opening the
ledger with their host name (`lock=False`: reading takes no lock).

Why psycopg 3 rather than asyncpg: it goes through libpq, so a service file
(`postgresql:///?service=fleet`), `~/.pgpass` / `PGPASSFILE` and every libpq option and
environment variable work as a DBA expects, with no password in the broker's config; it is
fully typed (mypy --strict) and pipelines `executemany`. asyncpg is faster (measured here:
an hour of 8 GPUs' minute records, 480 rows, in 13 ms against 25 ms; 48 000 rows read in
0.23 s against 0.31 s), but the broker writes 8 rows a minute and its reports read sums, so
neither figure matters next to libpq's configuration.

The schema version lives in `gpu_broker_schema`. `MIGRATIONS[n]` takes the database from
version n to n+1 in one transaction holding a transaction-level advisory lock, so two
brokers starting at once migrate it once.

`lock=True` (the daemon) takes a session-level advisory lock keyed by the host name on its
connection: a second broker claiming the same host on the same database is refused, as a
second one on one state directory is. The server drops it when the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg

from broker.errors import LedgerError, LedgerVersionError
from broker.instance_lock import InstanceLocked
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
from broker.ledger.spool import Completion, Kind, Spool, Spooled, StateChange

log = logging.getLogger(__name__)

T = TypeVar("T")

# The first key of every advisory lock the broker takes ("gpub"); the second is the host's.
LOCK_CLASS = 0x67707562
# The key of the lock migrations take (a host name never hashes to a fixed key on purpose).
MIGRATION_KEY = 0

Migration = Sequence[str]

MIGRATIONS: list[Migration] = [
    # v1: the SQLite ledger's schema at its version 4, keyed by host throughout.
    (
        """CREATE TABLE state_intervals (
            id BIGSERIAL PRIMARY KEY,
            host TEXT NOT NULL,
            scope TEXT NOT NULL CHECK (scope IN ('pool', 'gpu')),
            subject TEXT NOT NULL,
            state TEXT NOT NULL,
            start_ts DOUBLE PRECISION NOT NULL,
            end_ts DOUBLE PRECISION,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        """CREATE UNIQUE INDEX state_intervals_open
            ON state_intervals (host, scope, subject) WHERE end_ts IS NULL""",
        "CREATE INDEX state_intervals_by_time ON state_intervals (host, start_ts)",
        """CREATE TABLE energy (
            id BIGSERIAL PRIMARY KEY,
            host TEXT NOT NULL,
            gpu_uuid TEXT NOT NULL,
            gpu_index INTEGER NOT NULL,
            pool_state TEXT NOT NULL,
            start_ts DOUBLE PRECISION NOT NULL,
            end_ts DOUBLE PRECISION NOT NULL,
            joules DOUBLE PRECISION NOT NULL,
            overhead_joules DOUBLE PRECISION NOT NULL DEFAULT 0,
            method TEXT NOT NULL,
            slot BIGINT
        )""",
        "CREATE INDEX energy_by_time ON energy (host, start_ts)",
        """CREATE UNIQUE INDEX energy_rollup
            ON energy (host, gpu_uuid, gpu_index, pool_state, slot) WHERE slot IS NOT NULL""",
        "CREATE INDEX energy_raw ON energy (host, end_ts) WHERE slot IS NULL",
        "CREATE INDEX energy_by_gpu ON energy (host, gpu_index, start_ts)",
        """CREATE TABLE energy_slots (
            host TEXT NOT NULL,
            slot BIGINT NOT NULL,
            pool_state TEXT NOT NULL,
            start_ts DOUBLE PRECISION NOT NULL,
            end_ts DOUBLE PRECISION NOT NULL,
            joules DOUBLE PRECISION NOT NULL,
            overhead_joules DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (host, slot, pool_state)
        )""",
        """CREATE TABLE earnings (
            host TEXT NOT NULL,
            provider TEXT NOT NULL,
            machine_id TEXT NOT NULL,
            day DATE NOT NULL,
            amount DOUBLE PRECISION NOT NULL,
            currency TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT 'provider' CHECK (source IN ('provider', 'estimate')),
            updated_ts DOUBLE PRECISION NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (host, provider, machine_id, day)
        )""",
        """CREATE TABLE journal (
            id BIGSERIAL PRIMARY KEY,
            host TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL CHECK (status IN ('intent', 'done', 'failed', 'note')),
            payload TEXT NOT NULL DEFAULT '{}',
            outcome TEXT,
            outcome_ts DOUBLE PRECISION
        )""",
        "CREATE INDEX journal_by_status ON journal (host, status, ts)",
        "CREATE INDEX journal_by_time ON journal (host, ts)",
        """CREATE TABLE demand (
            id BIGSERIAL PRIMARY KEY,
            host TEXT NOT NULL,
            service TEXT NOT NULL,
            arrival_ts DOUBLE PRECISION NOT NULL,
            duration_s DOUBLE PRECISION NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('passed', 'held', 'refused')),
            held_s DOUBLE PRECISION NOT NULL DEFAULT 0,
            count INTEGER NOT NULL DEFAULT 1,
            bucket BIGINT
        )""",
        "CREATE INDEX demand_by_time ON demand (host, arrival_ts)",
        """CREATE UNIQUE INDEX demand_rollup
            ON demand (host, service, outcome, bucket) WHERE bucket IS NOT NULL""",
    ),
    # v2: models the service watchers saw loaded (the SQLite ledger's version 5).
    (
        """CREATE TABLE model_loads (
            id BIGSERIAL PRIMARY KEY,
            host TEXT NOT NULL,
            service TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            model TEXT NOT NULL,
            gpus TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX model_loads_by_time ON model_loads (host, ts)",
    ),
    # v3: prices, as the SQLite ledger's version 6.
    (
        """CREATE TABLE prices (
            id BIGSERIAL PRIMARY KEY,
            host TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('ask', 'rental', 'market')),
            price DOUBLE PRECISION NOT NULL,
            peers INTEGER
        )""",
        "CREATE INDEX prices_by_time ON prices (host, ts)",
    ),
    # v4: per-GPU idle statistics, as the SQLite ledger's version 7.
    (
        """CREATE TABLE gpu_idle (
            id BIGSERIAL PRIMARY KEY,
            host TEXT NOT NULL,
            gpu_uuid TEXT NOT NULL,
            gpu_index INTEGER NOT NULL,
            start_ts DOUBLE PRECISION NOT NULL,
            end_ts DOUBLE PRECISION NOT NULL,
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

Conn = psycopg.AsyncConnection[tuple[Any, ...]]




def redact(conninfo: str) -> str:
    """The URL as errors may show it: without a password, should one have slipped in."""
    try:
        return psycopg.conninfo.make_conninfo(conninfo, password=None) if "://" not in (
            conninfo
        ) else _redact_url(conninfo)
    except psycopg.ProgrammingError:
        return "<unparsable conninfo>"


def _redact_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


async def probe(
    conninfo: str, password: str | None = None, connect_timeout: float = 10.0
) -> tuple[int, list[str]]:
    """(schema version, hosts with rows) of the database, changing nothing: what `gpu-broker
    check` reports. Version 0 is a database the broker has not used yet."""
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": int(connect_timeout)}
    if password is not None:
        kwargs["password"] = password
    try:
        async with await psycopg.AsyncConnection.connect(conninfo, **kwargs) as conn:
            cur = await conn.execute("SELECT to_regclass('gpu_broker_schema') IS NOT NULL")
            row = await cur.fetchone()
            if not (row and row[0]):
                return 0, []
            cur = await conn.execute("SELECT version FROM gpu_broker_schema")
            row = await cur.fetchone()
            cur = await conn.execute(
                "SELECT host FROM state_intervals UNION SELECT host FROM energy_slots ORDER BY 1"
            )
            hosts = [str(r[0]) for r in await cur.fetchall()]
    except psycopg.Error as err:
        raise LedgerError(f"cannot use the ledger at {redact(conninfo)}: {err}") from err
    return (int(row[0]) if row else 0), hosts


async def migrate(conn: Conn, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database to the newest version; returns the version it was at."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s::int, %s::int)", (LOCK_CLASS, MIGRATION_KEY)
        )
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS gpu_broker_schema (version INTEGER NOT NULL)"
        )
        cur = await conn.execute("SELECT version FROM gpu_broker_schema")
        row = await cur.fetchone()
        if row is None:
            await conn.execute("INSERT INTO gpu_broker_schema (version) VALUES (0)")
        found = 0 if row is None else int(row[0])
    if found > len(migrations):
        raise LedgerVersionError(
            f"the ledger is at schema version {found}, newer than this gpu-broker knows "
            f"({len(migrations)}); upgrade gpu-broker"
        )
    for version in range(found, len(migrations)):
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s::int, %s::int)", (LOCK_CLASS, MIGRATION_KEY)
            )
            cur = await conn.execute("SELECT version FROM gpu_broker_schema")
            row = await cur.fetchone()
            if row is not None and int(row[0]) > version:
                continue  # another broker migrated it while this one waited for the lock
            for statement in migrations[version]:
                await conn.execute(statement.encode())
            await conn.execute("UPDATE gpu_broker_schema SET version = %s", (version + 1,))
    return found


# After the database is lost, a call tries to reconnect at most this often; in between calls
# fail at once, so a broker with the database away is not slowed by connect timeouts.
RECONNECT_SECONDS = 5.0


class _Session:
    """The one connection a ledger (and its host views) use, reconnected when lost. With
    `claim` it holds that host's advisory lock, taken again on every new connection."""

    def __init__(
        self,
        conn: Conn,
        conninfo: str,
        kwargs: dict[str, Any],
        claim: str | None,
        reconnect_seconds: float | None = None,
    ) -> None:
        self.conn = conn
        self.reconnect_seconds = (
            RECONNECT_SECONDS if reconnect_seconds is None else reconnect_seconds
        )
        self.conninfo = conninfo
        self.kwargs = kwargs
        self.claim = claim
        # One transaction at a time: psycopg serialises single statements, but a
        # transaction spans several awaits.
        self.lock = asyncio.Lock()
        self.retry_at = 0.0
        self.lost = False

    def waiting(self) -> bool:
        """Lost, and too soon to try again."""
        return self.down and asyncio.get_running_loop().time() < self.retry_at

    @property
    def down(self) -> bool:
        """The connection is lost (and not yet made again)."""
        return bool(self.conn.closed or self.conn.broken)

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Conn]:
        async with self.lock:
            conn = await self._usable()
            try:
                yield conn
            finally:
                if (conn.broken or conn.closed) and not self.lost:
                    self.lost = True
                    log.warning("lost the ledger database at %s", redact(self.conninfo))

    async def _usable(self) -> Conn:
        if not (self.conn.closed or self.conn.broken):
            return self.conn
        now = asyncio.get_running_loop().time()
        if now < self.retry_at:
            raise LedgerError(
                f"the ledger database at {redact(self.conninfo)} is unreachable "
                f"(next try in {self.retry_at - now:.0f}s)"
            )
        self.retry_at = now + self.reconnect_seconds
        with contextlib.suppress(psycopg.Error):
            await self.conn.close()
        try:
            conn = await _connect(self.conninfo, self.kwargs)
        except psycopg.Error as err:
            raise LedgerError(
                f"the ledger database at {redact(self.conninfo)} is unreachable: {err}"
            ) from err
        if self.claim is not None:
            try:
                claimed = await _try_claim(conn, self.claim)
            except psycopg.Error as err:
                await conn.close()
                raise LedgerError(f"cannot claim host {self.claim!r} again: {err}") from err
            if not claimed:
                await conn.close()
                raise LedgerError(
                    f"another gpu-broker claimed host name {self.claim!r} while the ledger "
                    "database was away; this one writes nothing more"
                )
        self.conn = conn
        self.retry_at = 0.0
        self.lost = False
        log.info("the ledger database at %s is back", redact(self.conninfo))
        return conn


# Set on every session. The broker's queries are short or read sums, so compiling them
# (JIT) costs more than it saves: half a second of a fleet report's 1.6 s. A fleet report
# groups a million rows by host, span and state: in the default 4 MB the sums spill to disk.
SESSION_SETTINGS = ("SET jit = off", "SET work_mem = '64MB'")


async def _connect(conninfo: str, kwargs: dict[str, Any]) -> Conn:
    conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
    try:
        for setting in SESSION_SETTINGS:
            await conn.execute(setting.encode())
    except BaseException:
        await conn.close()
        raise
    return conn


async def _try_claim(conn: Conn, host: str) -> bool:
    cur = await conn.execute(
        "SELECT pg_try_advisory_lock(%s::int, hashtext(%s))", (LOCK_CLASS, host)
    )
    row = await cur.fetchone()
    return bool(row and row[0])


class PostgresLedger:
    def __init__(
        self,
        session: _Session,
        host: str,
        version: int,
        owns_session: bool = True,
        spool: Spool | None = None,
    ) -> None:
        self._s = session
        self._spool = spool
        self._replaying = asyncio.Lock()
        self._owns_session = owns_session
        self._host = host
        self._version = version
        self._compacted_to: float | None = None
        self._demand_compacted_to: float | None = None
        self._closed = False
        self.migrated_from: int | None = None

    @classmethod
    async def open(
        cls,
        conninfo: str,
        host: str,
        *,
        password: str | None = None,
        lock: bool = False,
        migrations: Sequence[Migration] = MIGRATIONS,
        connect_timeout: float = 10.0,
        reconnect_seconds: float | None = None,
        spool: Path | None = None,
    ) -> PostgresLedger:
        """Connect, migrate, and with `lock` claim `host` (raises `InstanceLocked` when
        another broker holds it). With `spool`, energy and demand that cannot be written
        while the database is away are kept in that file and written when it is back."""
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": int(connect_timeout)}
        if password is not None:
            kwargs["password"] = password
        try:
            conn = await _connect(conninfo, kwargs)
        except psycopg.Error as err:
            raise LedgerError(f"cannot connect to the ledger at {redact(conninfo)}: {err}") from err
        try:
            found = await migrate(conn, migrations)
        except psycopg.Error as err:
            await conn.close()
            raise LedgerError(f"cannot use the ledger at {redact(conninfo)}: {err}") from err
        except BaseException:
            await conn.close()
            raise
        session = _Session(conn, conninfo, kwargs, None, reconnect_seconds)
        ledger = cls(session, host, len(migrations))
        ledger.migrated_from = found
        if lock:
            try:
                await ledger.claim(spool)
            except BaseException:
                await ledger.close()
                raise
        return ledger

    async def claim(self, spool: Path | None = None) -> None:
        """Claim this ledger's host for a running broker (raises `InstanceLocked` when
        another holds it), and with `spool` keep energy and demand on disk while the
        database is away, writing what an earlier outage left there now."""
        async with self._s.use() as conn:
            try:
                claimed = await _try_claim(conn, self._host)
                holder = "" if claimed else await _lock_holder(conn, self._host)
            except psycopg.Error as err:
                raise LedgerError(f"cannot claim host {self._host!r}: {err}") from err
        if not claimed:
            raise InstanceLocked(
                f"another gpu-broker ({holder}) is using host name {self._host!r} on the "
                f"ledger at {redact(self._s.conninfo)}; set broker.host_name to tell them apart"
            )
        self._s.claim = self._host
        if spool is not None:
            self._spool = await Spool.open(spool)
            await self._replay()  # what an outage left before the last stop

    @property
    def schema_version(self) -> int:
        return self._version

    @property
    def host(self) -> str:
        return self._host

    @property
    def reachable(self) -> bool:
        """False from a lost connection until one is made again (at most every
        RECONNECT_SECONDS, by the next call)."""
        return not self._s.down

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owns_session:
                await self._s.conn.close()  # ends the session, and with it the host's lock

    async def for_host(self, host: str) -> PostgresLedger:
        """A view of `host`'s rows on this ledger's connection (no new session, no claim)."""
        self._check_open()
        return PostgresLedger(self._s, host, self._version, owns_session=False)

    async def __aenter__(self) -> PostgresLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def hosts(self) -> list[str]:
        """Every host with rows in the ledger, by name."""
        # From the small tables only: a broker records its pool's state when it starts,
        # before any energy, so every host that wrote anything is in state_intervals.
        # Host by host along the index (a skip scan), not through a year of every host's
        # intervals.
        rows = await self._read(
            "WITH RECURSIVE h (host) AS ("
            "(SELECT host FROM state_intervals ORDER BY host LIMIT 1) UNION ALL "
            "SELECT (SELECT s.host FROM state_intervals AS s WHERE s.host > h.host "
            "ORDER BY s.host LIMIT 1) FROM h WHERE h.host IS NOT NULL) "
            "SELECT host FROM h WHERE host IS NOT NULL UNION SELECT host FROM earnings "
            "ORDER BY 1",
            (),
        )
        return [str(r[0]) for r in rows]

    # -- plumbing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("the ledger is closed")

    async def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        self._check_open()
        async with self._s.use() as conn:
            try:
                cur = await conn.execute(sql.encode(), params)
                return await cur.fetchall()
            except psycopg.Error as err:
                raise LedgerError(f"ledger read failed: {err}") from err

    async def _write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run the statements in one transaction; returns each one's row count."""
        self._check_open()
        counts: list[int] = []
        async with self._s.use() as conn:
            try:
                async with conn.transaction():
                    for sql, params in statements:
                        cur = await conn.execute(sql.encode(), params)
                        counts.append(cur.rowcount)
            except psycopg.Error as err:
                raise LedgerError(f"ledger write failed: {err}") from err
        return counts

    async def _write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._check_open()
        async with self._s.use() as conn:
            try:
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(sql.encode(), rows)
            except psycopg.Error as err:
                raise LedgerError(f"ledger write failed: {err}") from err

    # -- state intervals ------------------------------------------------------------------

    async def record_state(
        self, scope: Scope, subject: str, state: str, at: datetime, reason: str = ""
    ) -> None:
        change = StateChange(scope, subject, state, at, reason)

        async def write() -> int:
            await self._write_state(change)
            return 1

        await self._or_spool("state", [change], write, lose_when_full=True)

    async def _write_state(self, change: StateChange) -> int:
        """Close the interval in force for (scope, subject), or all (scope None), at the
        change's time, and open its state; returns how many were closed."""
        ts = epoch(change.at)
        if change.scope is None:
            [count] = await self._write(
                [
                    (
                        "UPDATE state_intervals SET end_ts = GREATEST(start_ts, %s) "
                        "WHERE host = %s AND end_ts IS NULL",
                        (ts, self._host),
                    )
                ]
            )
            return count
        [count, _] = await self._write(
            [
                (
                    "UPDATE state_intervals SET end_ts = GREATEST(start_ts, %s) "
                    "WHERE host = %s AND scope = %s AND subject = %s AND end_ts IS NULL",
                    (ts, self._host, change.scope, change.subject),
                ),
                (
                    "INSERT INTO state_intervals (host, scope, subject, state, start_ts, reason) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    (self._host, change.scope, change.subject, change.state, ts, change.reason),
                ),
            ]
        )
        return count

    async def close_states(self, at: datetime) -> int:
        """How many intervals were closed (0 when the database is away and the closing
        waits in the spool)."""
        change = StateChange(None, "", "", at)
        closed = await self._or_spool(
            "close_states", [change], lambda: self._write_state(change), lose_when_full=True
        )
        return closed or 0

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
        sql = (
            "SELECT scope, subject, state, start_ts, end_ts, reason, host FROM state_intervals "
            "WHERE host = ANY(%s) AND start_ts < %s AND (end_ts IS NULL OR end_ts > %s)"
        )
        params: list[Any] = [list(hosts), epoch(end), epoch(start)]
        if scope is not None:
            sql += " AND scope = %s"
            params.append(scope)
        if subject is not None:
            sql += " AND subject = %s"
            params.append(subject)
        if states is not None:
            sql += " AND state = ANY(%s)"
            params.append(list(states))
        out: dict[str, list[StateInterval]] = {}
        stamp, zone = datetime.fromtimestamp, UTC  # a year of a fleet is 100 000 rows
        for scope_, subject_, state, start_ts, end_ts, reason, host in await self._read(
            sql + " ORDER BY host, start_ts, id", params
        ):
            out.setdefault(host, []).append(
                StateInterval(
                    cast(Scope, scope_), subject_, state, stamp(start_ts, zone),
                    None if end_ts is None else stamp(end_ts, zone), reason, host,
                )
            )  # fmt: skip
        return out

    # -- energy ---------------------------------------------------------------------------

    async def add_energy(self, records: Sequence[EnergyRecord]) -> None:
        if not records:
            return

        async def write() -> bool:
            await self._insert_energy(records)
            return True

        if await self._or_spool("energy", records, write):
            await self._fold_energy(records)

    async def _or_spool(
        self,
        kind: Kind,
        records: Sequence[Spooled],
        write: Callable[[], Awaitable[T]],
        *,
        lose_when_full: bool = False,
    ) -> T | None:
        """`write()` now; or, with a spool, while the database is away (or older rows still
        wait in the spool, so the order holds), keep `records` there and return None.

        A full spool raises LedgerError (energy and demand stay in the caller's memory);
        with `lose_when_full` the records are dropped instead, with an error in the log."""
        if self._spool is None:
            return await write()
        if await self._replay():
            try:
                return await write()
            except LedgerError:
                if not self._s.down:
                    raise
        try:
            await self._spool.put(kind, records)
        except LedgerError as err:
            if not lose_when_full:
                raise
            log.error("lost %d ledger row(s) (%s): %s", len(records), kind, err)
        return None

    async def _replay(self) -> bool:
        """Write what the spool holds, oldest first; false while the database is still
        away, true when the spool is empty. Rows the database refuses (not for being away)
        are dropped with an error in the log, so one bad row cannot hold back the rest."""
        spool = self._spool
        if spool is None or not spool.pending:
            return True
        if self._s.waiting():
            return False  # not yet time to try the database again
        # One replay at a time: the energy, demand and scheduler's writes all come here,
        # and two taking the same rows would write them twice.
        async with self._replaying:
            return await self._replay_spool(spool)

    async def _replay_spool(self, spool: Spool) -> bool:
        while spool.pending:
            rows = await spool.take()
            written: list[int] = []
            for group in _runs(rows):
                try:
                    await self._write_spooled(group)
                except LedgerError as err:
                    if self._s.down:
                        await spool.done(written)
                        return False
                    log.error("spooled ledger rows refused by the database, dropped: %s", err)
                written.extend(row_id for row_id, _, _ in group)
            await spool.done(written)
            log.info("wrote %d spooled ledger rows", len(written))
        return True

    async def _write_spooled(self, group: Sequence[tuple[int, Kind, Spooled]]) -> None:
        """One run of spooled rows: a batch of energy or demand, or one other row."""
        kind = group[0][1]
        records = [record for _, _, record in group]
        if kind == "energy":
            await self._insert_energy(cast(list[EnergyRecord], records))
        elif kind == "demand":
            await self._insert_demand(cast(list[DemandRecord], records))
        elif kind in ("state", "close_states"):
            await self._write_state(cast(StateChange, records[0]))
        elif kind == "note":
            await self._insert_journal(cast(JournalEntry, records[0]))
        elif kind == "complete":
            done = cast(Completion, records[0])
            if not await self._write_complete(done):
                log.warning("journal entry %d was no longer an open intent", done.entry_id)

    async def _insert_energy(self, records: Sequence[EnergyRecord]) -> None:
        await self._write_many(
            "INSERT INTO energy (host, gpu_uuid, gpu_index, pool_state, start_ts, end_ts, "
            "joules, overhead_joules, method) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
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

    async def _fold_energy(self, records: Sequence[EnergyRecord]) -> None:
        newest = max(epoch(r.end) for r in records)
        cutoff = energy_cutoff(newest)
        if self._compacted_to is not None and cutoff <= self._compacted_to:
            return
        try:
            folded = await self._compact(cutoff, COMPACT_BATCH)
        except LedgerError as err:
            # The records are in; folding is housekeeping a later write tries again.
            log.warning("could not fold old energy records into 15-minute sums: %s", err)
            return
        if folded < COMPACT_BATCH:
            self._compacted_to = cutoff

    async def compact_energy(self, before: datetime) -> int:
        """Fold every record as written that ends by `before` (rounded down to a slot) now.
        Returns how many."""
        cutoff = floor_to(epoch(before), ROLLUP_SECONDS)
        total = 0
        while True:
            folded = await self._compact(cutoff, COMPACT_BATCH)
            total += folded
            if folded < COMPACT_BATCH:
                return total

    async def _compact(self, cutoff: float, limit: int) -> int:
        """As SqliteLedger._compact: fold up to `limit` records as written that end by
        `cutoff` into slot sums and delete them, in one transaction."""
        self._check_open()
        async with self._s.use() as conn:
            try:
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.execute(
                        b"SELECT id, gpu_uuid, gpu_index, pool_state, start_ts, end_ts, joules, "
                        b"overhead_joules, method FROM energy "
                        b"WHERE host = %s AND slot IS NULL AND end_ts <= %s "
                        b"ORDER BY end_ts LIMIT %s FOR UPDATE",
                        (self._host, cutoff, limit),
                    )
                    rows = await cur.fetchall()
                    if not rows:
                        return 0
                    sums = slot_sums(rows)
                    await cur.executemany(
                        b"INSERT INTO energy (host, gpu_uuid, gpu_index, pool_state, start_ts, "
                        b"end_ts, joules, overhead_joules, method, slot) "
                        b"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                        b"ON CONFLICT (host, gpu_uuid, gpu_index, pool_state, slot) "
                        b"WHERE slot IS NOT NULL DO UPDATE SET "
                        b"start_ts = LEAST(energy.start_ts, excluded.start_ts), "
                        b"end_ts = GREATEST(energy.end_ts, excluded.end_ts), "
                        b"joules = energy.joules + excluded.joules, "
                        b"overhead_joules = energy.overhead_joules + excluded.overhead_joules, "
                        b"method = CASE WHEN energy.method = excluded.method "
                        b"THEN energy.method ELSE 'mixed' END",
                        [
                            (self._host, uuid, index, state, a, b, joules, overhead, method, slot)
                            for (uuid, index, state, slot), (a, b, joules, overhead, method) in (
                                sums.items()
                            )
                        ],
                    )
                    machine = machine_sums(sums)
                    await cur.executemany(
                        b"INSERT INTO energy_slots (host, slot, pool_state, start_ts, end_ts, "
                        b"joules, overhead_joules) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                        b"ON CONFLICT (host, slot, pool_state) DO UPDATE SET "
                        b"start_ts = LEAST(energy_slots.start_ts, excluded.start_ts), "
                        b"end_ts = GREATEST(energy_slots.end_ts, excluded.end_ts), "
                        b"joules = energy_slots.joules + excluded.joules, "
                        b"overhead_joules = energy_slots.overhead_joules "
                        b"+ excluded.overhead_joules",
                        [
                            (self._host, slot, state, a, b, joules, overhead)
                            for (slot, state), (a, b, joules, overhead) in machine.items()
                        ],
                    )
                    await cur.execute(
                        b"DELETE FROM energy WHERE id = ANY(%s)", ([row[0] for row in rows],)
                    )
            except psycopg.Error as err:
                raise LedgerError(f"ledger write failed: {err}") from err
        return len(rows)

    async def energy(
        self, start: datetime, end: datetime, gpu_uuid: str | None = None
    ) -> list[EnergyRecord]:
        sql = (
            "SELECT gpu_uuid, gpu_index, pool_state, start_ts, end_ts, joules, overhead_joules, "
            "method, host FROM energy WHERE host = %s AND start_ts < %s AND end_ts > %s"
        )
        params: list[Any] = [self._host, epoch(end), epoch(start)]
        if gpu_uuid is not None:
            sql += " AND gpu_uuid = %s"
            params.append(gpu_uuid)
        rows = await self._read(sql + " ORDER BY start_ts, id", params)
        return [
            EnergyRecord(
                gpu_uuid=r[0],
                gpu_index=r[1],
                pool_state=r[2],
                start=utc(r[3]),
                end=utc(r[4]),
                joules=r[5],
                overhead_joules=r[6],
                method=r[7],
                host=r[8],
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
        """`energy_totals` of each of `hosts` in one query (a fleet report's energy)."""
        bounds = cut_bounds(cuts)
        if len(bounds) < 2 or not hosts:
            return {}
        names = list(hosts)
        starts, ends = bounds[:-1], bounds[1:]
        # As in SQLite: a record reaches into a span only if it starts less than the longest
        # record's length before the span's start, so each span is one index range.
        [(longest,)] = await self._read(
            "SELECT MAX(end_ts - start_ts) FROM energy "
            "WHERE host = ANY(%s) AND slot IS NULL AND end_ts >= %s",
            (names, bounds[0]),
        )
        raw_reach = float(longest or 0.0)
        reach = max(raw_reach, float(ROLLUP_SECONDS))
        spans = (
            "WITH s (i, a, b) AS (SELECT (n - 1)::int, a, b "
            "FROM unnest(%s::float8[], %s::float8[]) WITH ORDINALITY AS t (a, b, n)) "
        )

        def share(t: str) -> str:
            return share_sql(t, "LEAST", "GREATEST")

        out: dict[str, list[EnergyTotal]] = {}
        if gpu_index is not None:
            rows = await self._read(
                spans
                + f"SELECT e.host, s.i, e.pool_state, SUM({share('e')} * e.joules), "
                f"SUM({share('e')} * e.overhead_joules), e.gpu_uuid, e.gpu_index "
                "FROM s JOIN energy AS e ON e.host = ANY(%s) AND e.gpu_index = %s "
                f"AND e.start_ts >= s.a - %s AND {inside_sql('e')} "
                "GROUP BY e.host, s.i, e.pool_state, e.gpu_uuid, e.gpu_index "
                "ORDER BY e.host, s.i, e.pool_state, e.gpu_uuid, e.gpu_index",
                (starts, ends, names, gpu_index, reach),
            )
            for r in rows:
                out.setdefault(r[0], []).append(EnergyTotal(r[1], r[2], r[3], r[4], r[5], r[6]))
            return out
        # The machine: records as written (by their end, in the partial index of them), and
        # the slot sums span by span (small sorted groups per span, rather than one hash of
        # a fleet-year's million rows). A slot sum lies within its slot, so a span from one
        # slot boundary to another (most are: every UTC offset is a multiple of 15 minutes)
        # holds its slots' sums whole, and needs no sharing by time.
        aligned = [
            k for k, (x, y) in enumerate(zip(starts, ends, strict=True))
            if x % ROLLUP_SECONDS == 0 and y % ROLLUP_SECONDS == 0
        ]  # fmt: skip
        ragged = sorted(set(range(len(starts))) - set(aligned))
        rows = await self._read(
            "WITH s (i, a, b) AS (SELECT i, a, b "
            "FROM unnest(%s::int[], %s::float8[], %s::float8[]) AS t (i, a, b)), "
            "w (i, a, b) AS (SELECT i, a, b "
            "FROM unnest(%s::int[], %s::float8[], %s::float8[]) AS t (i, a, b)) "
            # (a span can have both records as written and slot sums: the day being folded)
            "SELECT host, i, pool_state, SUM(j), SUM(o) FROM ("
            "SELECT host, i, pool_state, SUM(j) AS j, SUM(o) AS o FROM ("
            f"SELECT e.host AS host, s.i AS i, e.pool_state AS pool_state, "
            f"{share('e')} * e.joules AS j, {share('e')} * e.overhead_joules AS o "
            "FROM s JOIN energy AS e ON e.host = ANY(%s) AND e.slot IS NULL "
            f"AND e.end_ts >= s.a AND e.end_ts < s.b + %s AND {inside_sql('e')} "
            ") AS u GROUP BY host, i, pool_state "
            "UNION ALL "
            "SELECT g.host, w.i, g.pool_state, g.j, g.o FROM w CROSS JOIN LATERAL ("
            "SELECT m.host, m.pool_state, SUM(m.joules) AS j, SUM(m.overhead_joules) AS o "
            "FROM energy_slots AS m WHERE m.host = ANY(%s) "
            f"AND m.slot >= (w.a / {ROLLUP_SECONDS})::bigint "
            f"AND m.slot < (w.b / {ROLLUP_SECONDS})::bigint "
            "GROUP BY m.host, m.pool_state) AS g "
            "UNION ALL "
            "SELECT m.host, s.i, m.pool_state, "
            f"SUM({share('m')} * m.joules), SUM({share('m')} * m.overhead_joules) "
            "FROM s JOIN energy_slots AS m ON s.i = ANY(%s) AND m.host = ANY(%s) "
            f"AND m.slot >= floor(s.a / {ROLLUP_SECONDS})::bigint "
            f"AND m.slot <= floor(s.b / {ROLLUP_SECONDS})::bigint AND {inside_sql('m')} "
            "GROUP BY m.host, s.i, m.pool_state"
            ') AS v GROUP BY host, i, pool_state ORDER BY host, i, pool_state COLLATE "C"',
            (
                list(range(len(starts))), starts, ends,
                aligned, [starts[k] for k in aligned], [ends[k] for k in aligned],
                names, raw_reach, names, ragged, names,
            ),
        )  # fmt: skip
        for host, i, state, joules, overhead in rows:
            out.setdefault(host, []).append(EnergyTotal(i, state, joules, overhead))
        return out

    # -- demand ---------------------------------------------------------------------------

    async def add_demand(self, records: Sequence[DemandRecord]) -> None:
        if not records:
            return

        async def write() -> bool:
            await self._insert_demand(records)
            return True

        if await self._or_spool("demand", records, write):
            await self._fold_demand(records)

    async def _insert_demand(self, records: Sequence[DemandRecord]) -> None:
        await self._write_many(
            "INSERT INTO demand (host, service, arrival_ts, duration_s, outcome, held_s, count) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (self._host, r.service, epoch(r.arrival), r.duration_s, r.outcome, r.held_s,
                 r.count)
                for r in records
            ],
        )  # fmt: skip

    async def _fold_demand(self, records: Sequence[DemandRecord]) -> None:
        newest = max(epoch(r.arrival) for r in records)
        cutoff = demand_cutoff(newest)
        if self._demand_compacted_to is not None and cutoff <= self._demand_compacted_to:
            return
        try:
            folded = await self._compact_demand(cutoff, COMPACT_BATCH)
        except LedgerError as err:
            log.warning("could not fold old demand records into 15-minute sums: %s", err)
            return
        if folded < COMPACT_BATCH:
            self._demand_compacted_to = cutoff

    async def compact_demand(self, before: datetime) -> int:
        cutoff = floor_to(epoch(before), DEMAND_BUCKET_SECONDS)
        total = 0
        while True:
            folded = await self._compact_demand(cutoff, COMPACT_BATCH)
            total += folded
            if folded < COMPACT_BATCH:
                return total

    async def _compact_demand(self, cutoff: float, limit: int) -> int:
        self._check_open()
        async with self._s.use() as conn:
            try:
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.execute(
                        b"SELECT id, service, outcome, arrival_ts, duration_s, held_s, count "
                        b"FROM demand WHERE host = %s AND bucket IS NULL AND arrival_ts < %s "
                        b"ORDER BY arrival_ts LIMIT %s FOR UPDATE",
                        (self._host, cutoff, limit),
                    )
                    rows = await cur.fetchall()
                    if not rows:
                        return 0
                    sums = demand_sums(rows)
                    await cur.executemany(
                        b"INSERT INTO demand (host, service, outcome, bucket, arrival_ts, "
                        b"duration_s, held_s, count) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                        b"ON CONFLICT (host, service, outcome, bucket) WHERE bucket IS NOT NULL "
                        b"DO UPDATE SET "
                        b"arrival_ts = LEAST(demand.arrival_ts, excluded.arrival_ts), "
                        b"duration_s = demand.duration_s + excluded.duration_s, "
                        b"held_s = demand.held_s + excluded.held_s, "
                        b"count = demand.count + excluded.count",
                        [
                            (self._host, service, outcome, bucket, arrival, duration, held, count)
                            for (service, outcome, bucket), (arrival, duration, held, count) in (
                                sums.items()
                            )
                        ],
                    )
                    await cur.execute(
                        b"DELETE FROM demand WHERE id = ANY(%s)", ([row[0] for row in rows],)
                    )
            except psycopg.Error as err:
                raise LedgerError(f"ledger write failed: {err}") from err
        return len(rows)

    async def add_price(self, record: PriceRecord) -> None:
        await self._write(
            [
                (
                    "INSERT INTO prices (host, ts, kind, price, peers) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (self._host, epoch(record.at), record.kind, record.price, record.peers),
                )
            ]
        )

    async def prices(
        self, start: datetime, end: datetime, kind: PriceKind | None = None
    ) -> list[PriceRecord]:
        sql = (
            "SELECT ts, kind, price, peers, host FROM prices "
            "WHERE host = %s AND ts >= %s AND ts < %s"
        )
        params: list[Any] = [self._host, epoch(start), epoch(end)]
        if kind is not None:
            sql += " AND kind = %s"
            params.append(kind)
        rows = await self._read(sql + " ORDER BY ts, id", params)
        return [price_of(r) for r in rows]
    # -- idle statistics ------------------------------------------------------------------

    async def add_idle(self, records: Sequence[IdleRecord]) -> None:
        if not records:
            return
        await self._write_many(
            "INSERT INTO gpu_idle (host, gpu_uuid, gpu_index, start_ts, end_ts, samples, "
            "watts, pstates, memory_mb, processes) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [idle_row(self._host, r) for r in records],
        )

    async def idle(
        self, start: datetime, end: datetime, gpu_uuid: str | None = None
    ) -> list[IdleRecord]:
        sql = (
            "SELECT gpu_uuid, gpu_index, start_ts, end_ts, samples, watts, pstates, memory_mb, "
            "processes, host FROM gpu_idle WHERE host = %s AND start_ts < %s AND end_ts > %s"
        )
        params: list[Any] = [self._host, epoch(end), epoch(start)]
        if gpu_uuid is not None:
            sql += " AND gpu_uuid = %s"
            params.append(gpu_uuid)
        rows = await self._read(sql + " ORDER BY start_ts, id", params)
        return [idle_of(r) for r in rows]

    async def demand(
        self, start: datetime, end: datetime, service: str | None = None
    ) -> list[DemandRecord]:
        sql = (
            "SELECT service, arrival_ts, duration_s, outcome, held_s, count, host FROM demand "
            "WHERE host = %s AND arrival_ts >= %s AND arrival_ts < %s"
        )
        params: list[Any] = [self._host, epoch(start), epoch(end)]
        if service is not None:
            sql += " AND service = %s"
            params.append(service)
        rows = await self._read(sql + " ORDER BY arrival_ts, id", params)
        return [
            DemandRecord(
                service, utc(arrival), duration, cast(DemandOutcome, outcome), held,
                count, host,
            )
            for service, arrival, duration, outcome, held, count, host in rows
        ]  # fmt: skip

    # -- model loads ----------------------------------------------------------------------

    async def add_model_loads(self, records: Sequence[ModelLoad]) -> None:
        if not records:
            return
        await self._write_many(
            "INSERT INTO model_loads (host, service, ts, model, gpus) VALUES (%s, %s, %s, %s, %s)",
            [model_load_row(self._host, r) for r in records],
        )

    async def model_loads(
        self, start: datetime, end: datetime, service: str | None = None
    ) -> list[ModelLoad]:
        sql = (
            "SELECT service, ts, model, gpus, host FROM model_loads "
            "WHERE host = %s AND ts >= %s AND ts < %s"
        )
        params: list[Any] = [self._host, epoch(start), epoch(end)]
        if service is not None:
            sql += " AND service = %s"
            params.append(service)
        rows = await self._read(sql + " ORDER BY ts, id", params)
        return [model_load_of(r) for r in rows]

    # -- earnings -------------------------------------------------------------------------

    async def upsert_earnings(self, records: Sequence[EarningsRecord]) -> int:
        if not records:
            return 0
        counts = await self._write(
            [
                (
                    "INSERT INTO earnings (host, provider, machine_id, day, amount, currency, "
                    "source, updated_ts, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (host, provider, machine_id, day) DO UPDATE SET "
                    "amount = excluded.amount, currency = excluded.currency, "
                    "source = excluded.source, updated_ts = excluded.updated_ts, "
                    "detail = excluded.detail "
                    "WHERE NOT (earnings.source = 'provider' AND excluded.source = 'estimate') "
                    "AND (earnings.amount != excluded.amount OR earnings.source != excluded.source "
                    "OR earnings.currency != excluded.currency "
                    "OR earnings.detail != excluded.detail)",
                    (
                        self._host,
                        r.provider,
                        r.machine_id,
                        r.day,
                        r.amount,
                        r.currency,
                        r.source,
                        epoch(r.updated),
                        json.dumps(r.detail, sort_keys=True),
                    ),
                )
                for r in records
            ]
        )
        return sum(counts)

    async def earnings(self, first_day: date, last_day: date) -> list[EarningsRecord]:
        rows = await self._read(
            "SELECT provider, machine_id, day, amount, currency, source, updated_ts, detail, host "
            "FROM earnings WHERE host = %s AND day >= %s AND day <= %s "
            "ORDER BY day, provider, machine_id",
            (self._host, first_day, last_day),
        )
        return [
            EarningsRecord(
                provider=r[0],
                machine_id=r[1],
                day=r[2],
                amount=r[3],
                currency=r[4],
                source=cast(EarningsSource, r[5]),
                updated=utc(r[6]),
                detail=json.loads(r[7]),
                host=r[8],
            )
            for r in rows
        ]

    # -- journal --------------------------------------------------------------------------

    async def journal(self, entry: JournalEntry) -> int:
        """The entry's id. An intent is written now or not at all (LedgerError); a note is
        kept in the spool while the database is away, its id then 0."""
        if entry.status != "note":
            return await self._insert_journal(entry)
        entry_id = await self._or_spool(
            "note", [entry], lambda: self._insert_journal(entry), lose_when_full=True
        )
        return entry_id or 0

    async def _insert_journal(self, entry: JournalEntry) -> int:
        self._check_open()
        async with self._s.use() as conn:
            try:
                cur = await conn.execute(
                    b"INSERT INTO journal (host, ts, kind, subject, status, payload) "
                    b"VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    (
                        self._host,
                        epoch(entry.at),
                        entry.kind,
                        entry.subject,
                        entry.status,
                        json.dumps(entry.payload, sort_keys=True, default=str),
                    ),
                )
                row = await cur.fetchone()
            except psycopg.Error as err:
                raise LedgerError(f"ledger write failed: {err}") from err
        assert row is not None
        return int(row[0])

    async def complete(
        self, entry_id: int, status: JournalStatus, at: datetime, outcome: str = ""
    ) -> None:
        """Kept in the spool while the database is away, like a note."""
        if status not in ("done", "failed"):
            raise ValueError("an intent is completed as 'done' or 'failed'")
        done = Completion(entry_id, status, at, outcome)
        if await self._or_spool(
            "complete", [done], lambda: self._write_complete(done), lose_when_full=True
        ) is False:  # fmt: skip
            raise LedgerError(f"journal entry {entry_id} is not an open intent")

    async def _write_complete(self, done: Completion) -> bool:
        """False when the entry is not an open intent of this host."""
        [count] = await self._write(
            [
                (
                    "UPDATE journal SET status = %s, outcome = %s, outcome_ts = %s "
                    "WHERE id = %s AND host = %s AND status = 'intent'",
                    (done.status, done.outcome, epoch(done.at), done.entry_id, self._host),
                )
            ]
        )
        return count == 1

    async def journal_entries(
        self,
        since: datetime | None = None,
        status: JournalStatus | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[JournalEntry]:
        sql = (
            "SELECT id, ts, kind, subject, status, payload, outcome, outcome_ts, host "
            "FROM journal WHERE host = %s"
        )
        params: list[Any] = [self._host]
        if since is not None:
            sql += " AND ts >= %s"
            params.append(epoch(since))
        if status is not None:
            sql += " AND status = %s"
            params.append(status)
        if kinds:
            sql += " AND kind = ANY(%s)"
            params.append(list(kinds))
        rows = await self._read(sql + " ORDER BY ts, id", params)
        return [
            JournalEntry(
                id=r[0],
                at=utc(r[1]),
                kind=r[2],
                subject=r[3],
                status=r[4],
                payload=json.loads(r[5]),
                outcome=r[6],
                outcome_at=utc_or_none(r[7]),
                host=r[8],
            )
            for r in rows
        ]


def _runs(
    rows: Sequence[tuple[int, Kind, Spooled]],
) -> list[list[tuple[int, Kind, Spooled]]]:
    """Spooled rows in order, consecutive energy (or demand) rows together as one batch."""
    runs: list[list[tuple[int, Kind, Spooled]]] = []
    for row in rows:
        if runs and row[1] == runs[-1][0][1] and row[1] in ("energy", "demand"):
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


async def _lock_holder(conn: Conn, host: str) -> str:
    """Who holds `host`'s lock, as the server knows them (address and pid), for the error."""
    try:
        cur = await conn.execute(
            "SELECT a.client_addr::text, a.pid FROM pg_locks AS l "
            "JOIN pg_stat_activity AS a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = %s::oid "
            "AND l.objid = hashtext(%s)::oid AND l.granted LIMIT 1",
            (LOCK_CLASS, host),
        )
        row = await cur.fetchone()
    except psycopg.Error:
        return "holder unknown"
    if row is None:
        return "holder unknown"
    return f"server backend pid {row[1]}, from {row[0] or 'a local socket'}"
