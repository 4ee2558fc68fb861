"""The ledger: the broker's durable memory. `open_ledger` picks the store the config names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from broker.ledger.base import (
    DemandRecord,
    EarningsRecord,
    EnergyRecord,
    EnergyTotal,
    JournalEntry,
    Ledger,
    StateInterval,
    energy_totals_of,
)
from broker.ledger.sqlite import SqliteLedger

if TYPE_CHECKING:
    # A type only: broker.config imports the marketplaces, which import broker.ledger.base.
    from broker.config import BrokerSection

LEDGER_FILE = "ledger.sqlite3"

__all__ = [
    "LEDGER_FILE",
    "DemandRecord",
    "EarningsRecord",
    "EnergyRecord",
    "EnergyTotal",
    "JournalEntry",
    "Ledger",
    "SqliteLedger",
    "StateInterval",
    "energy_totals_of",
    "ledger_path",
    "open_ledger",
]


def ledger_path(broker: BrokerSection) -> Path:
    return broker.state_dir / LEDGER_FILE


async def open_ledger(
    broker: BrokerSection, host: str | None = None, *, lock: bool = False
) -> Ledger:
    """Open (creating and migrating as needed) the ledger the config names: the shared
    PostgreSQL database when `database_url` is set, else the SQLite file in state_dir.

    `lock` claims `host` in a shared database (the daemon does; a report does not); the
    SQLite file needs no claim of its own, the state directory's lock covers it."""
    host = host or broker.host
    if broker.database_url is not None:
        # Imported here: psycopg loads libpq, which a SQLite-only broker never needs.
        from broker.ledger.postgres import PostgresLedger
        from broker.ledger.spool import SPOOL_FILE

        return await PostgresLedger.open(
            broker.database_url,
            host,
            password=broker.database_password(),
            lock=lock,
            # the daemon's energy and demand outlive an outage of the database on disk
            spool=broker.state_dir.expanduser() / SPOOL_FILE if lock else None,
        )
    return await SqliteLedger.open(ledger_path(broker), host=host)
