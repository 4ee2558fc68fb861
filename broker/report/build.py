"""The earnings report: hours, energy, cost, carbon and earnings per period, from the ledger.

Reads the ledger only (never the GPUs or the provider), and never the clock: `now` is passed
in, so the CLI, the dashboard and the tests decide what "now" is.

How each figure is made (the README's "Report" section says the same for users):

- **States to buckets**: local = LOCAL, PAUSED, DEGRADED; idle = IDLE, DRAINING;
  listed = LISTED; rented = RENTED, RECLAIMING. LOST (a GPU off the bus) and any state not
  named here count in no bucket, so a GPU row's hours can add up to less than the period.
- **Hours**: the `gpu = "all"` rows use the pool's intervals (wall-clock hours of the
  machine); a `--gpu N` row uses that GPU's own intervals. An interval still open counts
  up to `now`.
- **Rented GPU-hours**: summed over the GPUs' own intervals in the rented bucket (a GPU is
  recorded RENTED only while a renter occupies it).
- **Energy** is bucketed by the pool state it was drawn under (`EnergyRecord.pool_state`),
  GPU draw plus the host overhead share. Energy under a state the report does not know
  counts as local, so no measured joule is ever left out.
- **Energy cost and CO2** count the energy drawn while listed or rented (what renting
  costs and emits), each kWh at the tariff in force when it was drawn; a record that spans
  a tariff change is shared by time.
- **Extra energy** (`extra_energy_cost`, `extra_net`): what renting drew above what the
  idle server draws anyway. The idle baseline is the GPUs' own draw (NVML, without the host
  overhead) averaged over the time the pool spent IDLE or LISTED in the 30 days before the
  report's end (and over the whole report, if longer): their joules drawn under those pool
  states divided by the pool's seconds in them, so it is this machine's measured idle draw,
  not a figure from a data sheet. A `--gpu N` row uses that GPU's joules over the same
  seconds. Extra energy is then, per slice (period, tariff, UTC day), the GPUs' joules drawn
  while RENTED or RECLAIMING minus baseline x the pool's seconds in those states, never below
  zero; the host overhead and energy drawn while listed are never extra (the server draws
  them whether or not it is offered). With no idle or listed time in the window the baseline
  is 0 (all GPU draw while rented counts as extra, overhead still does not). Costed at the
  tariff in force, as `energy_cost` is.
- **Earnings**: the provider reports per UTC day. A day's amount is spread over the local
  periods in proportion to the rented GPU-hours of that UTC day that fall in each (and over
  GPUs the same way); a day with earnings but no rented hours recorded goes to the period
  holding its noon (UTC), shared equally among the GPUs. A UTC day with no ledger figure is
  estimated as the provider's `price_gpu` x its rented GPU-hours. A row is "provider" when
  it got a provider-reported figure and nothing estimated, else "estimate".
- **Currency**: amounts already in `energy.currency` are used as they are; USD amounts are
  divided by `provider.usd_per_currency`.
- **Held / rejected requests**: the journal's `request_held` / `request_rejected` notes. A
  GPU row counts those of services whose `gpus` include it (a service with no `gpus` list
  counts on every GPU); requests of services no longer configured count in "all" rows only.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from broker.config import Config
from broker.errors import BrokerError
from broker.ledger.base import (
    EarningsRecord,
    EarningsSource,
    EnergyTotal,
    JournalEntry,
    Ledger,
    PriceRecord,
    StateInterval,
)
from broker.report.periods import By, Period, periods
from broker.report.prices import PriceSummary, price_summary, read_prices
from broker.scheduling.tariffs import Rate, TariffSchedule

Bucket = Literal["local", "idle", "listed", "rented"]
BUCKETS: tuple[Bucket, ...] = ("local", "idle", "listed", "rented")
COSTED: frozenset[Bucket] = frozenset({"listed", "rented"})

BUCKET_OF_STATE: Mapping[str, Bucket] = {
    "LOCAL": "local",
    "PAUSED": "local",
    "DEGRADED": "local",
    "IDLE": "idle",
    "DRAINING": "idle",
    "LISTED": "listed",
    "RENTED": "rented",
    "RECLAIMING": "rented",
}

HELD, REJECTED = "request_held", "request_rejected"
JOULES_PER_KWH = 3_600_000.0
# Pool states whose GPU draw is the idle baseline, and how far back it is measured.
BASELINE_STATES = frozenset({"IDLE", "LISTED"})
BASELINE_WINDOW = timedelta(days=30)


class ReportError(BrokerError):
    """The ledger holds something the report cannot turn into figures."""


RENTED_STATES = tuple(
    case(state)
    for state, bucket in BUCKET_OF_STATE.items()
    if bucket == "rented"
    for case in (str.upper, str.lower)
)


def bucket_of(state: str) -> Bucket | None:
    return BUCKET_OF_STATE.get(state) or BUCKET_OF_STATE.get(state.upper())


@dataclass(frozen=True)
class ReportRow:
    period: str  # a period's label, or "total"
    start: datetime
    end: datetime
    gpu: int | None  # None: the whole machine ("all")
    hours: Mapping[Bucket, float]
    rented_gpu_hours: float
    earnings: float
    earnings_source: EarningsSource
    energy_kwh: Mapping[Bucket, float]
    energy_cost: float
    co2_kg: float
    held_requests: int
    rejected_requests: int
    extra_energy_cost: float = 0.0  # only what renting drew above the idle server's draw

    @property
    def net(self) -> float:
        return self.earnings - self.energy_cost

    @property
    def extra_net(self) -> float:
        return self.earnings - self.extra_energy_cost

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "gpu": "all" if self.gpu is None else self.gpu,
            "hours": {b: _num(self.hours[b]) for b in BUCKETS},
            "rented_gpu_hours": _num(self.rented_gpu_hours),
            "earnings": _num(self.earnings),
            "earnings_source": self.earnings_source,
            "energy_kwh": {b: _num(self.energy_kwh[b]) for b in BUCKETS},
            "energy_cost": _num(self.energy_cost),
            "net": _num(self.net),
            "extra_energy_cost": _num(self.extra_energy_cost),
            "extra_net": _num(self.extra_net),
            "co2_kg": _num(self.co2_kg),
            "held_requests": self.held_requests,
            "rejected_requests": self.rejected_requests,
        }


@dataclass(frozen=True)
class Report:
    currency: str
    timezone: str
    start: datetime
    end: datetime
    by: By
    gpu: int | None
    rows: list[ReportRow]
    totals: ReportRow
    prices: PriceSummary | None = None  # realised price beside the market's (prices.py)

    def to_json(self) -> dict[str, Any]:
        """SPEC section 6: the object `gpu-broker report --format json` prints."""
        tz = ZoneInfo(self.timezone)
        return {
            "currency": self.currency,
            "from": self.start.astimezone(tz).isoformat(),
            "to": self.end.astimezone(tz).isoformat(),
            "by": self.by,
            "rows": [row.to_json() for row in self.rows],
            "totals": self.totals.to_json(),
            **({"prices": self.prices.to_json()} if self.prices is not None else {}),
        }


def _num(x: float) -> float:
    # Six decimals hide float noise (0.30000000000000004) and keep a millicent; +0.0 not -0.0.
    return round(x, 6) + 0.0


@dataclass
class _Acc:
    hours: dict[Bucket, float] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0.0))
    energy: dict[Bucket, float] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0.0))
    rented_gpu_s: float = 0.0
    earnings: float = 0.0
    provider_figure: bool = False
    estimated: bool = False
    cost: float = 0.0
    extra_cost: float = 0.0
    co2: float = 0.0
    held: int = 0
    rejected: int = 0

    def add(self, other: _Acc) -> None:
        for b in BUCKETS:
            self.hours[b] += other.hours[b]
            self.energy[b] += other.energy[b]
        self.rented_gpu_s += other.rented_gpu_s
        self.earnings += other.earnings
        self.provider_figure |= other.provider_figure
        self.estimated |= other.estimated
        self.cost += other.cost
        self.extra_cost += other.extra_cost
        self.co2 += other.co2
        self.held += other.held
        self.rejected += other.rejected

    def row(self, period: str, start: datetime, end: datetime, gpu: int | None) -> ReportRow:
        return ReportRow(
            period=period,
            start=start,
            end=end,
            gpu=gpu,
            hours={b: s / 3600.0 for b, s in self.hours.items()},
            rented_gpu_hours=self.rented_gpu_s / 3600.0,
            earnings=self.earnings,
            earnings_source=(
                "provider" if self.provider_figure and not self.estimated else "estimate"
            ),
            energy_kwh=dict(self.energy),
            energy_cost=self.cost,
            extra_energy_cost=self.extra_cost,
            co2_kg=self.co2,
            held_requests=self.held,
            rejected_requests=self.rejected,
        )


class _Slices:
    """[since, end) cut at every period boundary, tariff change and UTC midnight: inside a
    slice the period, the rate and the provider's day are all constant."""

    def __init__(
        self, since: datetime, end: datetime, spans: Sequence[Period], schedule: TariffSchedule
    ) -> None:
        segments = schedule.segments(since, end)
        midnight = datetime.combine(since.astimezone(UTC).date(), time(), UTC)
        cuts = {since, end}
        cuts.update(p.start for p in spans)
        cuts.update(s.interval.start for s in segments)
        while (midnight := midnight + timedelta(days=1)) < end:
            cuts.add(midnight)
        self.cuts = sorted(c for c in cuts if since <= c <= end)
        self._starts = [c.timestamp() for c in self.cuts]
        period_starts = [p.start for p in spans]
        segment_starts = [s.interval.start for s in segments]
        self.period: list[int] = []
        self.rate: list[Rate] = []
        self.day: list[date] = []
        for a in self.cuts[:-1]:
            self.period.append(bisect.bisect_right(period_starts, a) - 1)
            self.rate.append(segments[bisect.bisect_right(segment_starts, a) - 1].rate)
            self.day.append(a.astimezone(UTC).date())

    def pieces(self, a: float, b: float) -> list[tuple[int, float]]:
        """(slice, seconds) of [a, b) (epoch seconds) within the slices."""
        out: list[tuple[int, float]] = []
        i = max(0, bisect.bisect_right(self._starts, a) - 1)
        while i < len(self._starts) - 1 and self._starts[i] < b:
            seconds = min(b, self._starts[i + 1]) - max(a, self._starts[i])
            if seconds > 0:
                out.append((i, seconds))
            i += 1
        return out


