from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from broker.config import BrokerSection
from broker.errors import LedgerError, LedgerVersionError
from broker.ledger import (
    DemandRecord,
    EarningsRecord,
    EnergyRecord,
    EnergyTotal,
    JournalEntry,
    SqliteLedger,
    energy_totals_of,
    ledger_path,
    open_ledger,
)
from broker.ledger.sqlite import DEMAND_RAW_RETENTION, MIGRATIONS, SCHEMA_VERSION

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


@pytest.fixture
async def ledger(tmp_path: Path) -> SqliteLedger:
    ledger = await SqliteLedger.open(tmp_path / "state" / "ledger.sqlite3", host="box")
    yield ledger  # type: ignore[misc]
    await ledger.close()


async def test_created_on_first_use_in_wal_mode(tmp_path: Path) -> None:
    broker = BrokerSection(state_dir=tmp_path / "new" / "dir")
    ledger = await open_ledger(broker, host="box")
    try:
        path = ledger_path(broker)
        assert path.exists()
        assert ledger.schema_version == SCHEMA_VERSION
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.close()
    finally:
        await ledger.close()


async def test_state_intervals_close_the_previous_one(ledger: SqliteLedger) -> None:
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


async def test_energy_round_trip_and_range(ledger: SqliteLedger) -> None:
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


async def test_earnings_are_counted_once(ledger: SqliteLedger) -> None:
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


async def test_journal_intent_then_outcome(ledger: SqliteLedger) -> None:
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


async def test_naive_datetimes_are_refused(ledger: SqliteLedger) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.record_state("pool", "p", "LOCAL", datetime(2026, 1, 1))


async def test_database_work_runs_off_the_event_loop(ledger: SqliteLedger) -> None:
    threads: list[str] = []
    original = ledger._read

    def spy(sql: str, params: object) -> object:
        threads.append(threading.current_thread().name)
        return original(sql, params)  # type: ignore[arg-type]

    ledger._read = spy  # type: ignore[assignment,method-assign]
    await ledger.journal_entries()
    assert threads and threads[0].startswith("ledger")
    assert threads[0] != threading.current_thread().name


async def test_a_reader_sees_committed_rows_while_the_service_writes(
    ledger: SqliteLedger,
) -> None:
    await ledger.record_state("pool", "default", "LISTED", minutes(0))
    reader = sqlite3.connect(f"file:{ledger.path}?mode=ro", uri=True)
    try:
        await asyncio.gather(
            *(ledger.record_state("gpu", f"GPU-{i}", "listed", minutes(i)) for i in range(20))
        )
        assert reader.execute("SELECT COUNT(*) FROM state_intervals").fetchone()[0] == 21
    finally:
        reader.close()


# -- migrations ---------------------------------------------------------------------------


def _v1_database(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO earnings (provider, machine_id, day, amount, currency, updated_ts, host) "
        "VALUES ('vast', '42', '2026-11-01', 4.5, 'USD', 0, 'box')"
    )
    conn.execute(
        "INSERT INTO state_intervals (host, scope, subject, state, start_ts) "
        "VALUES ('box', 'pool', 'default', 'RENTED', ?)",
        (T0.timestamp(),),
    )
    conn.close()


async def test_migrates_a_version_1_ledger_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    _v1_database(path)
    ledger = await SqliteLedger.open(path, host="box")
    try:
        assert (ledger.migrated_from, ledger.schema_version) == (1, SCHEMA_VERSION)
        [row] = await ledger.earnings(date(2026, 11, 1), date(2026, 11, 1))
        assert (row.amount, row.source) == (4.5, "provider")  # old rows were provider-reported
        [interval] = await ledger.state_intervals(T0, T0 + timedelta(hours=1))
        assert (interval.state, interval.end) == ("RENTED", None)
        await ledger.upsert_earnings(
            [EarningsRecord("paper", "local", date(2026, 11, 2), 1.0, "USD", "estimate", T0)]
        )
    finally:
        await ledger.close()
    reopened = await SqliteLedger.open(path, host="box")
    assert reopened.migrated_from == SCHEMA_VERSION  # nothing left to do the second time
    await reopened.close()


async def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    _v1_database(path)
    broken = [MIGRATIONS[0], ("CREATE INDEX fine ON energy (host)", "NOT SQL AT ALL")]
    with pytest.raises(LedgerError, match="cannot use the ledger"):
        await SqliteLedger.open(path, host="box", migrations=broken)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "fine" not in indexes
    conn.close()


async def test_a_ledger_from_a_newer_broker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerVersionError, match="newer than this gpu-broker knows"):
        await SqliteLedger.open(path, host="box")


async def test_an_unusable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        await SqliteLedger.open(blocker / "ledger.sqlite3", host="box")


