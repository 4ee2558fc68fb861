"""`GET /metrics`: Prometheus text (SPEC section 7).

Two kinds of series. Those that describe the present (GPU power, pool state, gate queues)
are read from the daemon at scrape time by `_StateCollector`: the sampler's latest
snapshot, never NVML itself, so a scrape costs no device call and needs no background
task. Those that count events (listings, unlists, rentals, reclaim latencies) are
updated by the scheduler's hooks as the events happen, since a scrape every 15 s would
miss what happened in between.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker import __version__
from broker.clock import Clock
from broker.eco.metrics import eco_metrics
from broker.errors import LedgerError
from broker.pricing.metrics import pricing_metrics
from broker.scheduling.pool import PoolState, ProviderView
from broker.scheduling.status import POOL, SchedulerHooks

if TYPE_CHECKING:
    from broker.scheduling.status import StatusSource

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The broker's own share of a reclaim is milliseconds (an API call or two); the buckets
# reach a minute for a marketplace that retries slowly.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The ledger is read for earnings at most this often (seconds, monotonic): they change
# hourly at most (the scheduler syncs them hourly) and scrapes may come every few seconds.
EARNINGS_REFRESH = 60.0
MIB = 1024 * 1024


class BrokerMetrics(SchedulerHooks):
    def __init__(self, daemon: StatusSource, clock: Clock) -> None:
        # `_created` series (a counter's creation time) say nothing here but the start time,
        # and on a FakeClock they would be real time among virtual: left out.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._daemon = daemon
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self.listings = Counter(
            "gpu_broker_listings",
            "Offers put on the marketplace (a renewal of a live offer is not counted)",
            registry=self.registry,
        )
        self.renewals = Counter(
            "gpu_broker_listing_renewals",
            "Live offers renewed (their end date moved)",
            registry=self.registry,
        )
        self.unlists = Counter(
            "gpu_broker_unlists", "Offers withdrawn from the marketplace", registry=self.registry
        )
        self.rentals = Counter(
            "gpu_broker_rentals",
            "Rentals seen start (increases of the running contract count between reads)",
            registry=self.registry,
        )
        self.reclaim_latency = Histogram(
            "gpu_broker_reclaim_latency_seconds",
            "The broker's share of a reclaim: local demand to unlist (arrival_to_unlist), "
            "GPUs free of renters to services given back (free_to_release)",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for phase in ("arrival_to_unlist", "free_to_release"):
            self.reclaim_latency.labels(phase=phase)  # both series exist from the start
        self._rentals_running = 0
        self.earnings: dict[str, float] = {}  # currency -> provider-reported total
        self._earnings_read_at: float | None = None
        self.registry.register(_StateCollector(daemon, self))

    # ---- scheduler hooks ----------------------------------------------------------------

    def action_done(self, kind: str, payload: Mapping[str, Any]) -> None:
        if kind == "list":
            (self.renewals if payload.get("renewal") else self.listings).inc()
        elif kind == "unlist":
            self.unlists.inc()

    def latency_sample(self, phase: str, seconds: float) -> None:
        self.reclaim_latency.labels(phase=phase).observe(max(0.0, seconds))

    def provider_read(self, view: ProviderView | None) -> None:
        if view is None:
            return  # unknown is not zero: keep the last count known
        running = view.rentals_running
        if running > self._rentals_running:
            self.rentals.inc(running - self._rentals_running)
        self._rentals_running = running

    # ---- scrape -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read what only the ledger knows (earnings), at most once a minute."""
        daemon = self._daemon
        ledger = daemon.ledger
        mono = self._clock.monotonic()
        if ledger is None or (
            self._earnings_read_at is not None and mono - self._earnings_read_at < EARNINGS_REFRESH
        ):
            return
        self._earnings_read_at = mono
        today = self._clock.now().date()
        try:
            records = await ledger.earnings(date(2000, 1, 1), today + timedelta(days=1))
        except LedgerError:
            return  # the last figures stay; the scheduler logs ledger trouble itself
        totals: dict[str, float] = {}
        for record in records:
            if record.source == "provider":
                totals[record.currency] = totals.get(record.currency, 0.0) + record.amount
        self.earnings = totals

    async def render(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """The daemon's present state, read at scrape time (no NVML call: `sampler.latest`)."""

    def __init__(self, daemon: StatusSource, metrics: BrokerMetrics) -> None:
        self._daemon = daemon
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed set of series: the GPUs and services come from the config

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("gpu_broker_info", "The broker's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        try:
            scheduler = self._daemon.scheduler
        except RuntimeError:
            return  # starting or stopped: nothing to describe yet
        yield from self._gpus()
        state = GaugeMetricFamily(
            "gpu_broker_pool_state", "1 for the pool's current state", labels=["pool", "state"]
        )
        for candidate in PoolState:
            state.add_metric([POOL, candidate.value], 1.0 if scheduler.state is candidate else 0.0)
        yield state
        paused = GaugeMetricFamily("gpu_broker_pool_paused", "1 while paused", labels=["pool"])
        paused.add_metric([POOL], 1.0 if scheduler.paused else 0.0)
        yield paused
        view = scheduler.view
        if view is not None:  # unknown is left out, never shown as 0
            listed = GaugeMetricFamily("gpu_broker_provider_listed", "1 while an offer is live")
            listed.add_metric([], 1.0 if view.listed else 0.0)
            yield listed
            running = GaugeMetricFamily(
                "gpu_broker_provider_rentals_running", "Contracts running on the machine"
            )
            running.add_metric([], view.rentals_running)
            yield running
        yield from self._gates()
        if scheduler.pricing is not None:
            yield from pricing_metrics(scheduler.pricing.status())
        earnings = CounterMetricFamily(
            "gpu_broker_earnings",
            "Provider-reported earnings in the ledger, all days (read at most once a minute)",
            labels=["currency"],
        )
        for currency, amount in sorted(self._metrics.earnings.items()):
            earnings.add_metric([currency], amount)
        yield earnings

    def _gpus(self) -> Iterator[Metric]:
        scheduler = self._daemon.scheduler
        labels = ["gpu", "uuid"]
        power = GaugeMetricFamily("gpu_broker_gpu_power_watts", "GPU power draw", labels=labels)
        util = GaugeMetricFamily(
            "gpu_broker_gpu_utilization_ratio", "GPU utilisation, 0 to 1", labels=labels
        )
        memory = GaugeMetricFamily(
            "gpu_broker_gpu_memory_used_bytes", "GPU memory in use", labels=labels
        )
        lost = GaugeMetricFamily(
            "gpu_broker_gpu_lost", "1 while the GPU is off the bus", labels=labels
        )
        energy = CounterMetricFamily(
            "gpu_broker_gpu_energy_joules",
            "Energy the GPU drew since the broker started",
            labels=labels,
        )
        overhead = CounterMetricFamily(
            "gpu_broker_gpu_overhead_energy_joules",
            "The GPU's share of host draw NVML does not see (energy.overhead_watts)",
            labels=labels,
        )
        snap = scheduler.sampler.latest
        for device in scheduler.sampler.devices:
            key = [str(device.index), device.uuid]
            sample = snap.gpu(device.index) if snap is not None else None
            if sample is not None:
                # A value not read is left out (no series), never reported as 0.
                if sample.power_w is not None:
                    power.add_metric(key, sample.power_w)
                if sample.utilization_pct is not None:
                    util.add_metric(key, sample.utilization_pct / 100.0)
                if sample.memory_used_mb is not None:
                    memory.add_metric(key, sample.memory_used_mb * MIB)
                lost.add_metric(key, 1.0 if sample.lost else 0.0)
            gpu_j = scheduler.energy.total_joules(device.uuid)
            energy.add_metric(key, gpu_j)
            with_overhead = scheduler.energy.total_joules(device.uuid, overhead=True)
            overhead.add_metric(key, with_overhead - gpu_j)
        yield from (power, util, memory, lost, energy, overhead)
        yield from eco_metrics(self._daemon, snap)

    def _gates(self) -> Iterator[Metric]:
        labels = ["service"]
        in_flight = GaugeMetricFamily(
            "gpu_broker_gate_in_flight", "Inference requests being served now", labels=labels
        )
        held = GaugeMetricFamily(
            "gpu_broker_gate_held", "Inference requests waiting for the GPUs now", labels=labels
        )
        guarded = GaugeMetricFamily(
            "gpu_broker_gate_guarded", "1 while the gate holds inference requests", labels=labels
        )
        held_total = CounterMetricFamily(
            "gpu_broker_gate_held_requests", "Inference requests ever held", labels=labels
        )
        rejected_total = CounterMetricFamily(
            "gpu_broker_gate_rejected_requests",
            "Inference requests ever answered 503",
            labels=labels,
        )
        for gate in self._daemon.gates:
            stats = gate.control.stats()
            key = [gate.name]
            in_flight.add_metric(key, stats.in_flight)
            held.add_metric(key, stats.held)
            guarded.add_metric(key, 1.0 if stats.mode.value == "guarded" else 0.0)
            held_total.add_metric(key, stats.held_total)
            rejected_total.add_metric(key, stats.rejected_total)
        yield from (in_flight, held, guarded, held_total, rejected_total)
