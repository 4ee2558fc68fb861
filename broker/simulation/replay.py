"""The event-driven replay: the real `PoolMachine` in virtual time.

Time jumps from one event to the next (a request arrives or ends, the GPUs turn idle, a
renter arrives or leaves, an offer lapses, a window opens or closes, a timer the machine
runs on falls due: idle_window, drain, local_hold, a refused user's retry time, a renewal);
nothing steps across idle hours. The machine is stepped at each event as the live loop
steps it at its next tick, with what the live loop would observe then:

- a local request keeps the GPUs busy while it runs and Ollama's `keep_alive` after it
  (the model stays in GPU memory), then the idle detector's `idle_debounce`;
- a gate that is guarded holds a request up to the service's `max_hold`, or refuses it at
  once when a contract outlasts that (the refused user retries at the time the 503 named);
- a refused user does not fire the rest of that visit into 503s: the visit's further
  requests (same service, each within `VISIT_GAP` of the one before, as rhythm.py counts
  visits) come back shifted by the refused request's wait, as a person who read "GPUs back
  at 14:30" resumes the conversation then (`Timings.patient_users`);
- the drain takes `drain_s`; a marketplace change (a rental ending, the offer lapsing) is
  seen at the next poll (`poll_interval`), except what the loop reads at once: an unlist's
  read-back, the urgent check on GPU load nobody explains (a new renter's container);
- a listing covers the machine: one renter at a time takes it whole (Vast's default).

The live loop steps every `sample_interval`; the replay steps at the event itself, so a
transition can come up to one sample interval earlier than live.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from broker.config import Config, PolicySection
from broker.pricing.settings import PricingSection
from broker.scheduling.loop import RHYTHM_HISTORY
from broker.scheduling.pool import (
    CheckProvider,
    Decision,
    DisplaceInterruptible,
    Drain,
    DrainStatus,
    EndDisplacement,
    List,
    Observation,
    PoolMachine,
    PoolState,
    ProviderView,
    Unlist,
)
from broker.scheduling.rhythm import VISIT_GAP, WeeklyRhythm
from broker.scheduling.windows import Calendar
from broker.simulation.competition import CompetingMarket, MarketAsk
from broker.simulation.economics import EnergyPrice, Machine
from broker.simulation.inputs import Renter, Request

RESTEPS = 4  # as broker/scheduling/loop.py: re-step on the read-back after acting
_EXPOSED = (PoolState.LISTED, PoolState.RENTED, PoolState.RECLAIMING)


@dataclass(frozen=True)
class Timings:
    """The delays of the live service that the replay reproduces."""

    keep_alive_s: float = 300.0  # Ollama keeps a model loaded this long after a request
    debounce_s: float = 30.0  # gpus.idle_debounce
    drain_s: float = 5.0  # unload the models and verify the GPUs free
    poll_s: float = 10.0  # provider.poll_interval
    max_hold_s: float = 30.0  # the services' max_hold
    # The loop's tick: a request shorter than that is still seen at the next step.
    sample_s: float = 1.0
    # A renter's container loads the GPUs at once, and load nobody explains is checked
    # against the marketplace at once; False: a new rental is seen at the next poll.
    renter_load: bool = True
    # A refused visit's further requests wait for the refused one's Retry-After time and
    # keep their spacing after it; False: every request of the trace is fired as recorded.
    patient_users: bool = True

    @classmethod
    def from_config(cls, config: Config, keep_alive_s: float = 300.0) -> Timings:
        holds = [s.max_hold.total_seconds() for s in config.services if s.gate_listen]
        return cls(
            keep_alive_s=keep_alive_s,
            debounce_s=config.gpus.idle_debounce.total_seconds(),
            poll_s=config.provider.poll_interval.total_seconds(),
            max_hold_s=min(holds) if holds else 30.0,
            sample_s=config.broker.sample_interval.total_seconds(),
        )


@dataclass
class Totals:
    earnings: float = 0.0  # energy.currency
    energy_cost: float = 0.0
    extra_energy_cost: float = 0.0
    rented_gpu_hours: float = 0.0
    listed_hours: float = 0.0
    listings: int = 0
    renewals: int = 0
    rentals: int = 0
    renters_turned_away: int = 0  # saw the offer and left (price or time left)
    displaced: int = 0  # interruptible renters the host's own rental pushed off
    requests: int = 0
    held: int = 0
    refused: int = 0
    visits_refused: int = 0  # visits (rhythm.py's) with at least one request refused
    waits: list[float] = field(default_factory=list)  # held or refused requests
    state_hours: dict[str, float] = field(default_factory=dict)  # time in each pool state

    @property
    def net(self) -> float:
        return self.earnings - self.energy_cost

    @property
    def extra_net(self) -> float:
        return self.earnings - self.extra_energy_cost


@dataclass(frozen=True)
class Transition:
    at: datetime
    state: PoolState
    reason: str


@dataclass
class _Rental:
    start: float
    end: float  # the contract's end: the offer's end at rental time, later by extension
    leaves: float
    usd_per_hour: float
    interruptible: bool = False  # a bid: the host's own rental displaces it (FACTS.md)

    @property
    def stops(self) -> float:
        return min(self.end, self.leaves)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class Replay:
    def __init__(
        self,
        config: Config,
        policy: PolicySection,
        demand: Sequence[Request],
        renters: Sequence[Renter],
        start: float,
        end: float,
        *,
        timings: Timings | None = None,
        machine: Machine | None = None,
        price: EnergyPrice | None = None,
        record: bool = False,
        progress: Callable[[float], None] | None = None,
        competition: CompetingMarket | None = None,
        pricing: PricingSection | None = None,
    ) -> None:
        self.config = config
        self.pm = PoolMachine(policy=policy, tz=config.broker.tz, since=start)
        self.demand = [r for r in demand if start <= r.at < end]
        self.renters = [r for r in renters if start <= r.at < end]
        self.start, self.end = start, end
        self.timings = timings or Timings.from_config(config)
        self.machine = machine or Machine.from_config(config)
        self.price = price or EnergyPrice(config, start, end)
        # Other hosts' offers, and the ask of price_gpu = "market" (competition.py).
        self.competition = competition
        if competition is not None:
            self.renters = competition.market_renters(self.renters, start, end)
        self.market_ask = (
            MarketAsk(pricing, competition, self.machine, self.price)
            if pricing is not None and competition is not None else None
        )  # fmt: skip
        self.record = record
        self.progress = progress
        self.transitions: list[Transition] = []
        self.actions: list[tuple[datetime, List]] = []  # offers put up or renewed (record)
        self.totals = Totals()
        calendar = Calendar.from_config(config.windows, config.broker.tz)
        spans = calendar.intervals(_dt(start), _dt(end + 8 * 86400))
        self._w_start = [i.start.timestamp() for i in spans]
        self._w_end = [i.end.timestamp() for i in spans]
        usd = self.machine.usd_per_currency
        self._usd_per_currency = usd if usd > 0 else 1.0

        # the marketplace as it is, and as the broker last read it
        self.listed = False
        self.offer_end: float | None = None
        self.rental: _Rental | None = None
        self.seen = ProviderView(listed=False, rentals_running=0)
        self._poll_anchor = start
        self._poll_due: float | None = None

        # the local side
        self._running: list[float] = []  # end times of requests in flight
        self._held: list[tuple[float, float, int]] = []  # (deadline, arrival, request id)
        self._retries: list[tuple[float, int]] = []  # (retry time, request id)
        self._first_arrival: list[float] = []
        self._idle_at = start  # the GPUs look idle from then on (no request running)
        self._drain_done: float | None = None
        self._drain_ready = False
        self.refused_until: float | None = None
        self._durations = [r.duration_s for r in self.demand]
        self._was_held: set[int] = set()
        self._was_refused: set[int] = set()
        self._put_off: set[int] = set()
        # visits: a request within VISIT_GAP of the service's previous one belongs to its visit
        self._visit_of: list[int] = []
        self._visit_last: dict[str, tuple[float, int]] = {}  # service: (last arrival, visit)
        self._visit_shift: dict[int, float] = {}  # refused visit: how long it was put off
        self._di = 0
        self._ri = 0
        self._last = start
        # the weekly rhythm learns from the requests seen so far, as the live service does:
        # at start from the record of the weeks before (loop.py's RHYTHM_HISTORY), then live
        self.rhythm = WeeklyRhythm(config.broker.tz)
        history = [r.at for r in demand if start - RHYTHM_HISTORY.total_seconds() <= r.at < start]
        self.rhythm.start(min(history, default=start))
        for at in sorted(history):
            self.rhythm.request(at)

    # -- the clockwork ------------------------------------------------------------------

    def run(self) -> Totals:
        t = self.start
        report_every = max(1.0, (self.end - self.start) / 200)
        next_report = self.start + report_every
        while t < self.end:
            self._account(t)
            self._at(t)
            t = min(self._next_after(t), self.end)
            if self.progress is not None and t >= next_report:
                self.progress((t - self.start) / (self.end - self.start))
                next_report = t + report_every
        self._account(self.end)
        for _, _, rid in self._held:  # still held at the end: waited so far
            self.totals.waits.append(self.end - self._first_arrival[rid])
        return self.totals

    def _next_after(self, t: float) -> float:
        pm = self.pm
        policy = pm.policy
        c: list[float] = []
        if self._di < len(self.demand):
            c.append(self.demand[self._di].at)
        if self._running:
            c.append(self._running[0])
        elif self._idle_at > t:
            c.append(self._idle_at)
        if self._retries:
            c.append(self._retries[0][0])
        if self._held:
            c.append(min(h[0] for h in self._held))
        if self.listed:
            if self._ri < len(self.renters):
                c.append(self.renters[self._ri].at)
            if self.offer_end is not None:
                c.append(self.offer_end)
        if self.rental is not None:
            c.append(self.rental.stops)
        if self._poll_due is not None:
            c.append(self._poll_due)
        if self._drain_done is not None:
            c.append(self._drain_done)
        if pm.state is PoolState.IDLE:
            c.append(pm.since + policy.idle_window.total_seconds())
        elif pm.state is PoolState.DRAINING:
            c.append(pm.since + policy.drain_timeout.total_seconds())
        if pm.local_hold_until is not None:
            c.append(pm.local_hold_until)
        if pm.displaced_until is not None:
            c.append(pm.displaced_until.timestamp())
        if self.refused_until is not None:
            c.append(self.refused_until)
        if pm.listings:
            c.append(pm.listings[0] + 86400)
        if pm.state in (PoolState.LISTED, PoolState.RENTED) and pm.offer_end is not None:
            c.append(pm.renewal_due(pm.offer_end).timestamp())
        k = bisect.bisect_right(self._w_start, t)
        if k < len(self._w_start):
            c.append(self._w_start[k])
        k = bisect.bisect_right(self._w_end, t)
        if k < len(self._w_end):
            c.append(self._w_end[k])
        if policy.demand_risk is not None:
            c.append((t // 3600 + 1) * 3600)  # the rhythm's rates change by the hour
        later = [x for x in c if x > t]
        return min(later) if later else self.end

    def _window_end(self, t: float) -> float | None:
        k = bisect.bisect_right(self._w_start, t) - 1
        if k >= 0 and t < self._w_end[k]:
            return self._w_end[k]
        return None

    # -- money ----------------------------------------------------------------------------

    def _account(self, t: float) -> None:
        a, self._last = self._last, t
        if t <= a:
            return
        m, totals = self.machine, self.totals
        hours = (t - a) / 3600
        key = self.pm.state.value
        totals.state_hours[key] = totals.state_hours.get(key, 0.0) + hours
        if self.rental is not None:
            totals.earnings += self.rental.usd_per_hour * hours / self._usd_per_currency
            totals.rented_gpu_hours += m.gpu_count * hours
            totals.energy_cost += self.price.cost(a, t, m.load_watts + m.overhead_watts)
            totals.extra_energy_cost += self.price.cost(a, t, m.load_watts - m.idle_watts)
        elif self.listed or self.pm.state in _EXPOSED:
            totals.listed_hours += hours
            totals.energy_cost += self.price.cost(a, t, m.idle_watts + m.overhead_watts)

    # -- one instant ----------------------------------------------------------------------

    def _view(self) -> ProviderView:
        r = self.rental
        return ProviderView(
            listed=self.listed,
            rentals_running=1 if r is not None else 0,
            locked_until=_dt(r.end) if r is not None else None,
            offer_end=_dt(self.offer_end) if self.listed and self.offer_end else None,
            only_interruptible=r is not None and r.interruptible,
        )

    def _read(self) -> None:
        self.seen = self._view()
        self._poll_due = None

    def _changed(self, t: float) -> None:
        """The marketplace changed at `t`: the broker sees it at its next poll."""
        poll = self.timings.poll_s
        k = -(-(t - self._poll_anchor) // poll)
        self._poll_due = self._poll_anchor + k * poll

    def _market(self, t: float) -> None:
        r = self.rental
        if r is not None and r.stops <= t:
            self.rental = None
            self._changed(r.stops)
        if self.listed and self.offer_end is not None and self.offer_end <= t:
            self.listed = False
            self._changed(self.offer_end)
        renters = self.renters
        while self._ri < len(renters) and renters[self._ri].at <= t:
            renter = renters[self._ri]
            self._ri += 1
            if not self.listed or self.rental is not None:
                if self.competition is not None:
                    self.competition.arrive(renter, None)
                continue
            pays = self.machine.pays(renter)
            left = (self.offer_end or float("inf")) - renter.at
            suits = pays is not None and left >= renter.min_offer_hours * 3600
            if self.competition is not None:
                ours = self.machine.price_gpu if suits else None
                suits = self.competition.arrive(renter, ours) and suits
            if pays is None or not suits:
                self.totals.renters_turned_away += 1
                continue
            end = self.offer_end if self.offer_end is not None else float("inf")
            leaves = renter.at + renter.hours * 3600
            bid = renter.kind == "interruptible"
            self.rental = _Rental(renter.at, end, leaves, pays, interruptible=bid)
            self._changed(renter.at)
            self.totals.rentals += 1

    def _at(self, t: float) -> None:
        self._market(t)
        if self._poll_due is not None and t >= self._poll_due:
            self._read()
        running = self._running
        while running and running[0] <= t:
            ended = heapq.heappop(running)
            if not running:
                self._idle_at = ended + self.timings.keep_alive_s + self.timings.debounce_s
        demand = self.demand
        while self._di < len(demand) and demand[self._di].at <= t:
            request = demand[self._di]
            rid = len(self._first_arrival)
            self._first_arrival.append(request.at)
            self._visit_of.append(self._visit(request))
            self.rhythm.request(request.at)
            self.totals.requests += 1
            self._di += 1
            shift = self._visit_shift.get(self._visit_of[rid])
            if shift is not None and self.timings.patient_users:
                self._put_off.add(rid)  # its visit was refused: it waits, unrefused
                heapq.heappush(self._retries, (request.at + shift, rid))
                continue
            self._arrive(t, rid)
        if self._held:
            for h in [h for h in self._held if h[0] <= t]:
                self._held.remove(h)
                self._refuse(t, h[2])
        if self._drain_done is not None and t >= self._drain_done:
            self._drain_done = None
            self._drain_ready = True
        self._step(t)
        if self._retries and self._retries[0][0] <= t:
            # A refused user comes back at the time the 503 named, just after the
            # service's own step at that instant (which may find the GPUs free first).
            while self._retries and self._retries[0][0] <= t:
                _, rid = heapq.heappop(self._retries)
                self._arrive(t, rid)
            self._step(t)

    def _visit(self, request: Request) -> int:
        last = self._visit_last.get(request.service)
        visit = len(self._first_arrival) - 1
        if last is not None and request.at - last[0] <= VISIT_GAP:
            visit = last[1]
        self._visit_last[request.service] = (request.at, visit)
        return visit

    def _arrive(self, t: float, rid: int) -> None:
        gates = self.pm.gates
        if not gates.guarded:
            self._start(t, rid)
            return
        until = gates.rented_until
        if until is not None and until.timestamp() - t > self.timings.max_hold_s:
            self._refuse(t, rid)
            return
        if rid not in self._was_held:
            self._was_held.add(rid)
            self.totals.held += 1
        self._held.append((t + self.timings.max_hold_s, t, rid))

    def _start(self, t: float, rid: int) -> None:
        if rid in self._was_held or rid in self._was_refused or rid in self._put_off:
            self.totals.waits.append(t - self._first_arrival[rid])
        heapq.heappush(self._running, t + max(self._durations[rid], self.timings.sample_s))

    def _refuse(self, t: float, rid: int) -> None:
        if rid not in self._was_refused:
            self._was_refused.add(rid)
            self.totals.refused += 1
        until = self.pm.gates.rented_until
        retry = until.timestamp() if until is not None and until.timestamp() > t else None
        wait = retry - t if retry is not None else self.timings.max_hold_s
        retry_by = t + max(1.0, math.ceil(wait))  # the gate's Retry-After, whole seconds
        visit = self._visit_of[rid]
        if visit not in self._visit_shift:
            self.totals.visits_refused += 1
            self._visit_shift[visit] = retry_by - self._first_arrival[rid]
        if self.refused_until is None or retry_by > self.refused_until:
            self.refused_until = retry_by
        heapq.heappush(self._retries, (retry_by, rid))

    # -- the machine ----------------------------------------------------------------------

    def _observe(self, t: float) -> Observation:
        local_busy = bool(self._running) or t < self._idle_at
        renter_load = self.timings.renter_load and self.rental is not None
        if local_busy:
            gpus_idle, renters_busy, after = False, False, True
        elif renter_load:
            # A renter's container loads the GPUs; the broker checks the marketplace first.
            seen_rental = self.seen.rentals_running > 0
            gpus_idle, renters_busy, after = False, seen_rental, seen_rental
        else:
            gpus_idle, renters_busy, after = True, False, True
        drain = DrainStatus.NONE
        if self._drain_ready:
            drain, self._drain_ready = DrainStatus.VERIFIED, False
        window_end = self._window_end(t)
        refused = self.refused_until
        risk = self.pm.policy.demand_risk
        quiet = None
        if risk is not None and window_end is not None:
            quiet = self.rhythm.quiet_until(_dt(t), risk, self.pm.policy.max_commitment)
        return Observation(
            now=_dt(t),
            monotonic=t,
            window_end=_dt(window_end) if window_end is not None else None,
            gpus_idle=gpus_idle,
            local_demand=bool(self._running) or bool(self._held),
            provider=self.seen,
            drain=drain,
            busy_is_renters=renters_busy,
            view_after_activity=after,
            refused_until=_dt(refused) if refused is not None else None,
            can_displace=True,  # Vast: the host's own on-demand rental (FACTS.md)
            quiet_until=quiet,
            market_blocked=self.market_ask.blocked(t) if self.market_ask is not None else None,
        )

    def _step(self, t: float) -> None:
        pm = self.pm
        if (
            pm.state is PoolState.LOCAL
            and self._running
            and not pm.services_stopped
            and not self.seen.listed
            and not self.seen.rentals_running
            and (self.refused_until is None or (pm.refusal_seen or _dt(0)).timestamp()
                 >= self.refused_until)
        ):
            return  # the step would say "local: local requests" and change nothing
        for _ in range(1 + RESTEPS):
            before = pm.state
            decision = pm.step(self._observe(t))
            acted = self._apply(t, decision)
            if self.record and decision.state is not before:
                self.transitions.append(Transition(_dt(t), decision.state, decision.reason))
            if not acted:
                break

    def _apply(self, t: float, decision: Decision) -> bool:
        acted = False
        for action in decision.actions:
            if isinstance(action, List):
                if self.market_ask is not None:
                    ask = self.market_ask.take(t, rented=self.rental is not None)
                    if ask is not None:
                        self.machine = replace(self.machine, price_gpu=ask)
                end = action.end.timestamp()
                if not self.listed:
                    self._poll_anchor = t
                self.listed, self.offer_end = True, end
                if self.rental is not None and end > self.rental.end:
                    self.rental.end = end  # a later end date extends running contracts
                if self.record:
                    self.actions.append((_dt(t), action))
                if action.renewal:
                    self.totals.renewals += 1
                else:
                    self.totals.listings += 1
                self._read()
                acted = True  # the live loop steps again on the listing's read-back
            elif isinstance(action, Unlist):
                self.listed = False
                self._read()
                acted = True
            elif isinstance(action, CheckProvider):
                self._read()
                acted = True
            elif isinstance(action, DisplaceInterruptible):
                # The host's own rental pauses the bid renter at once and keeps it off
                # until its contract ends; it earns nothing meanwhile, nor after (the
                # contract is over by the time the self-rental ends).
                if self.rental is not None and self.rental.interruptible:
                    self.rental = None
                    self.totals.displaced += 1
                self._read()
                acted = True
            elif isinstance(action, EndDisplacement):
                acted = True  # the pool may go on at the live loop's next tick
            elif isinstance(action, Drain):
                self._drain_done = t + self.timings.drain_s
        if not decision.gates.guarded and self._held:
            for _, _, rid in sorted(self._held, key=lambda h: h[1]):
                self._start(t, rid)
            self._held.clear()
        elif self._held and decision.gates.rented_until is not None:
            until = decision.gates.rented_until.timestamp()
            if until - t > self.timings.max_hold_s:
                held, self._held = self._held, []
                for _, _, rid in held:
                    self._refuse(t, rid)
        return acted


def replay(
    config: Config,
    policy: PolicySection,
    demand: Sequence[Request],
    renters: Sequence[Renter],
    start: datetime,
    end: datetime,
    *,
    timings: Timings | None = None,
    machine: Machine | None = None,
    price: EnergyPrice | None = None,
    record: bool = False,
    progress: Callable[[float], None] | None = None,
    competition: CompetingMarket | None = None,
    pricing: PricingSection | None = None,
) -> Replay:
    """Run one policy over [start, end) and return the finished replay."""
    sim = Replay(
        config, policy, demand, renters, start.timestamp(), end.timestamp(),
        timings=timings, machine=machine, price=price, record=record, progress=progress,
        competition=competition, pricing=pricing,
    )  # fmt: skip
    sim.run()
    return sim
