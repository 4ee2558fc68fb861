"""The ledger: the broker's durable memory. `open_ledger` picks the store the config names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from broker.ledger.base import (
    DemandRecord,
    EarningsRecord,
    EnergyRecord,
    EnergyTotal,
    IdleRecord,
    JournalEntry,
    Ledger,
    ModelLoad,
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
    "IdleRecord",
    "JournalEntry",
    "Ledger",
    "ModelLoad",
    "SqliteLedger",
    "StateInterval",
    "claim_host",
    "energy_totals_of",
    "ledger_exists",
    "ledger_path",
    "open_ledger",
]


def ledger_path(broker: BrokerSection) -> Path:
    return broker.state_dir / LEDGER_FILE


def ledger_exists(broker: BrokerSection) -> bool:
    """Whether there is a ledger to read: the shared database, or the SQLite file once the
    service has written it (reading must not create an empty one)."""
    return broker.database_url is not None or ledger_path(broker).exists()


async def open_ledger(
    broker: BrokerSection, host: str | None = None, *, lock: bool = False
) -> Ledger:
    """Open (creating and migrating as needed) the ledger the config names: the shared
    PostgreSQL database when `database_url` is set, else the SQLite file in state_dir.

    `lock` claims the host as `claim_host` does (reports, copies and checks do not)."""
    host = host or broker.host
    ledger: Ledger
    if broker.database_url is not None:
        # Imported here: psycopg loads libpq, which a SQLite-only broker never needs.
        from broker.ledger.postgres import PostgresLedger

        ledger = await PostgresLedger.open(
            broker.database_url, host, password=broker.database_password()
        )
    else:
        ledger = await SqliteLedger.open(ledger_path(broker), host=host)
    if lock:
        try:
            await claim_host(ledger, broker)
        except BaseException:
            await ledger.close()
            raise
    return ledger


async def claim_host(ledger: Ledger, broker: BrokerSection) -> None:
    """What a running broker needs of its ledger beyond reading and writing: in a shared
    database, its host name to itself (`InstanceLocked` otherwise) and a spool on disk for
    the energy and demand measured while the database is away. The SQLite file needs
    neither: the state directory's lock covers it."""
    if broker.database_url is None:
        return
    from broker.ledger.postgres import PostgresLedger
    from broker.ledger.spool import SPOOL_FILE

    if isinstance(ledger, PostgresLedger):
        await ledger.claim(spool=broker.state_dir.expanduser() / SPOOL_FILE)
