"""What the broker keeps: state intervals, energy, earnings and a journal of its actions.

`Ledger` is the interface every store implements (SQLite, and PostgreSQL for a fleet).
All times are timezone-aware UTC datetimes; the store decides how to keep them. Callers pass
every timestamp in, so a store never reads a clock.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import pairwise
from typing import Any, Literal, Protocol, cast

Scope = Literal["pool", "gpu"]
JournalStatus = Literal["intent", "done", "failed", "note"]
EarningsSource = Literal["provider", "estimate"]
DemandOutcome = Literal["passed", "held", "refused"]


# How both stores keep times: epoch seconds, taken from aware datetimes only.


def epoch(t: datetime) -> float:
    if t.tzinfo is None:
        raise ValueError("the ledger takes timezone-aware datetimes only")
    return t.timestamp()


def cut_bounds(cuts: Sequence[datetime]) -> list[float]:
    """`energy_totals`' cuts as POSIX seconds; ValueError unless they increase."""
    bounds = [epoch(t) for t in cuts]
    if any(b <= a for a, b in pairwise(bounds)):
        raise ValueError("energy_totals: the cuts must increase")
    return bounds


def utc_or_none(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True)
class StateInterval:
    scope: Scope
    subject: str  # pool name or GPU UUID
    state: str
    start: datetime
    end: datetime | None  # None while the state is still in force
    reason: str = ""
    host: str = ""


@dataclass(frozen=True)
class EnergyRecord:
    """Energy one GPU drew over [start, end) while the pool was in `pool_state`."""

    gpu_uuid: str
    gpu_index: int
    pool_state: str
    start: datetime
    end: datetime
    joules: float  # what the GPU itself drew (energy counter, or integrated power)
    overhead_joules: float = 0.0  # this GPU's share of host draw NVML does not see
    method: Literal["counter", "integrated", "mixed"] = "counter"
    host: str = ""


@dataclass(frozen=True)
class EnergyTotal:
    """Energy drawn in one span of `Ledger.energy_totals` under one pool state: by the whole
    machine (`gpu_uuid` and `gpu_index` None), or by one GPU."""

    span: int  # i for the span [cuts[i], cuts[i + 1])
    pool_state: str
    joules: float
    overhead_joules: float
    gpu_uuid: str | None = None
    gpu_index: int | None = None


def energy_totals_of(
    records: Iterable[EnergyRecord], cuts: Sequence[datetime], gpu_index: int | None = None
) -> list[EnergyTotal]:
    """What `Ledger.energy_totals` answers, computed from records in memory.

    A record that straddles a cut is shared between the spans in proportion to time (its
    power is taken as even over the record); a record of no length counts where it starts.
    """
    bounds = [t.timestamp() for t in cuts]
    sums: dict[tuple[int, str, str, int], list[float]] = {}
    for r in records:
        if gpu_index is not None and r.gpu_index != gpu_index:
            continue
        start, end = r.start.timestamp(), r.end.timestamp()
        for i in range(len(bounds) - 1):
            a, b = bounds[i], bounds[i + 1]
            if end > start:
                share = (min(end, b) - max(start, a)) / (end - start)
                if share <= 0:
                    continue
            elif a <= start < b:
                share = 1.0
            else:
                continue
            key = (i, r.pool_state, r.gpu_uuid, r.gpu_index) if gpu_index is not None else (
                i, r.pool_state, "", -1
            )
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += r.joules * share
            acc[1] += r.overhead_joules * share
    return [
        EnergyTotal(span, state, joules, overhead, uuid or None, None if index < 0 else index)
        for (span, state, uuid, index), (joules, overhead) in sorted(sums.items())
    ]


@dataclass(frozen=True)
class IdleRecord:
    """How one GPU idled over [start, end): each sample in which it did no work (utilisation
    under `[gpus] idle_utilization_pct`) counted by its draw in whole watts, its P-state, its
    memory in use in whole MB and the processes holding it. Counts rather than a mean, so a
    median over any span of records is exact to the watt (`eco` judges median idle draw)."""

    gpu_uuid: str
    gpu_index: int
    start: datetime
    end: datetime
    samples: int
    watts: Mapping[int, int]
    pstates: Mapping[int, int]
    memory_mb: Mapping[int, int]
    processes: Mapping[str, int]  # process name (or "pid N") -> samples it held the card
    host: str = ""


@dataclass(frozen=True)
class EarningsRecord:
    """One provider's earnings for one machine on one day (the provider's own day)."""

    provider: str
    machine_id: str
    day: date
    amount: float
    currency: str
    source: EarningsSource
    updated: datetime
    detail: dict[str, Any] = field(default_factory=dict)
    host: str = ""


