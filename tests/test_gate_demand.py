"""Local demand: each inference request through a gate becomes one ledger record, written in
batches off the request path. The real `ollama` client, a fake Ollama, the injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import ollama
import pytest
from fakes.ollama import FakeOllama

from broker.clock import FakeClock
from broker.errors import LedgerError
from broker.ledger import DemandRecord, SqliteLedger
from broker.services.control import GateControl
from broker.services.demand import DemandBuffer, DemandWriter
from broker.services.gate import Gate


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    ledger = await SqliteLedger.open(tmp_path / "ledger.sqlite3", host="box")
    yield ledger
    await ledger.close()


@pytest.fixture
async def gate(upstream: FakeOllama, clock: FakeClock) -> AsyncIterator[Gate]:
    control = GateControl(clock, name="ollama", max_hold=timedelta(seconds=30))
    control.demand = DemandBuffer()
    async with Gate(
        name="ollama", kind="ollama", upstream=upstream.url, listen=("127.0.0.1", 0),
        control=control,
    ) as g:  # fmt: skip
        yield g


@pytest.fixture
async def client(gate: Gate) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=gate.url)
    yield c
    await c.close()


async def until(condition: object, what: str) -> None:
    """Let the loop run (real sockets and the ledger's thread) until `condition()` holds."""
    for _ in range(2000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def shape(records: Sequence[DemandRecord], t0: datetime) -> list[tuple[float, str, float, float]]:
    return [
        ((r.arrival - t0).total_seconds(), r.outcome, r.duration_s, r.held_s) for r in records
    ]


async def test_passed_held_and_refused_requests_are_recorded_with_their_times(
    gate: Gate,
    client: ollama.AsyncClient,
    upstream: FakeOllama,
    clock: FakeClock,
    ledger: SqliteLedger,
) -> None:
    control = gate.control
    assert control.demand is not None
    writer = DemandWriter(control.demand, ledger, clock, interval=60.0)
    flusher = asyncio.create_task(writer.run())
    t0 = clock.now()
    try:
        # 1. passes at once; its answer streams for 7 s
        upstream.pause_streams = asyncio.Event()
        stream = await client.chat(
            model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        first = await anext(stream)
        assert first.message.content == "tok0 "
        await clock.advance(7)
        upstream.pause_streams.set()
        assert [p.message.content async for p in stream][-1] == ""
        assert control.in_flight == 0
        assert len(control.demand) == 1  # in memory; nothing written per request
        assert await ledger.demand(t0, t0 + timedelta(hours=1)) == []

        # 2. arrives at 10 s while the GPUs are away, held 12 s, then served
        await clock.advance(3)
        control.guard()
        held = asyncio.create_task(client.generate(model="llama3.2:1b", prompt="hi"))
        await until(lambda: control.held == 1, "the request to be held")
        await clock.advance(12)
        control.release()
        assert (await held).response == "tok0 tok1 tok2 "

        # 3. arrives at 30 s while a renter's contract outlasts the hold: refused at once
        await clock.advance(8)
        control.guard()
        control.set_rented_until(clock.now() + timedelta(hours=2))
        with pytest.raises(ollama.ResponseError) as refused:
            await client.generate(model="llama3.2:1b", prompt="hi")
        assert refused.value.status_code == 503

        # the writer's minute comes: the three records reach the ledger in one batch
        await clock.advance(30)
        await until(lambda: len(control.demand or ()) == 0, "the batch to be taken")
        rows: list[DemandRecord] = []
        for _ in range(200):
            rows = await ledger.demand(t0, t0 + timedelta(hours=1), service="ollama")
            if rows:
                break
            await asyncio.sleep(0.005)
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
    assert shape(rows, t0) == [
        (0.0, "passed", 7.0, 0.0),
        (10.0, "held", 12.0, 12.0),
        (30.0, "refused", 0.0, 0.0),
    ]
    assert {r.service for r in rows} == {"ollama"} and all(r.count == 1 for r in rows)


async def test_held_then_refused_and_a_client_that_leaves_while_held(
    gate: Gate, client: ollama.AsyncClient, clock: FakeClock
) -> None:
    control = gate.control
    assert control.demand is not None
    t0 = clock.now()
    control.guard()
    request = asyncio.create_task(client.generate(model="llama3.2:1b", prompt="hi"))
    await until(lambda: control.held == 1, "the request to be held")
    await clock.advance(30)  # max_hold runs out
    with pytest.raises(ollama.ResponseError):
        await request
    # one more held request whose client gives up after 5 s
    _, writer = await asyncio.open_connection("127.0.0.1", gate.port)
    body = b'{"model": "llama3.2:1b", "prompt": "hi"}'
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    await until(lambda: control.held == 1, "the second request to be held")
    await clock.advance(5)
    writer.close()
    await writer.wait_closed()
    await until(lambda: control.held == 0, "the held slot to be freed")
    assert shape(control.demand.take(), t0) == [
        (0.0, "refused", 30.0, 30.0),
        (30.0, "held", 5.0, 5.0),
    ]


async def test_model_listing_and_other_management_requests_are_not_demand(
    gate: Gate, client: ollama.AsyncClient
) -> None:
    await client.list()
    await client.ps()
    assert gate.control.demand is not None and len(gate.control.demand) == 0


class _DeadThenBack:
    """A ledger that refuses `failures` writes, then takes them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written: list[DemandRecord] = []

    async def add_demand(self, records: Sequence[DemandRecord]) -> None:
        if self.failures:
            self.failures -= 1
            raise LedgerError("ledger write failed: disk I/O error")
        self.written.extend(records)


async def test_a_dead_ledger_fails_no_request_and_loses_nothing_it_can_keep(
    gate: Gate, client: ollama.AsyncClient, clock: FakeClock
) -> None:
    control = gate.control
    assert control.demand is not None
    control.demand.limit = 3
    store = _DeadThenBack(failures=2)
    writer = DemandWriter(control.demand, store, clock)  # type: ignore[arg-type]
    for _ in range(2):
        assert (await client.generate(model="llama3.2:1b", prompt="hi")).done
    assert await writer.flush() == 0  # refused: kept
    for _ in range(2):
        assert (await client.generate(model="llama3.2:1b", prompt="hi")).done
    assert control.demand.dropped == 1  # over the limit: counted, the request served anyway
    assert await writer.flush() == 0
    assert await writer.flush() == 3
    assert len(store.written) == 3 and control.demand.dropped == 0
