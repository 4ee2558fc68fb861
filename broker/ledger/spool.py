"""The shared ledger's local spool: what the broker writes while the database is
unreachable, kept on disk and written to it, in the order it came, when it answers again.

A SQLite file in the state directory (`ledger-spool.sqlite3`), so what happened during an
outage survives a restart of the broker too: energy records, local requests, state changes
(`record_state`, `close_states`), journal notes and the outcomes of intents journaled
before the outage. Journal intents never go here: the broker must not act on a journal it
could not write (SPEC invariant 4). Bounded: past `limit` rows a new batch is refused with a
LedgerError rather than the disk filled (energy and demand then stay in the caller's
memory, itself bounded; a state change or note is dropped with an error in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast

from broker.errors import LedgerError
from broker.ledger.base import (
    DemandRecord,
    EnergyRecord,
    JournalEntry,
    JournalStatus,
    Scope,
    epoch,
    utc_or_none,
)

SPOOL_FILE = "ledger-spool.sqlite3"
# About two months of an 8-GPU server's minute records, or a large team's requests.
SPOOL_LIMIT = 500_000

Kind = Literal["energy", "demand", "state", "close_states", "note", "complete"]


@dataclass(frozen=True)
class StateChange:
    """A `record_state` call (`scope` None: `close_states`)."""

    scope: Scope | None
    subject: str
    state: str
    at: datetime
    reason: str = ""


@dataclass(frozen=True)
class Completion:
    """A `complete` call on an intent journaled before the outage."""

    entry_id: int
    status: JournalStatus
    at: datetime
    outcome: str = ""


Spooled = EnergyRecord | DemandRecord | StateChange | JournalEntry | Completion


def _encode(record: Spooled) -> str:
    data = asdict(record)
    for key, value in data.items():
        if isinstance(value, datetime):
            data[key] = epoch(value)  # a naive time is refused here as online
    return json.dumps(data, sort_keys=True, default=str)


def _times(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    for key in keys:
        d[key] = utc_or_none(d.get(key))
    return d


def _decode(kind: str, text: str) -> Spooled:
    d: dict[str, Any] = json.loads(text)
    if kind == "energy":
        return EnergyRecord(**_times(d, "start", "end"))
    if kind == "demand":
        return DemandRecord(**_times(d, "arrival"))
    if kind in ("state", "close_states"):
        return StateChange(**_times(d, "at"))
    if kind == "note":
        return JournalEntry(**_times(d, "at", "outcome_at"))
    if kind == "complete":
        return Completion(**_times(d, "at"))
    raise LedgerError(f"the ledger spool holds a row of an unknown kind {kind!r}")


class Spool:
    def __init__(self, path: Path, limit: int = SPOOL_LIMIT) -> None:
        self.path = path
        self.limit = limit
        self.pending = 0  # rows in the file, as last counted

    @classmethod
    async def open(cls, path: Path, limit: int = SPOOL_LIMIT) -> Spool:
        spool = cls(path, limit)
        await asyncio.to_thread(spool._setup)
        return spool

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, timeout=10)

    def _setup(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
            with contextlib.closing(self._connect()) as conn:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY, "
                    "kind TEXT NOT NULL, row TEXT NOT NULL)"
                )
                self.pending = int(conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
        except (OSError, sqlite3.Error) as err:
            raise LedgerError(f"cannot use the ledger spool {self.path}: {err}") from err

    async def put(self, kind: Kind, records: Sequence[Spooled]) -> None:
        """Keep `records` on disk; LedgerError when the spool is full or unusable."""
        if self.pending + len(records) > self.limit:
            raise LedgerError(
                f"the ledger spool {self.path} holds {self.pending} rows, its limit; "
                "newer records stay in memory"
            )
        rows: list[tuple[str, str]] = [(kind, _encode(r)) for r in records]
        await asyncio.to_thread(self._put, rows)

    def _put(self, rows: list[tuple[str, str]]) -> None:
        try:
            with contextlib.closing(self._connect()) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO spool (kind, row) VALUES (?, ?)", rows)
                conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise LedgerError(f"cannot write the ledger spool {self.path}: {err}") from err
        self.pending += len(rows)

    async def take(self, limit: int = 20_000) -> list[tuple[int, Kind, Spooled]]:
        """The oldest rows, in the order they were put: (id for `done`, kind, record)."""
        rows = await asyncio.to_thread(self._take, limit)
        return [(row_id, cast(Kind, kind), _decode(kind, text)) for row_id, kind, text in rows]

    def _take(self, limit: int) -> list[tuple[int, str, str]]:
        try:
            with contextlib.closing(self._connect()) as conn:
                return cast(
                    list[tuple[int, str, str]],
                    conn.execute(
                        "SELECT id, kind, row FROM spool ORDER BY id LIMIT ?", (limit,)
                    ).fetchall(),
                )
        except sqlite3.Error as err:
            raise LedgerError(f"cannot read the ledger spool {self.path}: {err}") from err

    async def done(self, ids: Sequence[int]) -> None:
        """Forget rows the database now holds."""
        if ids:
            await asyncio.to_thread(self._done, max(ids))

    def _done(self, last: int) -> None:
        try:
            with contextlib.closing(self._connect()) as conn:
                conn.execute("DELETE FROM spool WHERE id <= ?", (last,))
                self.pending = int(conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
        except sqlite3.Error as err:
            raise LedgerError(f"cannot update the ledger spool {self.path}: {err}") from err