@dataclass(frozen=True)
class DemandRecord:
    """Local inference requests seen at one service's gate.

    A fresh record is one request (`count` 1). Compaction folds old records into one per
    (service, outcome, bucket): `arrival` is then the bucket's first arrival, `count` how
    many requests it holds, and `duration_s` / `held_s` their sums, so totals and means
    survive while a year of a large team stays small.
    """

    service: str
    arrival: datetime
    duration_s: float  # arrival to the end of the answer (or of the refusal)
    outcome: DemandOutcome  # passed at once, held at the gate then passed, or refused
    held_s: float = 0.0  # time spent held at the gate before passing or being refused
    count: int = 1
    host: str = ""


PriceKind = Literal["ask", "rental", "market"]


@dataclass(frozen=True)
class PriceRecord:
    """A price the broker saw or set, USD per GPU-hour: the ask of a listing, the price a
    rental locked in, or the market median (host terms) with its peer count."""

    at: datetime
    kind: PriceKind
    price: float
    peers: int | None = None
    host: str = ""


@dataclass(frozen=True)
class ModelLoad:
    """A model a local service loaded into GPU memory, as its watcher saw it: for Ollama a
    model new in `/api/ps`, for ComfyUI a running prompt whose checkpoint differs from the
    last prompt's. `gpus` are the GPUs the service is configured on (neither service says
    on which of them it placed the model). Sizing counts these as model reloads."""

    service: str
    at: datetime
    model: str
    gpus: tuple[int, ...] = ()
    host: str = ""


def gpu_list_text(gpus: Sequence[int]) -> str:
    """GPU indices as the stores keep them: "0,1"."""
    return ",".join(str(i) for i in gpus)


def gpu_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class JournalEntry:
    """A decision or an external action. An `intent` is written before the action is taken
    and later completed as `done` or `failed`, so a restart can see what was in flight."""

    at: datetime
    kind: str  # e.g. "list", "unlist", "drain", "transition", "request_held"
    status: JournalStatus
    subject: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    outcome: str | None = None
    outcome_at: datetime | None = None
    host: str = ""