def _to_currency(amount: float, currency: str, config: Config) -> float:
    target = config.energy.currency
    if currency == target:
        return amount
    if currency == "USD":
        return amount / config.provider.usd_per_currency
    raise ReportError(
        f"the ledger holds earnings in {currency}, which cannot be converted to "
        f"energy.currency ({target}): only USD is converted (provider.usd_per_currency)"
    )


def _price_gpu(config: Config) -> float:
    """The estimate's price per rented GPU-hour, in energy.currency."""
    price = config.provider.estimate_price_gpu()
    # None: the price is set elsewhere (RunPod's dashboard); the broker does not know it.
    return 0.0 if price is None else _to_currency(price, "USD", config)


DAY_SECONDS = 86_400.0
_EPOCH = date(1970, 1, 1).toordinal()


def _epoch_day(day: date) -> int:
    """A UTC day as days since 1970-01-01 (a UTC timestamp // 86 400)."""
    return day.toordinal() - _EPOCH


def _span(interval: StateInterval, a: float, b: float, now: float) -> tuple[float, float] | None:
    """The part of `interval` in [a, b) as epoch seconds (an open one runs to `now`)."""
    x = max(interval.start.timestamp(), a)
    y = min(now if interval.end is None else interval.end.timestamp(), now, b)
    return (x, y) if y > x else None


