"""Local demand: every inference request the gates see, kept in memory and written to the
ledger in batches.

The gates add one row per request (`DemandBuffer.add`, a tuple appended to a list: nothing
on the request path waits for, or can fail because of, the ledger). `DemandWriter` takes
the rows every `interval` seconds of the injected clock and writes them with one
`Ledger.add_demand`. A ledger that refuses the write keeps the rows in memory for the next
try, up to `DemandBuffer.limit` rows; beyond that new rows are counted as dropped and
logged, so a dead ledger costs some history, never a request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from broker.clock import Clock
from broker.ledger.base import DemandOutcome, DemandRecord, Ledger

__all__ = ["DEFAULT_FLUSH_INTERVAL_S", "DEFAULT_LIMIT", "DemandBuffer", "DemandWriter"]

log = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL_S = 60.0
# About 200 bytes a row: a few MB at most, hours of a busy team's requests.
DEFAULT_LIMIT = 20_000

_Row = tuple[str, datetime, float, DemandOutcome, float]


class DemandBuffer:
    """Requests seen at the gates, not yet in the ledger. One buffer serves every gate."""

    __slots__ = ("_rows", "dropped", "limit")

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._rows: list[_Row] = []
        self.limit = limit
        self.dropped = 0  # rows lost since the last warning (the buffer was full)

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self,
        service: str,
        arrival: datetime,
        duration_s: float,
        outcome: DemandOutcome,
        held_s: float,
    ) -> None:
        rows = self._rows
        if len(rows) >= self.limit:
            self.dropped += 1
            return
        rows.append((service, arrival, duration_s, outcome, held_s))

    def take(self) -> list[DemandRecord]:
        rows, self._rows = self._rows, []
        return [
            DemandRecord(service, arrival, duration, outcome, held)
            for service, arrival, duration, outcome, held in rows
        ]

    def put_back(self, records: Sequence[DemandRecord]) -> None:
        """Rows a write did not take go back before the ones that came since, as many as the
        limit leaves room for (the oldest are dropped first)."""
        old = [(r.service, r.arrival, r.duration_s, r.outcome, r.held_s) for r in records]
        room = self.limit - len(self._rows)
        if room < len(old):
            self.dropped += len(old) - max(room, 0)
            old = old[len(old) - max(room, 0) :]
        self._rows = old + self._rows


class DemandWriter:
    """Writes what the buffer holds to the ledger every `interval` seconds."""

    def __init__(
        self,
        buffer: DemandBuffer,
        ledger: Ledger,
        clock: Clock,
        *,
        interval: float = DEFAULT_FLUSH_INTERVAL_S,
    ) -> None:
        self.buffer = buffer
        self._ledger = ledger
        self._clock = clock
        self.interval = interval
        self._failing = False

    async def run(self) -> None:
        while True:
            await self._clock.sleep(self.interval)
            await self.flush()

    async def flush(self) -> int:
        """Write what is buffered now; returns how many rows went in (0 on a failed write,
        whose rows wait for the next one)."""
        buffer = self.buffer
        if buffer.dropped:
            log.warning(
                "local demand: %d request(s) not recorded, the buffer was full "
                "(the ledger did not take writes)",
                buffer.dropped,
            )
            buffer.dropped = 0
        records = buffer.take()
        if not records:
            return 0
        try:
            await self._ledger.add_demand(records)
        except Exception as err:  # whatever the store's failure, this task must go on
            buffer.put_back(records)
            if not self._failing:
                log.warning("local demand not written to the ledger, kept to retry: %s", err)
            self._failing = True
            return 0
        if self._failing:
            log.info("local demand written to the ledger again")
            self._failing = False
        return len(records)

    async def aclose(self) -> None:
        """The last write, at shutdown (after the gates have closed)."""
        await self.flush()
        if len(self.buffer):
            log.error("local demand not written to the ledger, lost: %d", len(self.buffer))

