"""The scheduler: a thin facade over the parts that run the pool.

- `pool.py`        the pure state machine (decisions only);
- `attribution.py` whose GPU activity it is (pure);
- `watch.py`       the poller every watcher is built on;
- `watchers.py`    the marketplace, the services' probes and the earnings, each on its task;
- `loop.py`        the decision loop: latest snapshots -> machine -> gates and actions;
- `actions.py`     journal -> act -> complete, the drain, the stop deadline;
- `reconcile.py`   converging with the journal at start;
- `status.py`      what the API and the metrics read (and the hooks they are told by).

A local inference request that reaches a guarded gate wakes the loop at once
(`on_gate_demand`), so the unlist call follows the request by milliseconds, not a tick.
All waiting is on the injected Clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from broker.clock import Clock
from broker.config import Config, PolicySection
from broker.gpu.energy import EnergyAccountant
from broker.gpu.idle import IdleDetector
from broker.gpu.sampler import GpuSampler
from broker.ledger.base import Ledger
from broker.pricing.wiring import price_watch
from broker.providers.base import Provider, ProviderStatus
from broker.scheduling.actions import Actions, Journal
from broker.scheduling.loop import DecisionLoop
from broker.scheduling.pool import PoolMachine, PoolState, ProviderView
from broker.scheduling.reconcile import Reconciled, reconcile
from broker.scheduling.status import POOL, ReclaimLatency, SchedulerHooks
from broker.scheduling.watch import Poller
from broker.scheduling.watchers import EarningsWatch, MarketWatch, ServiceWatch, view_of
from broker.services.base import ServiceAdapter, ServiceProbe
from broker.services.gate import Gate
from broker.services.loads import ModelLoadRecorder

log = logging.getLogger(__name__)

# Marketplace calls while stopping end within this many seconds in all: well inside
# systemd's TimeoutStopSec (120 s in scripts/gpu-broker.service), leaving time for the rest.
STOP_BUDGET_S = 60.0

__all__ = [
    "POOL",
    "ReclaimLatency",
    "Reconciled",
    "Scheduler",
    "SchedulerHooks",
    "view_of",
]


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
        self.config = config
        self.ledger = ledger
        self.provider = provider
        self.sampler = sampler
        self.idle = idle
        self.energy = energy
        self.adapters = list(adapters)
        self.gates = list(gates)
        self.hooks: list[SchedulerHooks] = []
        self.machine = PoolMachine(config.policy, tz=config.broker.tz)
        self.journal = Journal(ledger, clock)
        self.actions = Actions(
            config, clock, journal=self.journal, provider=provider, sampler=sampler,
            idle=idle, adapters=self.adapters, hooks=self.hooks, wake=self.wake,
        )  # fmt: skip
        self.market = MarketWatch(
            provider, clock, config.provider.poll_interval.total_seconds(),
            busy=self._heading_to_listing, on_update=self._market_updated,
        )  # fmt: skip
        gpus = {s.name: s.gpus for s in config.services}
        self.services = ServiceWatch(
            self.adapters, clock, on_update=self.wake, loads=ModelLoadRecorder(ledger, gpus)
        )
        self.pricing = price_watch(
            config, provider, clock, self.actions, lambda: self.market.status, on_update=self.wake
        )
        self.actions.pricing = self.pricing
        self.earnings = EarningsWatch(provider, ledger, clock)
        self.loop = DecisionLoop(
            config, clock, machine=self.machine, actions=self.actions, market=self.market,
            services=self.services, sampler=sampler, idle=idle, energy=energy,
            adapters=self.adapters, gates=[g.control for g in self.gates],
        )  # fmt: skip
        self._pollers: list[asyncio.Task[None]] = []
        for gate in self.gates:
            gate.control.on_reclaim = self.on_gate_demand
            gate.control.on_event = self.loop.gate_event
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take up a (re)loaded configuration's policy, windows and tariffs."""
        self.config = config
        self.loop.configure(config)
        self.actions.configure(config)
        self.market.poll = config.provider.poll_interval.total_seconds()
        self.market.poller.retime()
        by_name = {s.name: s for s in config.services}
        for gate in self.gates:
            section = by_name.get(gate.name)
            if section is not None:
                gate.control.max_hold = section.max_hold

    # ---- what others read ---------------------------------------------------------------

    @property
    def policy(self) -> PolicySection:
        return self.config.policy

    @property
    def state(self) -> PoolState:
        return self.machine.state

    @property
    def view(self) -> ProviderView | None:
        return self.market.view

    @property
    def status_read(self) -> ProviderStatus | None:
        return self.market.status

    @property
    def probes(self) -> dict[str, ServiceProbe]:
        return self.services.probes

    @property
    def last_reason(self) -> str:
        return self.loop.last_reason

    @property
    def since_wall(self) -> datetime:
        return self.loop.since_wall

    @property
    def paused(self) -> bool:
        return self.loop.paused

    @property
    def latency(self) -> ReclaimLatency:
        return self.loop.latency

    @property
    def pool_gpus(self) -> list[int]:
        return self.loop.pool_gpus

    @property
    def parked(self) -> bool:
        """The loop waits for its next step and nothing it asked for is under way (tests
        wait for this to settle; a stalled background read does not count)."""
        return self.loop.parked and not self.loop.woken and not self.loop.acting

    @property
    def reading(self) -> bool:
        """A watcher's read is in flight."""
        pollers: list[Poller[Any]] = [self.market.poller, self.services.poller]
        if self.pricing is not None:
            pollers.append(self.pricing.poller)
        return any(w.fetching or w.refreshing for w in pollers)

    def locked_until(self) -> datetime | None:
        view = self.view
        return view.locked_until if view is not None else None

    def window_end(self, now: datetime) -> datetime | None:
        return self.loop.window_end(now)

    # ---- outside requests ---------------------------------------------------------------

    async def on_gate_demand(self) -> None:
        """A gate holds a local inference request: step now rather than at the next tick."""
        self.loop.demand()

    async def pause(self) -> None:
        self.loop.paused = True
        await self.journal.note("pause", {})
        self.wake()

    async def resume(self) -> None:
        self.loop.paused = False
        self.loop.reclaim_requested = False
        await self.journal.note("resume", {})
        self.wake()

    async def reclaim(self) -> None:
        self.loop.reclaim_requested = True
        await self.journal.note("reclaim", {})
        self.loop.demand()

    def wake(self) -> None:
        self.loop.wake()

    def _market_updated(self) -> None:
        self.loop.market_updated()

    def _heading_to_listing(self) -> bool:
        return self.machine.state in (PoolState.LISTED, PoolState.IDLE, PoolState.DRAINING)

    # ---- start --------------------------------------------------------------------------

    async def reconcile(self) -> Reconciled:
        """Converge with what a previous run left (see reconcile.py); redo an interrupted
        drain before anything else."""
        found = await reconcile(self.ledger, self._clock, self.machine, self.actions)
        self.loop.paused = found.paused
        if found.redo_drain and not found.paused:
            log.info("an interrupted drain is redone before anything else")
            self.machine.state = PoolState.DRAINING
            self.machine.since = self._clock.monotonic()
            await self.actions.start_drain()
        await self.loop.record_state(self.machine.state, "started")
        await self.loop.learn(self.ledger)
        return found

    async def step(self) -> Any:
        """One step; the first reads the marketplace and the services before deciding (at
        start, so the gates open in the right mode)."""
        if self.market.poller.snapshot is None and self.market.poller.ok is None:
            await self.market.poller.read_now()
        if self.services.poller.snapshot is None:
            await self.services.poller.read_now()
        return await self.loop.step()

    async def run(self) -> None:
        """The watchers and the decision loop, until cancelled. A watcher never fails (it
        logs and reports "unknown"); the loop failing ends this, and the process exits
        non-zero for systemd to restart it."""
        self._pollers = [
            asyncio.create_task(self.market.poller.run(), name="watch-marketplace"),
            asyncio.create_task(self.services.poller.run(), name="watch-services"),
            asyncio.create_task(self.earnings.poller.run(), name="watch-earnings"),
        ]
        if self.pricing is not None:
            await self.pricing.reader.start()
            self._pollers.append(
                asyncio.create_task(self.pricing.poller.run(), name="watch-market-prices")
            )
        try:
            await self.loop.run()
        finally:
            await self._stop_pollers()

    async def _stop_pollers(self) -> None:
        for task in self._pollers:
            task.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        self._pollers = []
        for poller in (self.market.poller, self.services.poller, self.earnings.poller):
            await poller.aclose()
        if self.pricing is not None:
            await self.pricing.poller.aclose()
            await self.pricing.reader.close()

    async def sync_earnings(self, days: int = 2) -> int:
        """Copy the provider's per-day earnings into the ledger (idempotent per day)."""
        return await self.earnings.sync(days)

    async def read_provider(self) -> None:
        """Read the marketplace now (the result becomes the latest snapshot)."""
        await self.market.poller.read_now()

    # ---- shutdown -----------------------------------------------------------------------

    async def shutdown(self) -> None:
        """A clean stop: withdraw the offer (renters keep their contracts), give the
        services their GPUs back if no renter holds them, close the ledger's intervals.
        Marketplace calls share one deadline, so the stop ends inside TimeoutStopSec."""
        self.actions.set_deadline(STOP_BUDGET_S)
        await self.loop.cancel_listing()
        await self.actions.cancel_drain()
        await self._stop_pollers()
        can_list = self.provider.capabilities.can_list
        status = await self.actions.read(urgent=True)
        view = view_of(status) if status is not None else None
        if can_list and (view is None or view.listed):
            # Nobody will watch the offer: new renters must not come while the broker is down.
            _, status = await self.actions.unlist("gpu-broker stopping", urgent=True)
            if status is None:
                status = await self.actions.read(urgent=True)
            view = view_of(status) if status is not None else None
        if self.machine.services_stopped and view is not None and view.rentals_running == 0:
            await self.actions.resume(self.adapters)
            self.machine.services_stopped = False
        with contextlib.suppress(Exception):
            await self.journal.flush()
        await self.ledger.close_states(self._clock.now())