async def test_rows_of_other_hosts_are_not_mixed_in(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    a = await SqliteLedger.open(path, host="a")
    b = await SqliteLedger.open(path, host="b")
    try:
        await a.record_state("pool", "default", "LISTED", T0)
        await b.record_state("pool", "default", "LOCAL", T0)
        assert [i.state for i in await a.state_intervals(T0, minutes(1))] == ["LISTED"]
        assert [i.state for i in await b.state_intervals(T0, minutes(1))] == ["LOCAL"]
    finally:
        await a.close()
        await b.close()


# -- energy: folding into 15-minute sums, totals per span -------------------------------------


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
    ledger: SqliteLedger,
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

    conn = sqlite3.connect(ledger.path)
    raw, folded = conn.execute(
        "SELECT SUM(slot IS NULL), SUM(slot IS NOT NULL) FROM energy"
    ).fetchone()
    conn.close()
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
    conn = sqlite3.connect(ledger.path)
    machine = conn.execute("SELECT SUM(joules), SUM(overhead_joules) FROM energy_slots").fetchone()
    per_gpu = conn.execute(
        "SELECT SUM(joules), SUM(overhead_joules) FROM energy WHERE slot IS NOT NULL"
    ).fetchone()
    conn.close()
    assert machine == pytest.approx(per_gpu)

    # Folding everything now changes no total; folding again finds nothing to do.
    assert await ledger.compact_energy(end) > 0
    assert await ledger.compact_energy(end) == 0
    again = await ledger.energy_totals(cuts)
    assert _flat(again) == pytest.approx(_flat(want))
    assert _flat(await ledger.energy_totals(cuts, gpu_index=1)) == pytest.approx(
        _flat(energy_totals_of(written, cuts, gpu_index=1))
    )


async def test_a_late_record_joins_the_sum_of_its_slot(ledger: SqliteLedger) -> None:
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


async def test_energy_totals_share_straddling_records_by_time(ledger: SqliteLedger) -> None:
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


def _v2_database(path: Path, records: list[EnergyRecord]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:2]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO energy (host, gpu_uuid, gpu_index, pool_state, start_ts, end_ts, joules, "
        "overhead_joules, method) VALUES ('box', ?, ?, ?, ?, ?, ?, ?, 'counter')",
        [
            (r.gpu_uuid, r.gpu_index, r.pool_state, r.start.timestamp(), r.end.timestamp(),
             r.joules, r.overhead_joules)
            for r in records
        ],
    )  # fmt: skip
    conn.execute("COMMIT")
    conn.close()


async def test_migrates_a_version_2_ledger_and_folds_its_energy_as_it_goes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    old = _minute_records("GPU-a", 0, [(T0, "listed")], T0 + timedelta(days=2), 200)
    _v2_database(path, old)
    ledger = await SqliteLedger.open(path, host="box")
    try:
        assert (ledger.migrated_from, ledger.schema_version) == (2, SCHEMA_VERSION) == (2, 4)
        cuts = _days(2)
        before = await ledger.energy_totals(cuts)
        assert sum(t.joules for t in before) == pytest.approx(sum(r.joules for r in old))
        # The service writes its next minute: what is over a day old gets folded.
        after_t = T0 + timedelta(days=2)
        new = EnergyRecord("GPU-a", 0, "listed", after_t, after_t + timedelta(minutes=1), 1.0)
        await ledger.add_energy([new])
        conn = sqlite3.connect(path)
        raw = conn.execute("SELECT COUNT(*) FROM energy WHERE slot IS NULL").fetchone()[0]
        conn.close()
        assert raw < len(old) // 2 + 30
        after = await ledger.energy_totals(cuts)
        assert [t.joules for t in after] == pytest.approx(
            [t.joules for t in energy_totals_of([*old, new], cuts)]
        )
    finally:
        await ledger.close()


# -- demand -------------------------------------------------------------------------------


async def test_demand_round_trip_by_range_and_service(ledger: SqliteLedger) -> None:
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


def _demand_rows(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    raw = conn.execute("SELECT COUNT(*) FROM demand WHERE bucket IS NULL").fetchone()[0]
    folded = conn.execute("SELECT COUNT(*) FROM demand WHERE bucket IS NOT NULL").fetchone()[0]
    conn.close()
    return raw, folded


async def test_old_demand_is_folded_by_service_outcome_and_bucket(
    ledger: SqliteLedger,
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
    assert _demand_rows(ledger.path) == (600, 0)  # fresh: nothing folded yet
    # A request written after the retention has passed folds everything older.
    fresh_at = minutes(600) + timedelta(seconds=DEMAND_RAW_RETENTION)
    fresh = DemandRecord("ollama", fresh_at, 3.0, "passed")
    await ledger.add_demand([fresh])
    raw, folded = _demand_rows(ledger.path)
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


async def test_a_late_request_joins_its_folded_bucket(ledger: SqliteLedger) -> None:
    await ledger.add_demand([DemandRecord("ollama", minutes(2), 10.0, "passed")])
    await ledger.compact_demand(minutes(60))
    await ledger.add_demand([DemandRecord("ollama", minutes(1), 5.0, "passed")])
    await ledger.compact_demand(minutes(60))
    assert _demand_rows(ledger.path) == (0, 1)
    [row] = await ledger.demand(minutes(0), minutes(60))
    assert (row.arrival, row.count, row.duration_s) == (minutes(1), 2, 15.0)
