"""`gpu-broker ledger copy`: move a SQLite ledger's history into the shared PostgreSQL one.

Idempotent: the target remembers, per source host and table, the highest source row id it
has taken (`gpu_broker_copied`), in the same transaction as the rows, so a copy interrupted
or run twice adds each row exactly once. Tables without row ids (the machine's energy slot
sums, earnings) have natural keys and are inserted with ON CONFLICT DO NOTHING. Rows keep
the host they were written under. The broker must be stopped (the caller holds the state
directory's lock): rows folded while copying would otherwise be counted twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import psycopg

from broker.errors import LedgerError
from broker.ledger.postgres import PostgresLedger
from broker.ledger.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA

BATCH = 5000

# (table, columns copied as they are). Tables with an `id` are copied by id.
_BY_ID: list[tuple[str, tuple[str, ...]]] = [
    ("state_intervals", ("host", "scope", "subject", "state", "start_ts", "end_ts", "reason")),
    ("energy", ("host", "gpu_uuid", "gpu_index", "pool_state", "start_ts", "end_ts", "joules",
                "overhead_joules", "method", "slot")),
    ("journal", ("host", "ts", "kind", "subject", "status", "payload", "outcome",
                 "outcome_ts")),
    ("demand", ("host", "service", "arrival_ts", "duration_s", "outcome", "held_s", "count",
                "bucket")),
    ("model_loads", ("host", "service", "ts", "model", "gpus")),
    ("prices", ("host", "ts", "kind", "price", "peers")),
    ("gpu_idle", ("host", "gpu_uuid", "gpu_index", "start_ts", "end_ts", "samples", "watts",
                  "pstates", "memory_mb", "processes")),
]  # fmt: skip
_BY_KEY: list[tuple[str, tuple[str, ...]]] = [
    ("energy_slots", ("host", "slot", "pool_state", "start_ts", "end_ts", "joules",
                      "overhead_joules")),
    ("earnings", ("host", "provider", "machine_id", "day", "amount", "currency", "source",
                  "updated_ts", "detail")),
]  # fmt: skip

Progress = Callable[[str, int, int], None]  # table, rows copied so far, rows in all


@dataclass
class CopyResult:
    copied: dict[str, int]  # rows added, by table
    skipped: dict[str, int]  # rows the target had already, by table


async def copy_ledger(
    source: Path, target: PostgresLedger, progress: Progress | None = None
) -> CopyResult:
    """Copy every row of the SQLite ledger at `source` into `target`'s database."""
    conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version != SQLITE_SCHEMA:
            raise LedgerError(
                f"the ledger {source} is at schema version {version}; run this gpu-broker "
                f"once on it (it migrates to {SQLITE_SCHEMA}) before copying"
            )
        result = CopyResult({}, {})
        pg = target._s.conn
        await pg.execute(
            b"CREATE TABLE IF NOT EXISTS gpu_broker_copied (host TEXT NOT NULL, "
            b"tbl TEXT NOT NULL, last_id BIGINT NOT NULL, PRIMARY KEY (host, tbl))"
        )
        for table, columns in _BY_ID:
            await _copy_by_id(conn, pg, table, columns, result, progress)
        for table, columns in _BY_KEY:
            await _copy_by_key(conn, pg, table, columns, result, progress)
        return result
    except psycopg.Error as err:
        raise LedgerError(f"ledger copy failed: {err}") from err
    finally:
        conn.close()


async def _copy_by_id(
    src: sqlite3.Connection,
    pg: psycopg.AsyncConnection[tuple[Any, ...]],
    table: str,
    columns: tuple[str, ...],
    result: CopyResult,
    progress: Progress | None,
) -> None:
    total = int(src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    cols = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    copied = skipped = 0
    hosts = [str(h) for (h,) in src.execute(f"SELECT DISTINCT host FROM {table}")]
    for host in hosts:
        cur = await pg.execute(
            b"SELECT last_id FROM gpu_broker_copied WHERE host = %s AND tbl = %s", (host, table)
        )
        row = await cur.fetchone()
        last = int(row[0]) if row else 0
        skipped += int(
            src.execute(
                f"SELECT COUNT(*) FROM {table} WHERE host = ? AND id <= ?", (host, last)
            ).fetchone()[0]
        )
        while True:
            rows = src.execute(
                f"SELECT id, {cols} FROM {table} WHERE host = ? AND id > ? ORDER BY id LIMIT ?",
                (host, last, BATCH),
            ).fetchall()
            if not rows:
                break
            async with pg.transaction(), pg.cursor() as c:
                await c.executemany(
                    f"INSERT INTO {table} ({cols}) VALUES ({marks})".encode(),
                    [r[1:] for r in rows],
                )
                last = int(rows[-1][0])
                await c.execute(
                    b"INSERT INTO gpu_broker_copied (host, tbl, last_id) VALUES (%s, %s, %s) "
                    b"ON CONFLICT (host, tbl) DO UPDATE SET last_id = excluded.last_id",
                    (host, table, last),
                )
            copied += len(rows)
            if progress is not None:
                progress(table, copied + skipped, total)
    if progress is not None and copied == 0:
        progress(table, skipped, total)
    result.copied[table] = copied
    result.skipped[table] = skipped


async def _copy_by_key(
    src: sqlite3.Connection,
    pg: psycopg.AsyncConnection[tuple[Any, ...]],
    table: str,
    columns: tuple[str, ...],
    result: CopyResult,
    progress: Progress | None,
) -> None:
    total = int(src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    cols = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    copied = done = 0
    cursor = src.execute(f"SELECT {cols} FROM {table}")
    day = columns.index("day") if "day" in columns else -1
    sql = f"INSERT INTO {table} ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING".encode()
    while rows := cursor.fetchmany(BATCH):
        async with pg.transaction(), pg.cursor() as c:
            for r in rows:
                values = list(r)
                if day >= 0:  # SQLite keeps the day as ISO text, PostgreSQL as a date
                    values[day] = date.fromisoformat(values[day])
                await c.execute(sql, values)
                copied += max(c.rowcount, 0)
        done += len(rows)
        if progress is not None:
            progress(table, done, total)
    if progress is not None and total == 0:
        progress(table, 0, 0)
    result.copied[table] = copied
    result.skipped[table] = total - copied
