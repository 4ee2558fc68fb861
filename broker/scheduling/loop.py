"""The decision loop: observe the latest snapshots, step the pure machine, act.

It never waits on a read. The marketplace, the services and the GPUs are each kept fresh
by their own task (watchers.py, broker/gpu/sampler.py); a step reads what they hold now.
What it waits on are its own actions (journal -> act -> complete, actions.py), and the one
read that belongs to a reclaim: an unlist made for a waiting request is `urgent` (no request
spacing, a 429 retried fast) and its read-back, which tells whether a rental slipped in
before the unlist, is taken as the newest marketplace snapshot, so a request with no renter
in its way is released right after it.

- every transition is written to the ledger before the gates change;
- the gates are guarded before anything that takes the GPUs away and released only after
  the services were given back;
- GPU activity is attributed (attribution.py): a renter's own load is not local use, and
  activity nobody explains is checked against a provider read newer than it first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal, Protocol

from broker.clock import Clock
from broker.config import Config
from broker.errors import LedgerError
from broker.gpu.energy import EnergyAccountant
from broker.gpu.idle import IdleDetector
from broker.gpu.sampler import GpuSampler
from broker.ledger.base import JournalEntry, Ledger, PriceRecord
from broker.providers.base import ProviderStatus
from broker.scheduling.actions import Actions
from broker.scheduling.attribution import Activity, Attribution
from broker.scheduling.pool import (
    CheckProvider,
    Decision,
    DisplaceInterruptible,
    Drain,
    EndDisplacement,
    GateMode,
    List,
    Observation,
    PoolMachine,
    PoolState,
    ProviderView,
    ResumeServices,
    Unlist,
)
from broker.scheduling.rhythm import WeeklyRhythm
from broker.scheduling.status import ReclaimLatency
from broker.scheduling.watchers import MarketWatch, ServiceWatch, renter_held
from broker.scheduling.windows import Calendar, Interval
from broker.services.base import ServiceAdapter

log = logging.getLogger(__name__)

# After acting on the marketplace the machine is stepped again on the read-back at once,
# so a reclaim runs through (unlist, GPUs free, release) without waiting for a tick.
RESTEPS = 4
RHYTHM_HISTORY = timedelta(weeks=5)  # the demand record read at start for the rhythm


class GateHandle(Protocol):
    """What the loop needs of a gate: its demand and a place to put the mode."""

    name: str
    in_flight: int
    held: int
    last_request_monotonic: float | None
    refused_until: datetime | None

    @property
    def mode(self) -> GateMode: ...

    def apply(self, mode: GateMode) -> None: ...


class DecisionLoop:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        *,
        machine: PoolMachine,
        actions: Actions,
        market: MarketWatch,
        services: ServiceWatch,
        sampler: GpuSampler,
        idle: IdleDetector,
        energy: EnergyAccountant,
        adapters: Sequence[ServiceAdapter],
        gates: Sequence[GateHandle],
    ) -> None:
        self._clock = clock
        self.machine = machine
        self.actions = actions
        self.market = market
        self.services = services
        self.sampler = sampler
        self.idle = idle
        self.energy = energy
        self.adapters = list(adapters)
        self.gates = list(gates)
        self.attribution = Attribution()
        self.activity = Activity(False, frozenset(), True)
        self.latency = ReclaimLatency()
        self.since_wall: datetime = clock.now()
        self.last_reason = "starting"
        self.paused = False
        self.reclaim_requested = False
        self.parked = False
        self._wake = asyncio.Event()
        self._last_step: float | None = None
        self._demand_at: float | None = None  # first held request of this reclaim
        self._free_at: float | None = None  # when the provider was seen free of renters
        self._was_exposed = False
        self._gpu_states: dict[str, str] = {}
        self._released_early: set[str] = set()
        self._checking = False
        self._listing: asyncio.Task[None] | None = None
        # The team's weekly rhythm (policy.demand_risk): learned from the ledger's demand
        # record at start (`learn`), then from every request the gates see.
        self.rhythm = WeeklyRhythm(config.broker.tz)
        self.rhythm.start(clock.now().timestamp())
        self._requests_seen: dict[str, float] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.rhythm.tz = config.broker.tz
        self.machine.policy = config.policy
        self.machine.tz = config.broker.tz
        self.calendar = Calendar.from_config(config.windows, config.broker.tz)
        self._window: Interval | None = None  # the open window last found
        self._closed_until: datetime | None = None  # no window opens before this
        self.pool_gpus = [d.index for d in self.sampler.devices]

    async def learn(self, ledger: Ledger) -> None:
        """Learn the weekly rhythm from the demand the ledger recorded in the last weeks."""
        now = self._clock.now()
        try:
            records = await ledger.demand(now - RHYTHM_HISTORY, now)
        except (LedgerError, NotImplementedError) as err:
            log.warning("the team's weekly rhythm starts empty: %s", err)
            return
        if records:
            self.rhythm.start(records[0].arrival.timestamp())
        for record in records:
            self.rhythm.request(record.arrival.timestamp())

    # ---- outside requests ---------------------------------------------------------------

    def demand(self) -> None:
        """A gate holds a local request (or the user asked for a reclaim): step now."""
        if self._demand_at is None:
            self._demand_at = self._clock.monotonic()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def woken(self) -> bool:
        return self._wake.is_set()

    def market_updated(self) -> None:
        """The marketplace watcher has a new snapshot (or failed): note when the GPUs were
        first seen free of renters (for the latency figures), and step."""
        view = self.market.view
        self.actions.tell("provider_read", view)
        if self.actions.pricing is not None and view is not None:
            self.actions.pricing.note_rented(view.rentals_running > 0, view.listed)
            status = self.market.status
            if status is not None and status.listed:
                self.actions.pricing.adopt(status.price_gpu)
        exposed = view is None or view.listed or view.rentals_running > 0
        if view is not None and not exposed:
            if self._was_exposed or self._free_at is None:
                self._free_at = self._clock.monotonic()
        elif view is not None:
            self._free_at = None
        if view is not None:
            self._was_exposed = exposed
        self._wake.set()

    # ---- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Step every sample_interval, or at once when woken, until cancelled."""
        while True:
            try:
                await self.step()
            except LedgerError as err:
                log.error("ledger write failed: %s", err)  # the next step tries again
            await self._sleep(self.config.broker.sample_interval.total_seconds())

    async def _sleep(self, seconds: float) -> None:
        if self._wake.is_set():
            return
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        self.parked = True
        try:
            await asyncio.wait((timer, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.parked = False
            timer.cancel()
            woken.cancel()

    async def step(self) -> Decision:
        self._wake.clear()
        mono = self._clock.monotonic()
        decision, acted = await self._step_once()
        for _ in range(RESTEPS):
            if not acted:
                break
            decision, acted = await self._step_once()
        self._last_step = mono
        await self.actions.journal.flush()
        return decision

    async def _step_once(self) -> tuple[Decision, bool]:
        obs = self.observe()
        before = self.machine.state
        decision = self.machine.step(obs)
        if self.reclaim_requested and decision.state in (PoolState.LOCAL, PoolState.PAUSED):
            self.reclaim_requested = False  # done: the GPUs are local
        acted = await self._apply(decision, obs, before)
        if before is not self.machine.state or acted:
            self.market.poller.retime()
        return decision, acted

    # ---- observing ----------------------------------------------------------------------

    def observe(self) -> Observation:
        now = self._clock.now()
        view = self.market.view
        caps = self.market.provider.capabilities
        gpus_idle = self._gpus_idle()
        self.activity = self._attribute(gpus_idle)
        refused = [g.refused_until for g in self.gates if g.refused_until is not None]
        window_end = self.window_end(now)
        self._learn_requests(now)
        quiet = None
        risk = self.config.policy.demand_risk
        if risk is not None and window_end is not None:
            quiet = self.rhythm.quiet_until(now, risk, self.config.policy.max_commitment)
        return Observation(
            now=now,
            monotonic=self._clock.monotonic(),
            window_end=window_end,
            gpus_idle=gpus_idle,
            local_demand=self._local_demand(),
            provider=view,
            drain=self.actions.take_drain_status(),
            paused=self.paused,
            reclaim_requested=self.reclaim_requested,
            busy_is_renters=self.activity.busy_is_renters,
            view_after_activity=self.activity.view_after_activity,
            refused_until=max(refused) if refused else None,
            can_list=caps.can_list,
            can_displace=caps.can_displace_interruptible,
            quiet_until=quiet,
            market_blocked=self.actions.pricing.blocker() if self.actions.pricing else None,
            can_journal=self.actions.journal.ledger.reachable,
        )

    def _learn_requests(self, now: datetime) -> None:
        """Each gate's latest request, as the rhythm's visits (one per step at most: a
        visit is a request after ten quiet minutes, so the ones in between do not count)."""
        mono = self._clock.monotonic()
        for gate in self.gates:
            seen = gate.last_request_monotonic
            if seen is None or self._requests_seen.get(gate.name) == seen:
                continue
            self._requests_seen[gate.name] = seen
            self.rhythm.request(now.timestamp() - max(0.0, mono - seen))

    def _attribute(self, gpus_idle: bool | None) -> Activity:
        poller = self.market.poller
        snapshot = poller.snapshot
        status = self.market.status
        devices = [(d.index, d.uuid) for d in self.sampler.devices]
        renters = renter_held(status, devices) if status is not None else set()
        busy = None if gpus_idle is None else {
            i: not self.idle.is_idle(i) for i in self.pool_gpus
        }  # fmt: skip
        return self.attribution.update(
            busy,
            renters,
            reads_started=poller.reads_started,
            view_read=snapshot.read if snapshot is not None and poller.ok else 0,
        )

    def window_end(self, now: datetime) -> datetime | None:
        """When the window open at `now` closes (None: closed). Cached: a calendar lookup
        can cost a good part of a second, and the answer only changes at the edges."""
        window = self._window
        if window is not None and window.start <= now < window.end:
            return window.end
        if self._closed_until is not None and now < self._closed_until:
            return None
        current = self.calendar.current(now)
        if current is not None:
            self._window, self._closed_until = current, None
            return current.end
        upcoming = self.calendar.openings(now, 1)
        self._window = None
        self._closed_until = upcoming[0].start if upcoming else now + timedelta(hours=1)
        return None

    def _gpus_idle(self) -> bool | None:
        snap = self.sampler.latest
        if snap is None or self.sampler.failures:
            return None
        interval = self.config.broker.sample_interval.total_seconds()
        timeout = self.config.gpus.sample_timeout.total_seconds()
        if self._clock.monotonic() - snap.at > 3 * interval + timeout:
            return None  # the sampler is stuck: nothing is known
        try:
            return self.idle.all_idle(self.pool_gpus)
        except Exception:  # a telemetry surprise is "unknown", never a stopped loop
            log.exception("the idle detector failed")
            return None

    def _local_demand(self) -> bool:
        for gate in self.gates:
            if gate.in_flight or gate.held:
                return True
            seen = gate.last_request_monotonic
            if seen is not None and self._last_step is not None and seen >= self._last_step:
                return True  # a request came and went between two steps
        return any(probe.busy for probe in self.services.probes.values())

    # ---- acting -------------------------------------------------------------------------

    async def _apply(self, decision: Decision, obs: Observation, before: PoolState) -> bool:
        """Record, set the gates, act; true when a marketplace action changed what is known."""
        if decision.changed or self.last_reason != decision.reason:
            if decision.changed:
                self.since_wall = self._clock.now()
                log.info("%s", decision.reason)
                await self.record_state(decision.state, decision.reason)
                self.actions.tell("state_changed", decision.state, before, decision.reason)
                if decision.state is PoolState.RENTED and before is PoolState.LISTED:
                    await self._record_rental_price()
            elif self.last_reason == "starting":
                log.info("%s", decision.reason)
            else:
                log.debug("%s", decision.reason)
            self.last_reason = decision.reason
        if decision.gates.guarded:
            self._set_gates(decision.gates)
        # A self-rental rents our own offer, which unlisting takes down: displace first.
        # (The self-rental holds every GPU, so the offer left up a moment longer admits
        # no renter that could not be displaced.)
        ordered = sorted(decision.actions, key=lambda a: not isinstance(a, DisplaceInterruptible))
        acted = False
        urgent = obs.local_demand or obs.reclaim_requested or self.machine.refused_pending
        for action in ordered:
            acted = await self._do(action, decision, urgent=urgent) or acted
        if not ordered and decision.state is PoolState.LISTED:
            self._reprice()
        if not decision.gates.guarded:
            self._set_gates(decision.gates)
        elif decision.state is PoolState.RECLAIMING and not acted:
            # (after an action the machine steps again on the read-back first)
            await self._release_free_services()
        await self._record_gpu_states(decision.state)
        return acted

    async def _do(self, action: object, decision: Decision, *, urgent: bool) -> bool:
        actions = self.actions
        if isinstance(action, Drain):
            await actions.start_drain()
        elif isinstance(action, ResumeServices):
            await actions.cancel_drain()
            await actions.resume(self.adapters)
        elif isinstance(action, CheckProvider):
            self._check_provider()
        elif isinstance(action, List):
            self._start_list(action)
        elif isinstance(action, Unlist):
            return await self._unlist(decision.reason, urgent=urgent)
        elif isinstance(action, DisplaceInterruptible):
            if await actions.displace(action.until):
                self.market.poller.request_refresh(urgent=True)
        elif isinstance(action, EndDisplacement):
            await actions.end_displacement()
        return False

    async def _record_rental_price(self) -> None:
        """A rental began: it locked the price of the offer it rented (the one read back
        from the platform, else the one we last listed at)."""
        status = self.market.status
        price = status.price_gpu if status is not None else None
        price = price if price is not None else self.actions.listed_price
        if price is not None:
            await self.actions.record_price(PriceRecord(self._clock.now(), "rental", price))

    def _reprice(self) -> None:
        """price_gpu = "market": while listed and unrented, put the offer up again at the
        new ask (same end date) when the market moved it (broker/pricing/ask.py)."""
        pricing, view = self.actions.pricing, self.market.view
        if pricing is None or view is None or not view.listed or view.rentals_running:
            return
        end = view.offer_end or self.machine.offer_end
        if end is not None and pricing.reprice_due(rented=False):
            self._start_list(List(end, renewal=True))

    def _start_list(self, action: List) -> None:
        """List in the background: on Vast the call and its spaced read-backs take seconds,
        and a local request arriving meanwhile must not wait for them. Until the call ends
        the offer is taken as up, so such a request withdraws it (`_unlist` calls the
        listing off first)."""
        if self._listing is not None and not self._listing.done():
            return  # one listing call at a time; the machine asks again if it must
        before = self.market.view
        offer = ProviderView(
            listed=True,
            rentals_running=before.rentals_running if before else 0,
            locked_until=before.locked_until if before else None,
            offer_end=action.end,
            only_interruptible=before.only_interruptible if before else False,
        )
        self.market.assume(offer)
        self._free_at, self._was_exposed = None, True

        async def run() -> None:
            try:
                listed = await self.actions.list(action, rented=offer.rentals_running > 0)
            except asyncio.CancelledError:
                self.market.forget()
                raise
            if listed:
                self.market.confirmed(offer)
            else:
                self.market.forget()
            self._wake.set()

        self._listing = asyncio.create_task(run(), name="list")

    @property
    def acting(self) -> bool:
        """A marketplace call runs beside the loop (a listing)."""
        return self._listing is not None and not self._listing.done()

    async def cancel_listing(self) -> None:
        task, self._listing = self._listing, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _unlist(self, reason: str, *, urgent: bool) -> bool:
        await self.cancel_listing()  # a withdrawal overtakes a listing under way
        if self._demand_at is not None:
            self._latency("arrival_to_unlist", self._clock.monotonic() - self._demand_at)
        poller = self.market.poller
        read, started = poller.begin()
        done, status = await self.actions.unlist(reason, urgent=urgent)
        if not done:
            # Never assume: read what the marketplace really did before the next decision.
            poller.request_refresh()
            return False
        poller.set_floor(read)
        if status is not None:
            poller.offer(status, started, read)
            return True
        # The adapter read nothing back: one urgent read tells whether a rental slipped in.
        return await poller.read_now(urgent=urgent) is not None

    def _check_provider(self) -> None:
        if self._checking:
            return
        self._checking = True

        async def check() -> None:
            try:
                await self.market.poller.read_now(urgent=True)
            finally:
                self._checking = False
                self._wake.set()

        self.market.poller.spawn(check(), "marketplace-check")

    def _latency(self, phase: Literal["arrival_to_unlist", "free_to_release"], s: float) -> None:
        getattr(self.latency, phase).append(s)
        self.actions.tell("latency_sample", phase, s)

    def _set_gates(self, mode: GateMode) -> None:
        if not mode.guarded:
            was_guarded = any(g.mode.guarded for g in self.gates)
            for gate in self.gates:
                gate.apply(mode)
            self._released_early.clear()
            if was_guarded and self._free_at is not None and self._demand_at is not None:
                self._latency("free_to_release", self._clock.monotonic() - self._free_at)
            self._demand_at = None
            return
        for gate in self.gates:
            if gate.name not in self._released_early:
                gate.apply(mode)

    async def _release_free_services(self) -> None:
        """While renters finish, give services whose GPUs no renter holds back at once."""
        status = self.market.status
        view = self.market.view
        if status is None or view is None or view.listed:
            return
        free = self._free_gpus(status)
        sections = {s.name: s for s in self.config.services}
        for gate in self.gates:
            section = sections.get(gate.name)
            if gate.name in self._released_early or section is None or not section.gpus:
                continue
            if all(i in free for i in section.gpus):
                self._released_early.add(gate.name)
                adapter = next((a for a in self.adapters if a.name == gate.name), None)
                if adapter is not None and self.machine.services_stopped:
                    await self.actions.resume([adapter])
                gate.apply(GateMode(False))
                log.info("service %s: its GPUs are free of renters, given back first", gate.name)

    def _free_gpus(self, status: ProviderStatus) -> set[int]:
        free: set[int] = set()
        devices = {d.index: d for d in self.sampler.devices}
        for index, occupancy in enumerate(status.gpu_occupancy):
            if occupancy != "free":
                continue
            device = devices.get(index)
            renters = status.renter_gpus
            held = renters.held(index, device.uuid if device else None) if renters else False
            if held is False:
                free.add(index)
        return free

    # ---- the ledger ---------------------------------------------------------------------

    def gate_event(self, event: str, service: str, at: datetime) -> None:
        self.actions.tell("request_event", event, service)
        self.actions.journal.later(
            JournalEntry(at=at, kind=f"request_{event}", status="note", subject=service)
        )

    async def record_state(self, state: PoolState, reason: str) -> None:
        await self.actions.journal.transition(state, reason)
        self.energy.set_pool_state(state.value.lower())

    async def _record_gpu_states(self, state: PoolState) -> None:
        """Each GPU's own state, for the report's per-GPU rows and rented GPU-hours: the
        pool's, except LOST for a GPU off the bus, and, while renters may be on the
        machine, RENTED only for a GPU a renter holds (or may hold, when the platform
        does not say which)."""
        snap = self.sampler.latest
        status = self.market.status
        view = self.market.view
        renting = state in (PoolState.RENTED, PoolState.RECLAIMING)
        occupied = _occupied_gpus(status) if renting and status is not None else None
        at = self._clock.now()
        for device in self.sampler.devices:
            sample = snap.gpu(device.index) if snap is not None else None
            gpu_state = state.value
            if sample is not None and sample.lost:
                gpu_state = "LOST"
            elif renting and occupied is not None and device.index not in occupied:
                listed = view is not None and view.listed
                gpu_state = "LISTED" if listed and state is PoolState.RENTED else "IDLE"
            elif renting and not (view and view.rentals_running):
                gpu_state = "IDLE"  # reclaiming an offer nobody rented
            if self._gpu_states.get(device.uuid) != gpu_state:
                self._gpu_states[device.uuid] = gpu_state
                await self.actions.journal.ledger.record_state(
                    "gpu", device.uuid, gpu_state, at, state.value
                )

    @property
    def view(self) -> ProviderView | None:
        return self.market.view


def _occupied_gpus(status: ProviderStatus) -> set[int] | None:
    """Indices a renter holds per the platform; None when it does not say for all."""
    if not status.gpu_occupancy or "unknown" in status.gpu_occupancy:
        return None
    return {i for i, o in enumerate(status.gpu_occupancy) if o != "free"}