class Ledger(Protocol):
    """The storage interface. Every method is safe to await from the event loop."""

    @property
    def schema_version(self) -> int: ...

    @property
    def host(self) -> str: ...

    @property
    def reachable(self) -> bool:
        """False while the store is known to be unreachable (a shared database that went
        away): writes wait in the spool, and nothing is listed (SPEC invariant 4)."""
        ...

    async def close(self) -> None: ...

    async def hosts(self) -> list[str]:
        """Every host with rows in this store, by name (a shared database holds a fleet)."""
        ...

    async def for_host(self, host: str) -> Ledger:
        """A ledger reading and writing `host`'s rows in the same store, claiming nothing;
        closing it leaves this one open. Fleet reports read each host through one."""
        ...

    async def record_state(
        self, scope: Scope, subject: str, state: str, at: datetime, reason: str = ""
    ) -> None:
        """Close the interval in force for (scope, subject) at `at` and open `state`."""
        ...

    async def close_states(self, at: datetime) -> int:
        """Close every open interval of this host at `at` (clean shutdown). Returns how many."""
        ...

    async def state_intervals(
        self,
        start: datetime,
        end: datetime,
        scope: Scope | None = None,
        subject: str | None = None,
        states: Sequence[str] | None = None,
    ) -> list[StateInterval]:
        """Intervals of this host overlapping [start, end), unclipped, ordered by start;
        only those in `states` when given."""
        ...

    async def state_intervals_by_host(
        self,
        hosts: Sequence[str],
        start: datetime,
        end: datetime,
        scope: Scope | None = None,
        subject: str | None = None,
        states: Sequence[str] | None = None,
    ) -> dict[str, list[StateInterval]]:
        """`state_intervals` of each of `hosts` of this store, by host, read at once (a
        fleet report's); hosts with none are left out."""
        ...

    async def add_energy(self, records: Sequence[EnergyRecord]) -> None: ...

    async def energy(
        self, start: datetime, end: datetime, gpu_uuid: str | None = None
    ) -> list[EnergyRecord]:
        """Records of this host that overlap [start, end), ordered by start."""
        ...

    async def energy_totals(
        self, cuts: Sequence[datetime], gpu_index: int | None = None
    ) -> list[EnergyTotal]:
        """This host's energy in each span [cuts[i], cuts[i + 1]): the whole machine's by
        pool state, or with `gpu_index` that GPU's by UUID and pool state; ordered by span,
        state (and UUID). `cuts` must increase. A record straddling a cut is shared in
        proportion to time, as `energy_totals_of` does; spans with no energy are left out.
        This is what reports read: the store sums, so a year stays fast."""
        ...

    async def energy_totals_by_host(
        self, hosts: Sequence[str], cuts: Sequence[datetime], gpu_index: int | None = None
    ) -> dict[str, list[EnergyTotal]]:
        """`energy_totals` of each of `hosts` of this store, by host, read at once (a fleet
        report's); hosts with no energy are left out."""
        ...

    async def add_demand(self, records: Sequence[DemandRecord]) -> None:
        """Append local requests (as the gates buffer them, a batch at a time). Records
        older than the store's raw retention are folded by service, outcome and bucket."""
        ...

    async def demand(
        self, start: datetime, end: datetime, service: str | None = None
    ) -> list[DemandRecord]:
        """Records of this host whose `arrival` is in [start, end), ordered by arrival;
        only `service`'s when given. Folded records come back as they are kept (`count`
        requests, summed durations), never expanded."""
        ...

    async def add_price(self, record: PriceRecord) -> None:
        """Append one price (a listing's ask, a rental's price, a market read)."""
        ...

    async def prices(
        self, start: datetime, end: datetime, kind: PriceKind | None = None
    ) -> list[PriceRecord]:
        """This host's prices with `at` in [start, end), ordered by time; `kind`'s only."""
        ...

    async def add_model_loads(self, records: Sequence[ModelLoad]) -> None:
        """Append models the service watchers saw being loaded."""
        ...

    async def model_loads(
        self, start: datetime, end: datetime, service: str | None = None
    ) -> list[ModelLoad]:
        """Loads of this host at a time in [start, end), ordered by time; only `service`'s
        when given."""
    async def add_idle(self, records: Sequence[IdleRecord]) -> None:
        """Append per-GPU idle statistics (one record per GPU and 15-minute slot)."""
        ...

    async def idle(
        self, start: datetime, end: datetime, gpu_uuid: str | None = None
    ) -> list[IdleRecord]:
        """Idle records of this host that overlap [start, end), ordered by start."""
        ...

    async def upsert_earnings(self, records: Sequence[EarningsRecord]) -> int:
        """Insert or replace by (provider, machine_id, day); returns rows that changed.

        A provider-reported figure replaces an estimate; an estimate never replaces a
        provider figure.
        """
        ...

    async def earnings(self, first_day: date, last_day: date) -> list[EarningsRecord]:
        """Records for days first_day..last_day inclusive, ordered by day."""
        ...

    async def journal(self, entry: JournalEntry) -> int:
        """Append an entry; returns its id."""
        ...

    async def complete(
        self, entry_id: int, status: JournalStatus, at: datetime, outcome: str = ""
    ) -> None:
        """Mark an intent done or failed."""
        ...

    async def journal_entries(
        self,
        since: datetime | None = None,
        status: JournalStatus | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[JournalEntry]:
        """Entries of this host, oldest first."""
        ...


def counts_json(counts: Mapping[Any, int]) -> str:
    """An `IdleRecord` count map as the stores keep it: a JSON object, keys as strings."""
    return json.dumps({str(k): v for k, v in counts.items()}, sort_keys=True)


def int_counts(text: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in json.loads(text).items()}


def str_counts(text: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in json.loads(text).items()}


# Rows of the tables both stores share, as their columns run (the SQL differs, not these).


def idle_row(host: str, r: IdleRecord) -> tuple[Any, ...]:
    """gpu_idle (host, gpu_uuid, gpu_index, start_ts, end_ts, samples, watts, pstates,
    memory_mb, processes)."""
    return (
        host, r.gpu_uuid, r.gpu_index, epoch(r.start), epoch(r.end), r.samples,
        counts_json(r.watts), counts_json(r.pstates), counts_json(r.memory_mb),
        counts_json(r.processes),
    )  # fmt: skip


def idle_of(row: Sequence[Any]) -> IdleRecord:
    """A gpu_idle row read as (gpu_uuid, gpu_index, start_ts, end_ts, samples, watts,
    pstates, memory_mb, processes, host)."""
    return IdleRecord(
        row[0], row[1], utc(row[2]), utc(row[3]), row[4], int_counts(row[5]),
        int_counts(row[6]), int_counts(row[7]), str_counts(row[8]), row[9],
    )  # fmt: skip


def model_load_row(host: str, r: ModelLoad) -> tuple[Any, ...]:
    """model_loads (host, service, ts, model, gpus)."""
    return (host, r.service, epoch(r.at), r.model, gpu_list_text(r.gpus))


def model_load_of(row: Sequence[Any]) -> ModelLoad:
    """A model_loads row read as (service, ts, model, gpus, host)."""
    return ModelLoad(row[0], utc(row[1]), row[2], gpu_list(row[3]), row[4])


def price_of(row: Sequence[Any]) -> PriceRecord:
    """A prices row read as (ts, kind, price, peers, host)."""
    ts, kind, price, peers, host = row
    return PriceRecord(utc(ts), cast(PriceKind, kind), price, peers, host)


@asynccontextmanager
async def host_view(ledger: Ledger, host: str | None) -> AsyncIterator[Ledger]:
    """`ledger` read as `host`'s rows: itself for its own host (or None), else a view that
    is closed after."""
    if host is None or host == ledger.host:
        yield ledger
        return
    view = await ledger.for_host(host)
    try:
        yield view
    finally:
        await view.close()