def _baseline_watts(
    pool: Sequence[StateInterval],
    energy: Sequence[EnergyTotal],
    start: datetime,
    end: datetime,
    now: datetime,
) -> float:
    """The GPUs' (or one GPU's) mean draw in watts while the pool was IDLE or LISTED in
    [start, end): their joules under those pool states (`energy`, over that window) over
    the pool's seconds in them, host overhead left out. 0 when the pool spent no time there."""
    seconds = 0.0
    a, b, now_ts = start.timestamp(), end.timestamp(), now.timestamp()
    for interval in pool:
        if interval.state.upper() in BASELINE_STATES:
            span = _span(interval, a, b, now_ts)
            if span is not None:
                seconds += span[1] - span[0]
    if seconds <= 0:
        return 0.0
    joules = sum(part.joules for part in energy if part.pool_state.upper() in BASELINE_STATES)
    return joules / seconds


@dataclass(frozen=True)
class ReportPlan:
    """What a report covers, worked out from the config alone (periods, tariff slices, the
    days and the baseline window to read): the same for every host of a fleet, so a fleet
    report makes it once."""

    since: datetime
    end: datetime
    now: datetime
    by: By
    gpu: int | None
    spans: list[Period]
    slices: _Slices
    day0: datetime  # whole UTC days around the range: a provider day's earnings are shared
    day_end: datetime  # by the rented hours of that whole day
    baseline_start: datetime  # the idle baseline is measured over [baseline_start, end)

    @property
    def first_day(self) -> date:
        return self.day0.date()

    @property
    def last_day(self) -> date:
        return (self.day_end - timedelta(days=1)).date()

    @property
    def baseline_in_spans(self) -> bool:
        """The baseline window is the report's own range: its energy is the spans' sum."""
        return self.baseline_start == self.since


