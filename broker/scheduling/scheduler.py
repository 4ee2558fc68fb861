"""The scheduler: gathers what the broker observes, steps the pool machine, and acts.

Each step reads the GPU telemetry, the gates, the local services and the marketplace,
hands one `Observation` to the pure `PoolMachine`, and carries out its decision:

- every transition and every external action is written to the ledger's journal *before*
  it is taken (intent), and completed (done/failed) after, so a restart can tell what was
  in flight (`reconcile()`);
- the gates are guarded before anything that takes the GPUs away (a drain finishing into a
  listing) and released only after the services were given back;
- after a marketplace action the provider is read again at once and the machine stepped
  again, so a reclaim (unlist, GPUs free, release) runs through in one go instead of one
  tick per hop.

A local inference request that reaches a guarded gate wakes the scheduler at once
(`on_gate_demand`), so the unlist call follows the request by milliseconds, not a tick.
All waiting is on the injected Clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal

from broker.clock import Clock
from broker.config import Config, PolicySection
from broker.crashpoints import crashpoint
from broker.errors import DrainError, LedgerError, ProviderError
from broker.gpu.energy import EnergyAccountant
from broker.gpu.idle import IdleDetector
from broker.gpu.sampler import GpuSampler
from broker.ledger.base import JournalEntry, Ledger
from broker.providers.base import Provider, ProviderStatus
from broker.scheduling.pool import (
    Action,
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
    ResumeServices,
    Unlist,
)
from broker.scheduling.tariffs import TariffSchedule
from broker.scheduling.windows import Calendar, Interval
from broker.services.base import ServiceAdapter, ServiceProbe
from broker.services.control import GateMode as ControlMode
from broker.services.gate import Gate

log = logging.getLogger(__name__)

POOL = "machine"  # on Vast a listing covers the whole machine: one pool, named for that

# The marketplace is read every `provider.poll_interval` while an offer or a renter may
# exist, this many times less often otherwise (only to notice a listing made by hand).
QUIET_POLL_FACTOR = 6
SERVICE_POLL = 5.0
EARNINGS_POLL = 3600.0
# Journal kinds that are external actions; an `intent` of one of these found at start was
# interrupted by a crash.
ACTIONS = ("drain", "resume_services", "list", "unlist", "displace", "end_displacement")
LATENCY_SAMPLES = 1000


def view_of(status: ProviderStatus) -> ProviderView | None:
    """What the pool machine needs of a provider status; None when it cannot tell."""
    if status.listed is None:
        return None
    rentals = status.rentals.total
    if rentals == 0 and status.rented:
        rentals = 1  # GPUs shown occupied though no contract is listed: count one renter
    return ProviderView(
        listed=status.listed,
        rentals_running=rentals,
        locked_until=status.locked_until,
        offer_end=status.offer_end,
        only_interruptible=status.rentals.only_interruptible,
    )


@dataclass(frozen=True)
class Reconciled:
    """What `reconcile()` found in the journal."""

    interrupted: tuple[str, ...]  # kinds of actions a crash cut off
    paused: bool
    services_stopped: bool
    redo_drain: bool


class ReclaimLatency:
    """The broker's own share of a reclaim, in seconds (monotonic clock)."""

    def __init__(self) -> None:
        self.arrival_to_unlist: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.free_to_release: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    @staticmethod
    def median_ms(samples: Sequence[float]) -> float | None:
        return round(statistics.median(samples) * 1000, 3) if samples else None

    def summary(self) -> dict[str, Any]:
        return {
            "arrival_to_unlist_ms": self.median_ms(self.arrival_to_unlist),
            "free_to_release_ms": self.median_ms(self.free_to_release),
            "samples": len(self.arrival_to_unlist) + len(self.free_to_release),
        }


