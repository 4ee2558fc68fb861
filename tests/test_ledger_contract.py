"""The ledger contract: every test here runs over each store (SQLite, and PostgreSQL on a real
server the session starts), so the two keep one behaviour. SQLite-only matters (WAL, files,
its migrations) stay in tests/test_ledger.py; PostgreSQL-only ones in tests/test_fleet_*.py.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fakes.postgres import PgServer

from broker.errors import LedgerError
from broker.ledger import (
    DemandRecord,
    EarningsRecord,
    EnergyRecord,
    EnergyTotal,
    IdleRecord,
    JournalEntry,
    ModelLoad,
    SqliteLedger,
    energy_totals_of,
)
from broker.ledger.base import PriceRecord
from broker.ledger.folding import DEMAND_RAW_RETENTION
from broker.ledger.postgres import PostgresLedger

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)

# Both stores also fold on demand (compact_energy, compact_demand), beyond the protocol.
AnyLedger = SqliteLedger | PostgresLedger


@dataclass
class Store:
    """One database under test: a way to open a ledger on it for a host, and to count rows
    in it as the store keeps them (both stores use the same table and column names)."""

    open: Callable[[str], Awaitable[AnyLedger]]
    count: Callable[[str], int]


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: list[AnyLedger] = []
    if request.param == "sqlite":
        path = tmp_path / "state" / "ledger.sqlite3"

        async def open_sqlite(host: str) -> AnyLedger:
            return await SqliteLedger.open(path, host=host)

        def count_sqlite(sql: str) -> int:
            conn = sqlite3.connect(path)
            try:
                return int(conn.execute(sql).fetchone()[0] or 0)
            finally:
                conn.close()

        opener, counter = open_sqlite, count_sqlite
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        url = server.new_database()

        async def open_pg(host: str) -> AnyLedger:
            return await PostgresLedger.open(url, host=host)

        def count_pg(sql: str) -> int:
            with psycopg.connect(url) as conn:
                row = conn.execute(sql.encode()).fetchone()
                return int((row[0] if row else 0) or 0)

        opener, counter = open_pg, count_pg

    async def tracked(host: str) -> AnyLedger:
        ledger = await opener(host)
        opened.append(ledger)
        return ledger

    yield Store(tracked, counter)
    for ledger in opened:
        await ledger.close()


@pytest.fixture
async def ledger(store: Store) -> AnyLedger:
    return await store.open("box")


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


async def test_state_intervals_close_the_previous_one(ledger: AnyLedger) -> None:
    await ledger.record_state("pool", "default", "LOCAL", minutes(0))
    await ledger.record_state("pool", "default", "IDLE", minutes(10), "all GPUs idle")
    await ledger.record_state("gpu", "GPU-a", "local", minutes(0))
    await ledger.record_state("pool", "default", "DRAINING", minutes(25))
    pool = await ledger.state_intervals(minutes(0), minutes(60), scope="pool")
    assert [(i.state, i.start, i.end, i.reason) for i in pool] == [
        ("LOCAL", minutes(0), minutes(10), ""),
        ("IDLE", minutes(10), minutes(25), "all GPUs idle"),
        ("DRAINING", minutes(25), None, ""),
    ]
    overlapping = await ledger.state_intervals(minutes(12), minutes(13))
    assert {(i.scope, i.state) for i in overlapping} == {("pool", "IDLE"), ("gpu", "local")}
    assert await ledger.close_states(minutes(30)) == 2
    assert all(i.end is not None for i in await ledger.state_intervals(minutes(0), minutes(60)))


async def test_energy_round_trip_and_range(ledger: AnyLedger) -> None:
    records = [
        EnergyRecord("GPU-a", 0, "listed", minutes(i), minutes(i + 1), 1320.0, 1800.0, "counter")
        for i in range(5)
    ]
    await ledger.add_energy(records)
    await ledger.add_energy([])
    got = await ledger.energy(minutes(1.5), minutes(3))
    assert [r.start for r in got] == [minutes(1), minutes(2)]
    assert got[0] == EnergyRecord(
        "GPU-a", 0, "listed", minutes(1), minutes(2), 1320.0, 1800.0, "counter", host="box"
    )
    assert await ledger.energy(minutes(0), minutes(10), gpu_uuid="GPU-b") == []


async def test_earnings_are_counted_once(ledger: AnyLedger) -> None:
    day = date(2026, 11, 25)
    estimate = EarningsRecord("vast", "42", day, 3.10, "USD", "estimate", minutes(0))
    reported = EarningsRecord(
        "vast", "42", day, 3.25, "USD", "provider", minutes(60), {"gpu_earn": 3.0}
    )
    assert await ledger.upsert_earnings([estimate]) == 1
    assert await ledger.upsert_earnings([estimate]) == 0  # same again: nothing changes
    assert await ledger.upsert_earnings([reported]) == 1  # the provider's figure replaces it
    assert await ledger.upsert_earnings([reported, reported]) == 0
    later_estimate = EarningsRecord("vast", "42", day, 9.99, "USD", "estimate", minutes(90))
    assert await ledger.upsert_earnings([later_estimate]) == 0  # never over a provider figure
    [row] = await ledger.earnings(day, day)
    assert (row.amount, row.source, row.detail) == (3.25, "provider", {"gpu_earn": 3.0})
    other_day = EarningsRecord("vast", "42", day + timedelta(days=1), 1.0, "USD", "provider", T0)
    await ledger.upsert_earnings([other_day])
    assert len(await ledger.earnings(day, day + timedelta(days=1))) == 2


async def test_journal_intent_then_outcome(ledger: AnyLedger) -> None:
    entry_id = await ledger.journal(
        JournalEntry(minutes(0), "list", "intent", "vast:42", {"end_date": 1764108000.0})
    )
    await ledger.journal(JournalEntry(minutes(1), "transition", "note", "default"))
    [pending] = await ledger.journal_entries(status="intent")
    assert (pending.id, pending.kind, pending.payload) == (
        entry_id,
        "list",
        {"end_date": 1764108000.0},
    )
    await ledger.complete(entry_id, "done", minutes(2), "listed until 00:00")
    assert await ledger.journal_entries(status="intent") == []
    [done] = await ledger.journal_entries(kinds=["list"])
    assert (done.status, done.outcome) == ("done", "listed until 00:00")
    assert done.outcome_at == minutes(2)
    with pytest.raises(LedgerError, match="not an open intent"):
        await ledger.complete(entry_id, "failed", minutes(3))
    assert len(await ledger.journal_entries(since=minutes(1))) == 1


async def test_prices_of_listings_rentals_and_market_reads(store: Store) -> None:
    ledger = await store.open("a")
    other = await store.open("b")
    await ledger.add_price(PriceRecord(minutes(1), "market", 0.31, peers=12))
    await ledger.add_price(PriceRecord(minutes(2), "ask", 0.29))
    await ledger.add_price(PriceRecord(minutes(30), "rental", 0.29))
    await other.add_price(PriceRecord(minutes(2), "ask", 0.5))
    got = await ledger.prices(minutes(1), minutes(30))
    assert [(r.at, r.kind, r.price, r.peers, r.host) for r in got] == [
        (minutes(1), "market", 0.31, 12, "a"),
        (minutes(2), "ask", 0.29, None, "a"),
    ]
    assert [r.price for r in await ledger.prices(T0, minutes(60), "rental")] == [0.29]
    assert [r.price for r in await other.prices(T0, minutes(60))] == [0.5]


async def test_naive_datetimes_are_refused(ledger: AnyLedger) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.record_state("pool", "p", "LOCAL", datetime(2026, 1, 1))


async def test_rows_of_other_hosts_are_not_mixed_in(store: Store) -> None:
    a = await store.open("a")
    b = await store.open("b")
    await a.record_state("pool", "default", "LISTED", T0)
    await b.record_state("pool", "default", "LOCAL", T0)
    assert [i.state for i in await a.state_intervals(T0, minutes(1))] == ["LISTED"]
    assert [i.state for i in await b.state_intervals(T0, minutes(1))] == ["LOCAL"]
    await a.add_energy([EnergyRecord("GPU-a", 0, "listed", T0, minutes(1), 60.0)])
    await b.add_demand([DemandRecord("ollama", T0, 1.0, "passed")])
    await b.journal(JournalEntry(T0, "transition", "note", "default"))
    assert await b.energy(T0, minutes(2)) == []
    assert await a.demand(T0, minutes(2)) == []
    assert await a.journal_entries() == []
    assert [r.host for r in await a.energy(T0, minutes(2))] == ["a"]
    assert await b.energy_totals([T0, minutes(2)]) == []


def _minute_records(
    uuid: str, index: int, changes: list[tuple[datetime, str]], end: datetime, watts: float
) -> list[EnergyRecord]:
    """Records as the daemon writes them: a minute each (starting at :30), cut where the
    pool state changes; GPU `index` draws `watts` + index, and 10 W of overhead."""
    out: list[EnergyRecord] = []
    for (start, state), (stop, _) in zip(changes, [*changes[1:], (end, "")], strict=True):
        t = start
        while t < stop:
            edge = t.replace(second=30, microsecond=0)
            edge = edge + timedelta(minutes=1) if edge <= t else edge
            e = min(edge, stop)
            seconds = (e - t).total_seconds()
            out.append(
                EnergyRecord(uuid, index, state, t, e, (watts + index) * seconds, 10 * seconds)
            )
            t = e
    return out


def _sums(records: list[EnergyRecord]) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for r in records:
        for kind, value in (("joules", r.joules), ("overhead", r.overhead_joules)):
            key = (r.gpu_uuid, r.pool_state, kind)
            out[key] = out.get(key, 0.0) + value
    return out


def _flat(totals: list[EnergyTotal]) -> list[float]:
    return [x for t in totals for x in (t.joules, t.overhead_joules)]


def _days(n: int) -> list[datetime]:
    return [T0 + timedelta(days=d) for d in range(-1, n + 1)]


async def test_old_energy_is_folded_into_15_minute_sums_and_counted_once(
    store: Store, ledger: AnyLedger
) -> None:
    # Three days, two GPUs; state changes off the 15-minute grid (10:07:20, 13:52:10) so
    # records straddle slots and slots hold two states.
    changes = [
        (T0, "local"),
        (T0 + timedelta(hours=10, minutes=7, seconds=20), "listed"),
        (T0 + timedelta(hours=13, minutes=52, seconds=10), "rented"),
        (T0 + timedelta(days=1, hours=2), "local"),
        (T0 + timedelta(days=2, hours=10, minutes=7, seconds=20), "rented"),
    ]
    end = T0 + timedelta(days=3)
    written = sorted(
        _minute_records("GPU-a", 0, changes, end, 100)
        + _minute_records("GPU-b", 1, changes, end, 100),
        key=lambda r: r.end,
    )
    for i in range(0, len(written), 120):  # an hour of both GPUs per write
        await ledger.add_energy(written[i : i + 120])

    raw = store.count("SELECT COUNT(*) FROM energy WHERE slot IS NULL")
    folded = store.count("SELECT COUNT(*) FROM energy WHERE slot IS NOT NULL")
    # Only about the last day stays as written (2 GPUs x 1440 minutes, a slot more at most).
    assert 2 * 1440 <= raw <= 2 * (1440 + 15 + 60)
    assert folded <= 2 * 2 * 96 + 8  # two days of slots, a few with two states

    stored = await ledger.energy(T0 - timedelta(days=1), end + timedelta(days=1))
    assert _sums(stored) == pytest.approx(_sums(written))
    # Per day (slot-aligned cuts), folded or not, the totals are the records' own.
    cuts = _days(3)
    got = await ledger.energy_totals(cuts)
    want = energy_totals_of(written, cuts)
    assert [(t.span, t.pool_state, t.gpu_uuid) for t in got] == [
        (t.span, t.pool_state, None) for t in want
    ]
    assert _flat(got) == pytest.approx(_flat(want))
    for gpu in (0, 1):
        one = await ledger.energy_totals(cuts, gpu_index=gpu)
        mine = energy_totals_of(written, cuts, gpu_index=gpu)
        assert [(t.span, t.pool_state, t.gpu_uuid, t.gpu_index) for t in one] == [
            (t.span, t.pool_state, t.gpu_uuid, gpu) for t in mine
        ]
        assert _flat(one) == pytest.approx(_flat(mine))
    # The machine's slot sums hold what the GPUs' do: never counted twice, never lost.
    for column in ("joules", "overhead_joules"):
        # summed in whole millijoules, so the count helper's integers compare
        machine = store.count(f"SELECT ROUND(SUM({column}) * 1000) FROM energy_slots")
        per_gpu = store.count(
            f"SELECT ROUND(SUM({column}) * 1000) FROM energy WHERE slot IS NOT NULL"
        )
        assert machine == pytest.approx(per_gpu, abs=2)

    # Folding everything now changes no total; folding again finds nothing to do.
    assert await ledger.compact_energy(end) > 0
    assert await ledger.compact_energy(end) == 0
    again = await ledger.energy_totals(cuts)
    assert _flat(again) == pytest.approx(_flat(want))
    assert _flat(await ledger.energy_totals(cuts, gpu_index=1)) == pytest.approx(
        _flat(energy_totals_of(written, cuts, gpu_index=1))
    )


async def test_a_late_record_joins_the_sum_of_its_slot(ledger: AnyLedger) -> None:
    slot = T0 + timedelta(minutes=15)
    first = EnergyRecord("GPU-a", 0, "listed", slot, slot + timedelta(minutes=1), 600.0, 60.0)
    await ledger.add_energy([first])
    assert await ledger.compact_energy(T0 + timedelta(days=1)) == 1
    # Written late (a flush retried after a failure), integrated rather than counted.
    late = EnergyRecord(
        "GPU-a", 0, "listed", slot + timedelta(minutes=5), slot + timedelta(minutes=6),
        300.0, 60.0, "integrated",
    )  # fmt: skip
    await ledger.add_energy([late])
    assert await ledger.compact_energy(T0 + timedelta(days=1)) == 1
    [row] = await ledger.energy(T0, T0 + timedelta(hours=1))
    assert (row.start, row.end) == (slot, slot + timedelta(minutes=6))
    assert (row.joules, row.overhead_joules, row.method) == (900.0, 120.0, "mixed")


async def test_energy_totals_share_straddling_records_by_time(ledger: AnyLedger) -> None:
    rng = random.Random(7)
    records: list[EnergyRecord] = []
    t = T0
    for _ in range(600):
        length = rng.choice([0.0, 0.5, 30.0, 60.0, 61.5, 400.0])
        index = rng.randrange(3)
        records.append(
            EnergyRecord(
                f"GPU-{index}", index, rng.choice(["local", "listed", "rented"]), t,
                t + timedelta(seconds=length), rng.uniform(0, 20_000), rng.uniform(0, 600),
            )
        )  # fmt: skip
        t += timedelta(seconds=rng.uniform(0, 70))
    await ledger.add_energy(records)  # under a day: nothing is folded
    span = (t - T0).total_seconds()
    cuts = sorted({T0 + timedelta(seconds=rng.uniform(0, span)) for _ in range(25)})
    for gpu in (None, 2):
        got = await ledger.energy_totals(cuts, gpu_index=gpu)
        want = energy_totals_of(records, cuts, gpu_index=gpu)
        assert [(g.span, g.pool_state, g.gpu_uuid, g.gpu_index) for g in got] == [
            (w.span, w.pool_state, w.gpu_uuid, w.gpu_index) for w in want
        ]
        assert _flat(got) == pytest.approx(_flat(want))
    assert await ledger.energy_totals([T0]) == []
    with pytest.raises(ValueError, match="must increase"):
        await ledger.energy_totals([T0, T0])


async def test_demand_round_trip_by_range_and_service(ledger: AnyLedger) -> None:
    records = [
        DemandRecord("ollama", minutes(5), 12.5, "passed"),
        DemandRecord("comfyui", minutes(1), 40.0, "held", held_s=30.0),
        DemandRecord("ollama", minutes(3), 0.01, "refused", held_s=0.0),
        DemandRecord("ollama", minutes(60), 1.0, "passed"),  # outside [0, 60)
    ]
    await ledger.add_demand(records)
    got = await ledger.demand(minutes(0), minutes(60))
    assert [(r.service, r.arrival, r.duration_s, r.outcome, r.held_s, r.count, r.host)
            for r in got] == [
        ("comfyui", minutes(1), 40.0, "held", 30.0, 1, "box"),
        ("ollama", minutes(3), 0.01, "refused", 0.0, 1, "box"),
        ("ollama", minutes(5), 12.5, "passed", 0.0, 1, "box"),
    ]  # fmt: skip
    only = await ledger.demand(minutes(0), minutes(61), service="ollama")
    assert [r.arrival for r in only] == [minutes(3), minutes(5), minutes(60)]


async def test_model_loads_round_trip_by_range_service_and_host(store: Store) -> None:
    ledger = await store.open("box")
    other = await store.open("other")
    await ledger.add_model_loads(
        [
            ModelLoad("ollama", minutes(2), "llama3:8b", (0, 1)),
            ModelLoad("comfyui", minutes(1), "sdxl.safetensors", (1,)),
            ModelLoad("ollama", minutes(60), "qwen:7b", (0,)),  # outside [0, 60)
        ]
    )
    await ledger.add_model_loads([])
    await other.add_model_loads([ModelLoad("ollama", minutes(3), "mistral", ())])
    got = await ledger.model_loads(minutes(0), minutes(60))
    assert got == [
        ModelLoad("comfyui", minutes(1), "sdxl.safetensors", (1,), "box"),
        ModelLoad("ollama", minutes(2), "llama3:8b", (0, 1), "box"),
    ]
    only = await ledger.model_loads(minutes(0), minutes(61), service="ollama")
    assert [r.model for r in only] == ["llama3:8b", "qwen:7b"]
    assert [r.gpus for r in await other.model_loads(minutes(0), minutes(60))] == [()]
async def test_idle_statistics_round_trip_by_range_and_gpu(ledger: AnyLedger) -> None:
    def slot(gpu: str, index: int, start: int) -> IdleRecord:
        return IdleRecord(
            gpu, index, minutes(start), minutes(start + 15), 900,
            watts={35: 600, 36: 300}, pstates={2: 900}, memory_mb={310: 900},
            processes={"/usr/bin/ollama": 450, "pid 77": 1},
        )  # fmt: skip

    await ledger.add_idle([slot("GPU-a", 0, 0), slot("GPU-b", 1, 0), slot("GPU-a", 0, 15)])
    await ledger.add_idle([])
    got = await ledger.idle(minutes(10), minutes(20))
    assert [(r.gpu_uuid, r.start) for r in got] == [
        ("GPU-a", minutes(0)), ("GPU-b", minutes(0)), ("GPU-a", minutes(15)),
    ]  # fmt: skip
    first = got[0]
    assert (first.gpu_index, first.end, first.samples, first.host) == (0, minutes(15), 900, "box")
    assert (first.watts, first.pstates, first.memory_mb) == ({35: 600, 36: 300}, {2: 900},
                                                              {310: 900})  # fmt: skip
    assert first.processes == {"/usr/bin/ollama": 450, "pid 77": 1}
    only_b = await ledger.idle(minutes(0), minutes(60), gpu_uuid="GPU-b")
    assert [r.gpu_index for r in only_b] == [1]
    assert await ledger.idle(minutes(30), minutes(60)) == []


def _demand_rows(store: Store) -> tuple[int, int]:
    return (
        store.count("SELECT COUNT(*) FROM demand WHERE bucket IS NULL"),
        store.count("SELECT COUNT(*) FROM demand WHERE bucket IS NOT NULL"),
    )


async def test_old_demand_is_folded_by_service_outcome_and_bucket(
    store: Store, ledger: AnyLedger
) -> None:
    rng = random.Random(13)
    old: list[DemandRecord] = []
    for i in range(600):  # ten hours of requests, one a minute, two services
        outcome = rng.choice(["passed", "passed", "held", "refused"])
        old.append(
            DemandRecord(
                rng.choice(["ollama", "comfyui"]),
                minutes(i + rng.random() * 0.9),
                rng.uniform(0.5, 90.0),
                outcome,  # type: ignore[arg-type]
                held_s=rng.uniform(1.0, 60.0) if outcome != "passed" else 0.0,
            )
        )
    await ledger.add_demand(old)
    assert _demand_rows(store) == (600, 0)  # fresh: nothing folded yet
    # A request written after the retention has passed folds everything older.
    fresh_at = minutes(600) + timedelta(seconds=DEMAND_RAW_RETENTION)
    fresh = DemandRecord("ollama", fresh_at, 3.0, "passed")
    await ledger.add_demand([fresh])
    raw, folded = _demand_rows(store)
    assert raw == 1  # the fresh request, untouched
    # 40 quarter hours, at most 2 services x 3 outcomes each
    assert 40 < folded <= 40 * 6
    got = await ledger.demand(minutes(0), fresh_at + timedelta(seconds=1))
    assert got[-1] == DemandRecord("ollama", fresh_at, 3.0, "passed", host="box")
    rows = got[:-1]
    assert all(r.arrival < minutes(600) for r in rows)

    def sums(rs: list[DemandRecord]) -> dict[tuple[str, str, int], tuple[int, float, float]]:
        acc: dict[tuple[str, str, int], list[float]] = {}
        for r in rs:
            key = (r.service, r.outcome, int(r.arrival.timestamp() // 900))
            a = acc.setdefault(key, [0, 0.0, 0.0])
            a[0] += r.count
            a[1] += r.duration_s
            a[2] += r.held_s
        return {k: (int(v[0]), round(v[1], 6), round(v[2], 6)) for k, v in acc.items()}

    # counts, durations and held time survive per service, outcome and quarter hour
    assert sums(rows) == sums(old)
    assert sum(r.count for r in rows) == 600
    # a folded row starts at its bucket's first arrival
    firsts: dict[tuple[str, str, int], datetime] = {}
    for r in old:
        key = (r.service, r.outcome, int(r.arrival.timestamp() // 900))
        firsts[key] = min(firsts.get(key, r.arrival), r.arrival)
    assert sorted(r.arrival for r in rows) == sorted(firsts.values())


async def test_a_late_request_joins_its_folded_bucket(store: Store, ledger: AnyLedger) -> None:
    await ledger.add_demand([DemandRecord("ollama", minutes(2), 10.0, "passed")])
    await ledger.compact_demand(minutes(60))
    await ledger.add_demand([DemandRecord("ollama", minutes(1), 5.0, "passed")])
    await ledger.compact_demand(minutes(60))
    assert _demand_rows(store) == (0, 1)
    [row] = await ledger.demand(minutes(0), minutes(60))
    assert (row.arrival, row.count, row.duration_s) == (minutes(1), 2, 15.0)


async def test_reads_by_host_are_each_hosts_own_reads(store: Store) -> None:
    """What a fleet report reads at once for all hosts is what each host reads alone."""
    a, b = await store.open("a"), await store.open("b")
    end = T0 + timedelta(days=3)
    for ledger, watts, states in ((a, 100.0, ("LOCAL", "LISTED")), (b, 40.0, ("RENTED",))):
        changes = [(T0 + timedelta(hours=7 * k), s) for k, s in enumerate(states * 8)]
        changes = [c for c in changes if c[0] < end]
        for at, state in changes:
            await ledger.record_state("pool", "default", state, at)
            await ledger.record_state("gpu", "GPU-0", state.lower(), at)
        lowered = [(at, state.lower()) for at, state in changes]
        await ledger.add_energy(_minute_records("GPU-0", 0, lowered, end, watts))
        await ledger.add_energy(_minute_records("GPU-1", 1, lowered, end, watts))
    cuts = [T0 + timedelta(hours=5 * k) for k in range(15)]
    for gpu in (None, 1):
        together = await a.energy_totals_by_host(["a", "b", "nobody"], cuts, gpu)
        assert sorted(together) == ["a", "b"]
        for ledger in (a, b):
            alone = await ledger.energy_totals(cuts, gpu_index=gpu)
            assert [(t.span, t.pool_state, t.gpu_uuid) for t in together[ledger.host]] == [
                (t.span, t.pool_state, t.gpu_uuid) for t in alone
            ]
            assert _flat(together[ledger.host]) == pytest.approx(_flat(alone))
    intervals = await b.state_intervals_by_host(["a", "b"], T0, end, scope="pool",
                                                states=["RENTED", "LISTED"])  # fmt: skip
    assert intervals["a"] == await a.state_intervals(T0, end, "pool", states=["RENTED", "LISTED"])
    assert intervals["b"] == await b.state_intervals(T0, end, "pool", states=["RENTED", "LISTED"])
    assert [i.state for i in intervals["a"]] == ["LISTED"] * 5  # at 7, 21, 35, 49 and 63 h
    assert await a.state_intervals_by_host([], T0, end) == {}