def plan_report(
    config: Config,
    *,
    since: datetime,
    until: datetime,
    now: datetime,
    by: By = "day",
    gpu: int | None = None,
) -> ReportPlan:
    """Raises `ValueError` for an empty range."""
    tz = config.broker.tz
    since, until, now = (t.astimezone(UTC) for t in (since, until, now))
    end = min(until, now)
    if since >= end:
        raise ValueError(f"the report's start ({since}) is not before its end ({end})")
    spans = periods(since, end, by, tz)
    slices = _Slices(since, end, spans, TariffSchedule.from_config(config.energy, tz))
    first_day = since.astimezone(UTC).date()
    last_day = (end - timedelta(microseconds=1)).astimezone(UTC).date()
    return ReportPlan(
        since=since,
        end=end,
        now=now,
        by=by,
        gpu=gpu,
        spans=spans,
        slices=slices,
        day0=datetime.combine(first_day, time(), UTC),
        day_end=datetime.combine(last_day + timedelta(days=1), time(), UTC),
        baseline_start=min(since, end - BASELINE_WINDOW),
    )


@dataclass(frozen=True)
class ReportInputs:
    """One host's rows a report is made of, as `read_inputs` reads them for a plan."""

    energy: Sequence[EnergyTotal]  # per slice of plan.slices.cuts
    baseline_energy: Sequence[EnergyTotal]  # over [plan.baseline_start, plan.end)
    # The pool's intervals over [min(day0, baseline_start), day_end) ...
    pool: Sequence[StateInterval]
    # ... and the GPUs' over [day0, day_end): only the rented ones for the whole machine
    # (a year of 8 GPUs is some 20 000 intervals; the rented ones are a fifth of that).
    gpus: Sequence[StateInterval]
    earnings: Sequence[EarningsRecord]  # days first_day..last_day
    notes: Sequence[JournalEntry]  # held and rejected requests since plan.since
    prices: Sequence[PriceRecord] = ()  # asks, rentals and market reads in [since, end)


def pool_window(plan: ReportPlan) -> tuple[datetime, datetime]:
    """The range of the pool intervals a report reads."""
    return min(plan.day0, plan.baseline_start), plan.day_end


def gpu_states(plan: ReportPlan) -> Sequence[str] | None:
    """The GPU states a report reads (None: all)."""
    return RENTED_STATES if plan.gpu is None else None


