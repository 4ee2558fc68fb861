"""What the ledger holds at all: when its first record begins and which GPU indices it has
seen. The report starts at the first record instead of padding the table with empty periods
before the ledger existed, and refuses a GPU it has never seen instead of printing zeros."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class LedgerExtent:
    first: datetime | None  # the earliest interval, energy record or earnings day
    gpu_indices: frozenset[int]


def read_extent(path: Path) -> LedgerExtent:
    """Read-only (WAL lets this read while the service writes); a few index-free scans of
    small tables, milliseconds for a year."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        starts = [
            conn.execute(f"SELECT MIN(start_ts) FROM {table}").fetchone()[0]
            for table in ("state_intervals", "energy")
        ]
        # An earnings day (UTC) before any interval, e.g. after the ledger was moved.
        day = conn.execute("SELECT MIN(day) FROM earnings").fetchone()[0]
        if day is not None:
            starts.append(datetime.fromisoformat(f"{day}T00:00:00+00:00").timestamp())
        indices = frozenset(
            int(row[0]) for row in conn.execute("SELECT DISTINCT gpu_index FROM energy")
        )
    finally:
        conn.close()
    known = [float(s) for s in starts if s is not None]
    first = datetime.fromtimestamp(min(known), UTC) if known else None
    return LedgerExtent(first, indices)
