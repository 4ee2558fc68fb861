"""The ledger: the broker's durable memory. `open_ledger` picks the store the config names."""

from __future__ import annotations

import socket
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


async def open_ledger(broker: BrokerSection, host: str | None = None) -> Ledger:
    """Open (creating and migrating as needed) the ledger the config names."""
    return await SqliteLedger.open(ledger_path(broker), host=host or socket.gethostname())