async def read_inputs(ledger: Ledger, plan: ReportPlan) -> ReportInputs:
    energy = await ledger.energy_totals(plan.slices.cuts, gpu_index=plan.gpu)
    baseline = (
        energy
        if plan.baseline_in_spans
        else await ledger.energy_totals([plan.baseline_start, plan.end], gpu_index=plan.gpu)
    )
    return ReportInputs(
        energy=energy,
        baseline_energy=baseline,
        pool=await ledger.state_intervals(*pool_window(plan), scope="pool"),
        gpus=await ledger.state_intervals(
            plan.day0, plan.day_end, scope="gpu", states=gpu_states(plan)
        ),
        earnings=await ledger.earnings(plan.first_day, plan.last_day),
        notes=await read_notes(ledger, plan),
        prices=await read_prices(ledger, plan.since, plan.end),
    )


async def read_notes(ledger: Ledger, plan: ReportPlan) -> list[JournalEntry]:
    """The held and rejected requests a report counts."""
    return await ledger.journal_entries(since=plan.since, status="note", kinds=[HELD, REJECTED])


async def build_report(
    ledger: Ledger,
    config: Config,
    *,
    since: datetime,
    until: datetime,
    now: datetime,
    by: By = "day",
    gpu: int | None = None,
) -> Report:
    """Rows per period over [since, min(until, now)): the whole machine (`gpu` None) or
    one GPU by index. Raises `ValueError` for an empty range, `ReportError` for earnings in
    a currency that cannot be converted."""
    plan = plan_report(config, since=since, until=until, now=now, by=by, gpu=gpu)
    return compute_report(plan, await read_inputs(ledger, plan), config)


