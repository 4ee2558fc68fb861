"""`gpu-broker run`: everything wired together, started in order, stopped in reverse.

Start: the state directory's lock (one broker per ledger, before anything else), every
listening address claimed (a taken port fails here, before anything is touched), ledger,
GPU telemetry (first sample taken), services, marketplace, reconcile with the journal, one
scheduler step (so the gates open in the right mode: a listing left by a crashed run keeps
them guarded), then the gates and the HTTP API. Stop: gates and API first (no new
requests), then the scheduler's clean shutdown (withdraw the offer, give the services
back, close the ledger's intervals), then telemetry (energy flushed), the ledger and the
lock. What the stop could not do is kept in `stop_problems` (the exit status is 1 then).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from datetime import datetime
from typing import Any

from broker import __version__
from broker.api import ApiServer
from broker.clock import Clock
from broker.config import Config
from broker.eco.history import IdleHistory
from broker.eco.profile import PowerProfile
from broker.errors import BrokerError
from broker.gpu import create_backend
from broker.gpu.energy import EnergyAccountant
from broker.gpu.fake import FakeBackend
from broker.gpu.idle import IdleDetector
from broker.gpu.sampler import GpuSampler
from broker.instance_lock import InstanceLock
from broker.ledger import Ledger, claim_host, open_ledger
from broker.listeners import Reservation, reserve
from broker.metrics import BrokerMetrics
from broker.notify import Notifier
from broker.preflight import GATE_HINT, gpu_index_problems, listen_addresses
from broker.providers import Provider, create_provider
from broker.providers.paper import PaperMarket
from broker.report import Report, build_report
from broker.scheduling.pool import PoolState
from broker.scheduling.scheduler import POOL, Scheduler
from broker.services import Gate, ServiceAdapter, build_adapter
from broker.services.demand import DemandBuffer, DemandWriter

log = logging.getLogger(__name__)



def iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


class Daemon:
    def __init__(self, config: Config, clock: Clock, *, host: str | None = None) -> None:
        self.config = config
        self._clock = clock
        self._host = host
        self.ledger: Ledger | None = None
        self.sampler: GpuSampler | None = None
        self.idle_history: IdleHistory | None = None
        self.profile: PowerProfile | None = None
        self.provider: Provider | None = None
        self.adapters: list[ServiceAdapter] = []
        self.gates: list[Gate] = []
        self.api: ApiServer | None = None
        self.metrics: BrokerMetrics | None = None
        self.notifier: Notifier | None = None
        self._scheduler: Scheduler | None = None
        self.demand: DemandWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lock: InstanceLock | None = None
        self._reserved: Reservation | None = None
        self.stop_problems: list[str] = []

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("the daemon is not started")
        return self._scheduler

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        config, clock = self.config, self._clock
        self._lock = InstanceLock.acquire(config.broker.state_dir)
        self._reserved = reserve(listen_addresses(config))
        self.ledger = ledger = await open_ledger(config.broker, self._host)
        await claim_host(ledger, config.broker)  # a shared ledger: this host name is ours
        backend = await create_backend(config.gpus, clock)
        idle = IdleDetector.from_config(config.gpus)
        self.sampler = sampler = GpuSampler(
            backend,
            clock,
            interval=config.broker.sample_interval.total_seconds(),
            process_interval=config.gpus.process_interval.total_seconds(),
            idle=idle,
        )
        devices = await sampler.start()
        # A crashed run may have left the eco profile on the cards: give them back first.
        self.profile = PowerProfile(sampler, config.broker.state_dir, config.eco.profile)
        await self.profile.restore_leftover()
        missing = gpu_index_problems(config, (d.index for d in devices))
        if missing:  # `check` says the same; a gate would wait for GPUs that never free
            raise BrokerError("; ".join(missing))
        energy = EnergyAccountant(
            devices, clock, ledger=ledger, overhead_watts=config.energy.overhead_watts
        )
        sampler.energy = energy
        self.idle_history = IdleHistory(
            devices, ledger, utilization_pct=config.gpus.idle_utilization_pct
        )
        sampler.listeners.append(self.idle_history.observe)
        await sampler.tick()
        log.info(
            "GPUs (%s): %s", backend.kind,
            ", ".join(f"{d.index}: {d.name}" for d in devices) or "none",
        )  # fmt: skip

        self.adapters = [build_adapter(s, clock) for s in config.services]
        self.gates = [
            Gate.from_section(s, clock, display_tz=config.broker.tz)
            for s in config.services
            if s.gate_listen is not None
        ]
        # every inference request at a gate, written to the ledger in batches
        self.demand = demand = DemandWriter(DemandBuffer(), ledger, clock)
        for gate in self.gates:
            gate.control.demand = demand.buffer
        self.provider = provider = create_provider(config, clock, gpu_count=len(devices) or 1)
        if isinstance(provider, PaperMarket) and isinstance(backend, FakeBackend):
            # the demo tells the truth: the paper market's renters load the fake GPUs
            provider.on_renter_load = backend.renter_load
        await provider.start()
        self._scheduler = scheduler = Scheduler(
            config,
            clock,
            ledger=ledger,
            provider=provider,
            sampler=sampler,
            idle=idle,
            energy=energy,
            adapters=self.adapters,
            gates=self.gates,
        )
        self.metrics = BrokerMetrics(self, clock)
        scheduler.hooks.append(self.metrics)  # before the first step: count from the start
        if config.notify:

            async def day_report(start: datetime, end: datetime) -> Report:
                return await build_report(ledger, self.config, since=start, until=end,
                                          now=clock.now())  # fmt: skip

            self.notifier = Notifier(config, clock, report=day_report)
            scheduler.hooks.append(self.notifier)
            self.notifier.start()
        if self.profile.enabled:
            self.profile.want(scheduler.state)
            scheduler.hooks.append(self.profile)
        await scheduler.reconcile()
        await scheduler.step()
        for gate in self.gates:
            index = self._service_index(gate.name)
            key = f"services[{index}].gate_listen"
            try:
                await gate.start()
            except OSError as err:
                why = "the address is in use" if err.errno == errno.EADDRINUSE else err.strerror
                raise BrokerError(
                    f"{key}: cannot listen on {config.services[index].gate_listen}: {why}"
                    + GATE_HINT
                ) from None
            self._reserved.release(key)
        self.api = ApiServer(self, config.broker)
        await self.api.start()
        self._reserved.release()
        self._tasks = [
            asyncio.create_task(sampler.run(), name="gpu-sampler"),
            asyncio.create_task(scheduler.run(), name="scheduler"),
            asyncio.create_task(demand.run(), name="demand-writer"),
        ]
        if self.profile.enabled:
            self._tasks.append(asyncio.create_task(self.profile.run(), name="eco-profile"))
        log.info(
            "gpu-broker %s running: pool %s, %s provider, API on %s",
            __version__, scheduler.state.value, provider.kind, self.api.url,
        )  # fmt: skip

    def _service_index(self, name: str) -> int:
        return next(i for i, s in enumerate(self.config.services) if s.name == name)

    async def wait(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; a crashed loop ends it too (raised, so the exit is 1)."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait(
                [stopper, *self._tasks], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                raise BrokerError(f"{task.get_name()} stopped: {task.exception()!r}")

    async def aclose(self) -> None:
        """Stop everything that was started, in reverse order; safe after a failed start.
        What could not be done (a ledger that would not take a write, an offer left up) is
        logged and kept in `stop_problems`."""
        if self._reserved is not None:
            self._reserved.release()
            self._reserved = None
        if self.api is not None:
            await self.api.aclose()
        for gate in self.gates:
            await gate.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.demand is not None and self.ledger is not None:
            await self.demand.aclose()  # the gates are closed: what they saw, written
            self.demand = None
        if self._scheduler is not None:
            try:
                await self._scheduler.shutdown()
            except BrokerError as err:
                log.error("clean shutdown incomplete: %s", err)
                self.stop_problems.append(f"clean shutdown incomplete: {err}")
            self._scheduler = None
        if self.notifier is not None:
            await self.notifier.aclose()
            self.notifier = None
        for adapter in self.adapters:
            await adapter.aclose()
        if self.provider is not None:
            await self.provider.close()
        if self.profile is not None:
            try:
                problems = await self.profile.restore()
            except (BrokerError, OSError) as err:
                problems = [str(err)]
            for problem in problems:
                self.stop_problems.append(f"eco profile not given back: {problem}")
            self.profile = None
        if self.sampler is not None:
            with contextlib.suppress(BrokerError):
                await self.sampler.close()
            lost = self.sampler.energy.unflushed() if self.sampler.energy else None
            if lost:
                message = f"energy not written to the ledger, lost: {lost}"
                log.error("%s", message)
                self.stop_problems.append(message)
        if self.idle_history is not None:
            with contextlib.suppress(BrokerError):  # advice only: a lost slot is no problem
                await self.idle_history.close()
        if self.ledger is not None:
            await self.ledger.close()
            self.ledger = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def reload(self, new: Config) -> list[str]:
        """Apply a re-read configuration, keeping state. Returns the keys that only take
        effect at the next start (they are logged too)."""
        old = self.config
        restart: list[str] = []
        live = {"timezone", "api_token_env", "api_token_file", "api_allowed_hosts"}
        if new.broker.model_dump(exclude=live) != old.broker.model_dump(exclude=live):
            restart.append("broker")
        if new.gpus != old.gpus:
            restart.append("gpus")
        strip = {"max_hold"}
        if [s.model_dump(exclude=strip) for s in new.services] != [
            s.model_dump(exclude=strip) for s in old.services
        ]:
            restart.append("services")
        if new.provider != old.provider:
            restart.append("provider")
        if new.energy.overhead_watts != old.energy.overhead_watts:
            restart.append("energy.overhead_watts")
        self.config = new
        self.scheduler.configure(new)
        if self.api is not None:
            self.api.configure(new.broker)
        self.scheduler.wake()
        applied = "policy, windows, energy tariffs, services' max_hold, API token and hosts"
        if restart:
            log.warning(
                "configuration reloaded (%s); changes to %s take effect at the next start",
                applied, ", ".join(restart),
            )  # fmt: skip
        else:
            log.info("configuration reloaded (%s)", applied)
        return restart

    # ---- status (SPEC section 5) --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        scheduler = self.scheduler
        view = scheduler.view
        listed_until = view.offer_end if view is not None and view.listed else None
        snap = scheduler.sampler.latest
        gpus: list[dict[str, Any]] = []
        for device in scheduler.sampler.devices:
            sample = snap.gpu(device.index) if snap is not None else None
            joules = scheduler.energy.total_joules(device.uuid)
            gpus.append(
                {
                    "index": device.index,
                    "uuid": device.uuid,
                    "name": device.name,
                    "utilization_pct": sample.utilization_pct if sample else None,
                    "memory_used_mb": sample.memory_used_mb if sample else None,
                    "power_w": sample.power_w if sample else None,
                    "energy_wh": round(joules / 3600.0, 3),
                    "lost": bool(sample.lost) if sample else False,
                    "idle": scheduler.idle.is_idle(device.index),
                    "idle_reason": scheduler.idle.status(device.index).reason,
                }
            )
        gates = {g.name: g for g in self.gates}
        services: list[dict[str, Any]] = []
        for section in self.config.services:
            probe = scheduler.probes.get(section.name)
            gate = gates.get(section.name)
            stats = gate.control.stats() if gate is not None else None
            services.append(
                {
                    "name": section.name,
                    "kind": section.kind,
                    "reachable": probe.reachable if probe is not None else None,
                    "in_flight": stats.in_flight if stats else None,
                    "held": stats.held if stats else None,
                    "last_request_at": iso(stats.last_request_at) if stats else None,
                    "gate": gate.url if gate is not None else None,
                    "gate_mode": stats.mode.value if stats else None,
                    "held_total": stats.held_total if stats else None,
                    "rejected_total": stats.rejected_total if stats else None,
                    "detail": probe.detail if probe is not None else None,
                }
            )
        provider = scheduler.provider
        return {
            "version": __version__,
            "now": iso(self._clock.now()),
            "pools": [
                {
                    "name": POOL,
                    "state": scheduler.state.value,
                    "gpus": list(scheduler.pool_gpus),
                    "since": iso(scheduler.since_wall),
                    "listed_until": iso(listed_until),
                    "locked_until": iso(scheduler.locked_until()),
                    "reason": scheduler.last_reason,
                    "paused": scheduler.paused,
                    "window_until": iso(scheduler.window_end(self._clock.now())),
                    "max_commitment_s": self.config.policy.max_commitment.total_seconds(),
                }
            ],
            "gpus": gpus,
            "services": services,
            "provider": {
                "kind": provider.kind,
                "can_list": provider.capabilities.can_list,
                "listed": view.listed if view is not None else None,
                "rentals_running": view.rentals_running if view is not None else None,
                "locked_until": iso(scheduler.locked_until()),
                "reachable": view is not None,
                "note": provider.capabilities.note,
                "pricing": scheduler.pricing.status().as_json() if scheduler.pricing else None,
            },
            "reclaim_latency": scheduler.latency.summary(),
        }

    @property
    def state(self) -> PoolState:
        return self.scheduler.state