class SchedulerHooks:
    """Told of events as they happen, for the metrics (which must count actions and observe
    latencies at the moment, not guess them at scrape time). Called inline from the
    scheduler: quick, no I/O; an exception is logged and ignored."""

    def action_done(self, kind: str, payload: Mapping[str, Any]) -> None:
        """A journaled provider action (list, unlist, displace, ...) succeeded."""

    def latency_sample(self, phase: str, seconds: float) -> None:
        """A reclaim latency sample: phase is "arrival_to_unlist" or "free_to_release"."""

    def provider_read(self, view: ProviderView | None) -> None:
        """The marketplace was read (None: it could not tell or could not be reached)."""


class Scheduler:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        *,
        ledger: Ledger,
        provider: Provider,
        sampler: GpuSampler,
        idle: IdleDetector,
        energy: EnergyAccountant,
        adapters: Sequence[ServiceAdapter],
        gates: Sequence[Gate],
    ) -> None:
        self._clock = clock
        self.ledger = ledger
        self.provider = provider
        self.sampler = sampler
        self.idle = idle
        self.energy = energy
        self.adapters = list(adapters)
        self.gates = list(gates)
        self.machine = PoolMachine(config.policy, tz=config.broker.tz)
        self.configure(config)
        self.since_wall: datetime = clock.now()
        self.paused = False
        self.reclaim_requested = False
        self.latency = ReclaimLatency()
        self.hooks: list[SchedulerHooks] = []
        self.status_read: ProviderStatus | None = None
        self.view: ProviderView | None = None
        self.probes: dict[str, ServiceProbe] = {}
        self.last_reason = "starting"
        self._provider_due = -1.0
        self._services_due = -1.0
        self._earnings_due = -1.0
        self._last_step: float | None = None
        self._wake = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._drain_status = DrainStatus.NONE
        self._background: set[asyncio.Task[Any]] = set()
        self._demand_at: float | None = None  # first held request of this reclaim
        self._free_at: float | None = None  # when the provider was seen free of renters
        self._gpu_states: dict[str, str] = {}
        self._released_early: set[str] = set()
        self._notes: list[JournalEntry] = []
        self._provider_acted = False
        self.parked = False  # waiting for the next step (tests wait for this to settle)
        for gate in self.gates:
            gate.control.on_reclaim = self.on_gate_demand
            gate.control.on_event = self._gate_event

    def configure(self, config: Config) -> None:
        """Take up a (re)loaded configuration's policy, windows and tariffs."""
        self.config = config
        self.machine.policy = config.policy
        self.machine.tz = config.broker.tz
        self.calendar = Calendar.from_config(config.windows, config.broker.tz)
        self._window: Interval | None = None  # the open window last found
        self._closed_until: datetime | None = None  # no window opens before this
        self.tariffs = TariffSchedule.from_config(config.energy, config.broker.tz)
        self.pool_gpus = [d.index for d in self.sampler.devices]
        self._poll = config.provider.poll_interval.total_seconds()
        by_name = {s.name: s for s in config.services}
        for gate in self.gates:
            section = by_name.get(gate.name)
            if section is not None:
                gate.control.max_hold = section.max_hold

    @property
    def policy(self) -> PolicySection:
        return self.config.policy

    @property
    def state(self) -> PoolState:
        return self.machine.state

    # ---- outside requests ---------------------------------------------------------------

    async def on_gate_demand(self) -> None:
        """A gate holds a local inference request: step now rather than at the next tick."""
        if self._demand_at is None:
            self._demand_at = self._clock.monotonic()
        self._wake.set()

    async def pause(self) -> None:
        self.paused = True
        await self._note("pause", {})
        self._wake.set()

    async def resume(self) -> None:
        self.paused = False
        self.reclaim_requested = False
        await self._note("resume", {})
        self._wake.set()

    async def reclaim(self) -> None:
        self.reclaim_requested = True
        if self._demand_at is None:
            self._demand_at = self._clock.monotonic()
        await self._note("reclaim", {})
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # ---- start: reconcile with the journal and the marketplace --------------------------

    async def reconcile(self) -> Reconciled:
        """Converge with what a previous run left: close what a crash cut off, restore a
        pause, remember stopped services, and redo a drain that never finished. The
        provider's real state is read next, by the first step: a listing found there that
        this broker cannot account for is withdrawn by the machine, a rental is respected.
        """
        now = self._clock.now()
        entries = await self.ledger.journal_entries(
            since=now - timedelta(days=30),
            kinds=[*ACTIONS, "pause", "resume"],
        )
        interrupted: list[str] = []
        for entry in entries:
            if entry.status == "intent" and entry.id is not None:
                interrupted.append(entry.kind)
                await self.ledger.complete(
                    entry.id, "failed", now, "interrupted: the broker stopped before it finished"
                )
        paused = False
        services_stopped = False
        redo_drain = False
        day_ago = now - timedelta(days=1)
        for entry in entries:
            if entry.kind in ("pause", "resume"):
                paused = entry.kind == "pause"
            elif entry.kind == "drain":
                services_stopped = True
                redo_drain = entry.status == "intent"
            elif entry.kind == "resume_services":
                services_stopped = entry.status == "intent"  # an unfinished resume: redo it
                redo_drain = False
            elif entry.kind in ("list", "unlist"):
                redo_drain = False
            first_listing = entry.kind == "list" and not entry.payload.get("renewal")
            if first_listing and entry.status == "done" and entry.at >= day_ago:
                ago = (now - entry.at).total_seconds()
                self.machine.listings.append(self._clock.monotonic() - ago)
        self.paused = paused
        self.machine.services_stopped = services_stopped
        # A self-rental that displaced interruptible renters outlives a crash: keep it while
        # the contracts it displaced still run (they would resume on the team's GPUs), end
        # it once they are over (the provider finds it by its label).
        ends = [e for e in entries if e.kind in ("displace", "end_displacement")]
        if ends and not (ends[-1].kind == "end_displacement" and ends[-1].status == "done"):
            until_text = next(
                (e.payload.get("until") for e in reversed(ends) if e.kind == "displace"), None
            )
            until = datetime.fromisoformat(until_text) if isinstance(until_text, str) else None
            if until is not None and until > now:
                self.machine.displaced_until = until
                log.info("the self-rental keeps displaced renters off until %s", until_text)
            else:
                log.info("ending a displacement the previous run left")
                await self._provider_call(
                    "end_displacement", {"reason": "left by the previous run"},
                    self.provider.end_displacement,
                )  # fmt: skip
        if redo_drain and not paused:
            log.info("an interrupted drain is redone before anything else")
            self.machine.state = PoolState.DRAINING
            self.machine.since = self._clock.monotonic()
            await self._start_drain()
        found = Reconciled(tuple(interrupted), paused, services_stopped, redo_drain)
        if interrupted:
            log.warning(
                "the previous run stopped in the middle of: %s; reconciling with the provider",
                ", ".join(interrupted),
            )
        await self._record_state(self.machine.state, "started")
        return found

    # ---- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Step every sample_interval, or at once when woken, until cancelled."""
        interval = self.config.broker.sample_interval.total_seconds()
        while True:
            try:
                await self.step()
            except LedgerError as err:
                # The machine goes on; the next step tries again.
                log.error("ledger write failed: %s", err)
            await self._sleep(interval)

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
        if mono >= self._provider_due:
            await self.read_provider()
        if mono >= self._services_due:
            await self._probe_services()
        if mono >= self._earnings_due:
            self._earnings_due = mono + EARNINGS_POLL
            self._spawn(self.sync_earnings(), "earnings-sync")
        decision = await self._step_machine()
        for _ in range(4):
            if not decision.actions or not self._provider_acted:
                break
            await self.read_provider()
            decision = await self._step_machine()
        self._last_step = mono
        await self._write_notes()
        return decision

    async def _step_machine(self) -> Decision:
        obs = self._observe()
        decision = self.machine.step(obs)
        if self._drain_status in (DrainStatus.VERIFIED, DrainStatus.FAILED):
            self._drain_status = DrainStatus.NONE  # consumed
        if self.reclaim_requested and decision.state in (PoolState.LOCAL, PoolState.PAUSED):
            self.reclaim_requested = False  # done: the GPUs are local
        await self._apply(decision)
        return decision

    # ---- observing ----------------------------------------------------------------------

    def _observe(self) -> Observation:
        now = self._clock.now()
        return Observation(
            now=now,
            monotonic=self._clock.monotonic(),
            window_end=self.window_end(now),
            gpus_idle=self._gpus_idle(),
            local_demand=self._local_demand(),
            provider=self.view,
            drain=self._drain_status,
            paused=self.paused,
            reclaim_requested=self.reclaim_requested,
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
        return self.idle.all_idle(self.pool_gpus)

    def _local_demand(self) -> bool:
        for gate in self.gates:
            control = gate.control
            if control.in_flight or control.held:
                return True
            seen = control.last_request_monotonic
            if seen is not None and self._last_step is not None and seen >= self._last_step:
                return True  # a request came and went between two steps
        return any(probe.busy for probe in self.probes.values())

    async def read_provider(self) -> None:
        mono = self._clock.monotonic()
        try:
            status = await self.provider.status()
        except ProviderError as err:
            if self.view is not None or self.status_read is None:
                log.warning("cannot read the provider: %s", err)
            self.view = None
            self._provider_due = mono + self._poll
            self._tell("provider_read", None)
            return
        except Exception:
            log.exception("reading the provider failed unexpectedly")
            self.view = None
            self._provider_due = mono + self._poll
            self._tell("provider_read", None)
            return
        self.status_read = status
        view = view_of(status)
        if view is None:
            log.warning("the provider did not say whether the machine is listed")
        was_exposed = self.view is not None and (self.view.listed or self.view.rentals_running)
        self.view = view
        self._tell("provider_read", view)
        if view is not None and not view.listed and not view.rentals_running:
            if was_exposed or self._free_at is None:
                self._free_at = self._clock.monotonic()
        else:
            self._free_at = None
        exposed = view is None or view.listed or view.rentals_running > 0
        poll = self._poll if exposed else self._poll * QUIET_POLL_FACTOR
        if self.machine.state in (PoolState.LISTED, PoolState.IDLE, PoolState.DRAINING):
            poll = self._poll
        due = mono + poll
        if view is not None and view.locked_until is not None:
            # Read again the moment the last contract ends, to hand the GPUs back at once.
            left = (view.locked_until - self._clock.now()).total_seconds()
            if left > 0:
                due = min(due, mono + left + 0.5)
        self._provider_due = due

    async def _probe_services(self) -> None:
        self._services_due = self._clock.monotonic() + SERVICE_POLL
        if not self.adapters:
            return
        probes = await asyncio.gather(*(a.probe() for a in self.adapters))
        for adapter, probe in zip(self.adapters, probes, strict=True):
            before = self.probes.get(adapter.name)
            if before is not None and before.reachable != probe.reachable:
                if probe.reachable:
                    log.info("service %s is reachable again", adapter.name)
                else:
                    log.warning("service %s is unreachable: %s", adapter.name, probe.detail)
            self.probes[adapter.name] = probe

    # ---- acting -------------------------------------------------------------------------

    async def _apply(self, decision: Decision) -> None:
        self._provider_acted = False
        if decision.changed or self.last_reason != decision.reason:
            if decision.changed:
                self.since_wall = self._clock.now()
                log.info("%s", decision.reason)
                await self._record_state(decision.state, decision.reason)
            elif self.last_reason == "starting":
                log.info("%s", decision.reason)
            else:
                log.debug("%s", decision.reason)
            self.last_reason = decision.reason
        if decision.gates.guarded:
            self._set_gates(decision)
        # A self-rental rents our own offer, which unlisting takes down: displace first.
        # (The self-rental holds every GPU, so the offer left up a moment longer admits
        # no renter that could not be displaced.)
        ordered = sorted(decision.actions, key=lambda a: not isinstance(a, DisplaceInterruptible))
        for action in ordered:
            await self._do(action, decision)
        if not decision.gates.guarded:
            self._set_gates(decision)
        elif decision.state is PoolState.RECLAIMING:
            await self._release_free_services()
        await self._record_gpu_states(decision.state)

    def _set_gates(self, decision: Decision) -> None:
        mode = decision.gates
        if not mode.guarded:
            was_guarded = any(g.control.mode is ControlMode.GUARDED for g in self.gates)
            for gate in self.gates:
                gate.control.release()
            self._released_early.clear()
            if was_guarded and self._free_at is not None and self._demand_at is not None:
                self._latency("free_to_release", self._clock.monotonic() - self._free_at)
            self._demand_at = None
            return
        for gate in self.gates:
            if gate.name in self._released_early:
                continue
            gate.control.guard()
            if gate.control.rented_until != mode.rented_until:
                gate.control.set_rented_until(mode.rented_until)

    async def _release_free_services(self) -> None:
        """While renters finish, give services whose GPUs no renter holds back at once."""
        status = self.status_read
        if status is None or self.view is None or self.view.listed:
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
                    await self._resume([adapter])
                gate.control.release()
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

    async def _do(self, action: Action, decision: Decision) -> None:
        if isinstance(action, Drain):
            await self._start_drain()
        elif isinstance(action, ResumeServices):
            await self._cancel_drain()
            await self._resume(self.adapters)
        elif isinstance(action, List):
            await self._list(action)
        elif isinstance(action, Unlist):
            if self._demand_at is not None:
                self._latency("arrival_to_unlist", self._clock.monotonic() - self._demand_at)
            await self._provider_call("unlist", {"reason": decision.reason}, self.provider.unlist)
        elif isinstance(action, DisplaceInterruptible):
            payload = {"until": action.until.isoformat()}
            await self._provider_call("displace", payload, self.provider.displace_interruptible)
        elif isinstance(action, EndDisplacement):
            await self._provider_call("end_displacement", {}, self.provider.end_displacement)

    async def _list(self, action: List) -> None:
        now = self._clock.now()
        watts = [d.power_limit_w for d in self.sampler.devices if d.power_limit_w]
        rate = self.tariffs.rate_at(now)
        offer = self.provider.make_offer(
            action.end,
            load_watts_per_gpu=max(watts) if watts else None,
            price_per_kwh=rate.price_per_kwh,
        )
        payload = {
            "end": action.end.isoformat(),
            "renewal": action.renewal,
            "price_gpu": offer.price_gpu,
            "min_bid": offer.min_bid,
        }

        async def call() -> None:
            result = await self.provider.list(offer)
            if result.extended:
                log.info("the new end date extended %d running contract(s)", result.extended)

        await self._provider_call("list", payload, call)

    async def _provider_call(self, kind: str, payload: dict[str, Any], call: Any) -> bool:
        entry = await self._intent(kind, payload)
        crashpoint(f"{kind}:journaled")
        try:
            await call()
        except Exception as err:  # a marketplace failing in any way must not stop the broker
            if not isinstance(err, ProviderError):
                log.exception("%s failed unexpectedly", kind)
            else:
                log.warning("%s failed: %s", kind, err)
            await self._complete(entry, "failed", str(err))
            # Never assume: read what the marketplace really did before the next decision
            # (at the next tick, not at once: a failing API must not be hammered).
            self._provider_due = -1.0
            return False
        crashpoint(f"{kind}:called")
        await self._complete(entry, "done")
        self._provider_acted = True
        self._tell("action_done", kind, payload)
        return True

    def _latency(self, phase: Literal["arrival_to_unlist", "free_to_release"], s: float) -> None:
        getattr(self.latency, phase).append(s)
        self._tell("latency_sample", phase, s)

    def _tell(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, event)(*args)
            except Exception:  # a metrics bug must never stop the scheduler
                log.exception("scheduler hook %s failed", event)

    # ---- draining -----------------------------------------------------------------------

    async def _start_drain(self) -> None:
        await self._cancel_drain()
        entry = await self._intent("drain", {"services": [a.name for a in self.adapters]})
        crashpoint("drain:journaled")
        self._drain_status = DrainStatus.RUNNING
        self._drain_task = asyncio.create_task(self._drain(entry), name="drain")

    async def _cancel_drain(self) -> None:
        task = self._drain_task
        self._drain_task = None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._drain_status is DrainStatus.RUNNING:
            self._drain_status = DrainStatus.NONE

    async def _drain(self, entry: int | None) -> None:
        limit = self.policy.drain_timeout.total_seconds()
        deadline = self._clock.monotonic() + limit
        try:
            results = await asyncio.gather(
                *(a.drain(limit) for a in self.adapters), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            drained_at = self._clock.monotonic()
            while (why := self._not_free(drained_at)) is not None:
                if self._clock.monotonic() >= deadline:
                    raise DrainError(f"the GPUs were not free after the drain: {why}")
                await self._clock.sleep(self.config.broker.sample_interval.total_seconds())
        except asyncio.CancelledError:
            await self._complete(entry, "failed", "aborted")
            raise
        except Exception as err:  # a failed drain aborts the listing; it never stops the broker
            log.warning("drain failed: %s", err)
            self._drain_status = DrainStatus.FAILED
            await self._complete(entry, "failed", str(err))
        else:
            crashpoint("drain:called")
            self._drain_status = DrainStatus.VERIFIED
            await self._complete(entry, "done", "verified: no local process, memory free")
        finally:
            self._wake.set()

    def _not_free(self, drained_at: float) -> str | None:
        """Why NVML does not yet show the pool free after a drain; None once it does."""
        snap = self.sampler.latest
        if snap is None:
            return "no GPU sample yet"
        if snap.processes_at is None or snap.processes_at < drained_at:
            return "waiting for a process list read after the drain"
        limit = self.config.gpus.idle_memory_mb
        for index in self.pool_gpus:
            sample = snap.gpu(index)
            if sample is None or sample.lost:
                return f"GPU {index} is not reporting"
            if sample.memory_used_mb is None or sample.memory_used_mb > limit:
                return f"GPU {index} uses {sample.memory_used_mb} MB (limit {limit})"
            processes = snap.processes.get(index)
            if processes is None:
                return f"GPU {index}: processes cannot be listed"
            compute = [p for p in processes if p.kind == "compute"]
            if compute:
                return f"GPU {index}: process {compute[0].pid} ({compute[0].name}) still holds it"
        if not self.idle.all_idle(self.pool_gpus):
            return "the GPUs are not idle yet"
        return None

    async def _resume(self, adapters: Sequence[ServiceAdapter]) -> None:
        if not adapters:
            return
        entry = await self._intent("resume_services", {"services": [a.name for a in adapters]})
        results = await asyncio.gather(*(a.resume() for a in adapters), return_exceptions=True)
        failed = [str(r) for r in results if isinstance(r, BaseException)]
        for problem in failed:
            log.error("%s", problem)
        await self._complete(entry, "failed" if failed else "done", "; ".join(failed))

    # ---- earnings -----------------------------------------------------------------------

    async def sync_earnings(self, days: int = 2) -> int:
        """Copy the provider's per-day earnings into the ledger (idempotent per day)."""
        today = self._clock.now().date()
        first = date.fromordinal(today.toordinal() - days)
        try:
            records = await self.provider.earnings(first, today)
            changed = await self.ledger.upsert_earnings(records)
        except (ProviderError, LedgerError) as err:
            log.warning("earnings sync failed (tried again in an hour): %s", err)
            return 0
        if changed:
            log.info("earnings: %d day(s) updated from %s", changed, self.provider.kind)
        return changed

    # ---- the ledger ---------------------------------------------------------------------

    async def _intent(self, kind: str, payload: dict[str, Any]) -> int | None:
        try:
            return await self.ledger.journal(
                JournalEntry(
                    at=self._clock.now(), kind=kind, status="intent", subject=POOL,
                    payload=payload,
                )
            )  # fmt: skip
        except LedgerError as err:
            # Acting without a journal line is still safer than not acting (an unlist
            # must happen); the log has it.
            log.error("cannot journal %s before doing it: %s", kind, err)
            return None

    async def _complete(self, entry: int | None, status: str, outcome: str = "") -> None:
        if entry is None:
            return
        try:
            await self.ledger.complete(
                entry, "done" if status == "done" else "failed", self._clock.now(), outcome
            )
        except LedgerError as err:
            log.error("cannot complete journal entry %d: %s", entry, err)

    async def _note(self, kind: str, payload: dict[str, Any]) -> None:
        await self.ledger.journal(
            JournalEntry(at=self._clock.now(), kind=kind, status="note", subject=POOL,
                         payload=payload)
        )  # fmt: skip

    def _gate_event(self, event: str, service: str, at: datetime) -> None:
        self._notes.append(
            JournalEntry(at=at, kind=f"request_{event}", status="note", subject=service)
        )

    async def _write_notes(self) -> None:
        notes, self._notes = self._notes, []
        for note in notes:
            try:
                await self.ledger.journal(note)
            except LedgerError as err:
                log.error("cannot record a %s: %s", note.kind, err)

    async def _record_state(self, state: PoolState, reason: str) -> None:
        at = self._clock.now()
        crashpoint(f"transition:{state.value}:before-ledger")
        await self.ledger.journal(
            JournalEntry(at=at, kind="transition", status="note", subject=POOL,
                         payload={"state": state.value, "reason": reason})
        )  # fmt: skip
        await self.ledger.record_state("pool", POOL, state.value, at, reason)
        self.energy.set_pool_state(state.value.lower())

    async def _record_gpu_states(self, state: PoolState) -> None:
        """Each GPU's own state, for the report's per-GPU rows and rented GPU-hours: the
        pool's, except LOST for a GPU off the bus, and, while renters may be on the
        machine, RENTED only for a GPU a renter holds (or may hold, when the platform
        does not say which)."""
        snap = self.sampler.latest
        status = self.status_read
        renting = state in (PoolState.RENTED, PoolState.RECLAIMING)
        occupied = self._occupied_gpus(status) if renting and status is not None else None
        at = self._clock.now()
        for device in self.sampler.devices:
            sample = snap.gpu(device.index) if snap is not None else None
            gpu_state = state.value
            if sample is not None and sample.lost:
                gpu_state = "LOST"
            elif renting and occupied is not None and device.index not in occupied:
                listed = self.view is not None and self.view.listed
                gpu_state = "LISTED" if listed and state is PoolState.RENTED else "IDLE"
            elif renting and not (self.view and self.view.rentals_running):
                gpu_state = "IDLE"  # reclaiming an offer nobody rented
            if self._gpu_states.get(device.uuid) != gpu_state:
                self._gpu_states[device.uuid] = gpu_state
                await self.ledger.record_state("gpu", device.uuid, gpu_state, at, state.value)

    @staticmethod
    def _occupied_gpus(status: ProviderStatus) -> set[int] | None:
        """Indices a renter holds per the platform; None when it does not say for all."""
        if not status.gpu_occupancy or "unknown" in status.gpu_occupancy:
            return None
        return {i for i, o in enumerate(status.gpu_occupancy) if o != "free"}

    # ---- shutdown -----------------------------------------------------------------------

    async def shutdown(self) -> None:
        """A clean stop: withdraw the offer (renters keep their contracts), give the
        services their GPUs back if no renter holds them, close the ledger's intervals."""
        await self._cancel_drain()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.read_provider()
        view = self.view
        if view is None or view.listed:
            # Nobody will watch the offer: new renters must not come while the broker is down.
            await self._provider_call("unlist", {"reason": "gpu-broker stopping"},
                                      self.provider.unlist)  # fmt: skip
            await self.read_provider()
            view = self.view
        if self.machine.services_stopped and view is not None and view.rentals_running == 0:
            await self._resume(self.adapters)
            self.machine.services_stopped = False
        await self._write_notes()
        await self.ledger.close_states(self._clock.now())

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- status -------------------------------------------------------------------------

    def locked_until(self) -> datetime | None:
        return self.view.locked_until if self.view is not None else None
