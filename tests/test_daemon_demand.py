"""The daemon wires the gates' demand to the ledger: written each minute, and at shutdown."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

from fakes.rig import RigFactory, chat
from fakes.vast import drive

from broker.clock import FakeClock
from broker.ledger import ledger_path


async def test_requests_reach_the_ledger_each_minute_and_at_shutdown(
    make_rig: RigFactory, clock: FakeClock
) -> None:
    rig = await make_rig(paper=True)
    ledger = rig.daemon.ledger
    assert ledger is not None
    t0 = clock.now()
    assert (await chat(rig)).done
    assert await ledger.demand(t0, t0 + timedelta(hours=1)) == []  # not per request
    await rig.run_for(61)
    [first] = await ledger.demand(t0, t0 + timedelta(hours=1))
    assert (first.service, first.outcome, first.arrival, first.count) == ("ollama", "passed", t0, 1)
    at = clock.now()
    assert (await chat(rig)).done
    await drive(clock, rig.daemon.aclose())  # before the next minute: the last write
    conn = sqlite3.connect(ledger_path(rig.config.broker))
    rows = conn.execute("SELECT arrival_ts, outcome FROM demand ORDER BY arrival_ts").fetchall()
    conn.close()
    assert rows == [(t0.timestamp(), "passed"), (at.timestamp(), "passed")]