def compute_report(plan: ReportPlan, inputs: ReportInputs, config: Config) -> Report:
    """The report of one host's rows: no I/O."""
    since, end, now, gpu = plan.since, plan.end, plan.now, plan.gpu
    since_ts, end_ts, now_ts = since.timestamp(), end.timestamp(), now.timestamp()
    spans, slices = plan.spans, plan.slices
    accs = [_Acc() for _ in spans]

    # -- energy, its cost and carbon: summed by the store per slice and pool state (and
    # UUID, for one GPU: its intervals are found by the UUIDs its index had).
    uuids: set[str] = set()
    rented_joules: dict[int, float] = defaultdict(float)  # GPU draw while rented, by slice
    for part in inputs.energy:
        if part.gpu_uuid is not None:
            uuids.add(part.gpu_uuid)
        acc = accs[slices.period[part.span]]
        drawn_in = bucket_of(part.pool_state) or "local"
        kwh = (part.joules + part.overhead_joules) / JOULES_PER_KWH
        acc.energy[drawn_in] += kwh
        if drawn_in == "rented":
            rented_joules[part.span] += part.joules
        if drawn_in in COSTED:
            rate = slices.rate[part.span]
            acc.cost += kwh * rate.price_per_kwh
            acc.co2 += kwh * rate.carbon_g_per_kwh / 1000.0

    # -- hours. Intervals are read over whole UTC days around the range, because the
    # earnings of a provider day are shared by the rented hours of that whole day (the
    # pool's reach back to the baseline window too: clipping to the range leaves those out).
    gpu_intervals = inputs.gpus
    rented_s: dict[int, float] = defaultdict(float)  # the pool's seconds rented, by slice
    for interval in inputs.pool if gpu is None else [
        i for i in gpu_intervals if i.subject in uuids
    ]:  # fmt: skip
        bucket = bucket_of(interval.state)
        if bucket is None:
            continue
        span = _span(interval, since_ts, end_ts, now_ts)
        if span is not None:
            for i, seconds in slices.pieces(*span):
                accs[slices.period[i]].hours[bucket] += seconds
                if bucket == "rented" and gpu is None:
                    rented_s[i] += seconds

    # -- extra energy: the GPUs' draw while rented above their idle baseline
    baseline_w = _baseline_watts(
        inputs.pool, inputs.baseline_energy, plan.baseline_start, end, now
    )
    if gpu is not None:  # the pool's rented seconds, not the GPU's own
        for interval in inputs.pool:
            if bucket_of(interval.state) == "rented" and (
                span := _span(interval, since_ts, end_ts, now_ts)
            ) is not None:
                for i, seconds in slices.pieces(*span):
                    rented_s[i] += seconds
    for i in set(rented_joules) | set(rented_s):
        extra_kwh = max(0.0, rented_joules[i] - baseline_w * rented_s[i]) / JOULES_PER_KWH
        accs[slices.period[i]].extra_cost += extra_kwh * slices.rate[i].price_per_kwh

    # -- rented GPU-hours: this report's GPUs' per slice, and every GPU's per whole UTC
    # day (by days since the epoch) for sharing earnings.
    all_gpus = {i.subject for i in gpu_intervals}
    mine: dict[int, float] = defaultdict(float)
    rented_day: dict[int, float] = defaultdict(float)
    day0, day_end = plan.day0.timestamp(), plan.day_end.timestamp()
    for interval in gpu_intervals:
        if bucket_of(interval.state) != "rented":
            continue
        a = max(interval.start.timestamp(), day0)
        b = min(interval.end.timestamp() if interval.end else now_ts, now_ts, day_end)
        while a < b:
            k = int(a // DAY_SECONDS)
            midnight = (k + 1) * DAY_SECONDS
            rented_day[k] += min(b, midnight) - a
            a = midnight
        if gpu is not None and interval.subject not in uuids:
            continue
        span = _span(interval, since_ts, end_ts, now_ts)
        if span is not None:
            for i, seconds in slices.pieces(*span):
                mine[i] += seconds
    for i, seconds in mine.items():
        accs[slices.period[i]].rented_gpu_s += seconds

    # -- earnings
    reported: dict[date, tuple[float, bool]] = {}
    for record in inputs.earnings:
        amount, all_provider = reported.get(record.day, (0.0, True))
        reported[record.day] = (
            amount + _to_currency(record.amount, record.currency, config),
            all_provider and record.source == "provider",
        )
    price = _price_gpu(config)
    for i, seconds in mine.items():
        acc = accs[slices.period[i]]
        day = slices.day[i]
        if seconds <= 0:
            continue
        if day in reported:
            amount, from_provider = reported[day]
            whole_day = rented_day[_epoch_day(day)]
            if whole_day > 0:
                acc.earnings += amount * seconds / whole_day
                acc.provider_figure |= from_provider
                acc.estimated |= not from_provider
        else:
            acc.earnings += price * seconds / 3600.0
            acc.estimated = True
    for day, (amount, from_provider) in reported.items():
        noon = datetime.combine(day, time(12), UTC)
        if rented_day[_epoch_day(day)] > 0 or not since <= noon < end:
            continue
        acc = accs[bisect.bisect_right([p.start for p in spans], noon) - 1]
        if gpu is not None:
            amount = amount / len(all_gpus) if all_gpus and uuids & all_gpus else 0.0
        acc.earnings += amount
        acc.provider_figure |= from_provider
        acc.estimated |= not from_provider

    # -- held and rejected local requests
    gpus_of = {s.name: s.gpus for s in config.services}
    starts = [p.start for p in spans]
    for note in inputs.notes:
        if note.at >= end:
            continue
        if gpu is not None:
            served = gpus_of.get(note.subject)
            if served is None or (served and gpu not in served):
                continue
        acc = accs[bisect.bisect_right(starts, note.at) - 1]
        if note.kind == HELD:
            acc.held += 1
        else:
            acc.rejected += 1

    rows = [acc.row(p.label, p.start, p.end, gpu) for p, acc in zip(spans, accs, strict=True)]
    total = _Acc()
    for acc in accs:
        total.add(acc)
    totals = total.row("total", since, end, gpu)
    prices = price_summary(
        inputs.prices, earnings=totals.earnings,
        rented_gpu_hours=totals.rented_gpu_hours,
        usd_per_currency=config.provider.usd_per_currency,
    )  # fmt: skip
    return Report(
        currency=config.energy.currency,
        timezone=config.broker.timezone,
        start=since,
        end=end,
        by=plan.by,
        gpu=gpu,
        rows=rows,
        totals=totals,
        prices=prices,
    )
