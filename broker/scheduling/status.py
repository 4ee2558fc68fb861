"""What the API and the metrics read of a running broker, and what they are told.

`StatusSource` is the small read-side interface the HTTP API and the Prometheus collector
depend on, instead of the daemon itself (which imports them: that made an import circle).
`SchedulerHooks` is how the metrics hear of events as they happen.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from broker.scheduling.pool import PoolState, ProviderView

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.config import Config
    from broker.eco.history import IdleHistory
    from broker.eco.profile import PowerProfile
    from broker.gpu.energy import EnergyAccountant
    from broker.gpu.idle import IdleDetector
    from broker.gpu.sampler import GpuSampler
    from broker.ledger.base import Ledger
    from broker.metrics import BrokerMetrics
    from broker.pricing.watch import PriceWatch
    from broker.services.gate import Gate

POOL = "machine"  # on Vast a listing covers the whole machine: one pool, named for that
LATENCY_SAMPLES = 1000


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

    def state_changed(self, state: PoolState, before: PoolState, reason: str) -> None:
        """The pool moved from `before` to `state` (already journaled), for `reason`."""

    def request_event(self, event: str, service: str) -> None:
        """A gate held ("held") or refused ("rejected") a local request of `service`."""


class PoolStatus(Protocol):
    """The scheduler's read side."""

    @property
    def state(self) -> PoolState: ...
    @property
    def view(self) -> ProviderView | None: ...
    @property
    def paused(self) -> bool: ...
    @property
    def last_reason(self) -> str: ...
    @property
    def sampler(self) -> GpuSampler: ...
    @property
    def energy(self) -> EnergyAccountant: ...
    @property
    def idle(self) -> IdleDetector: ...
    @property
    def pricing(self) -> PriceWatch | None: ...

    def locked_until(self) -> datetime | None: ...

    async def reclaim(self) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


class StatusSource(Protocol):
    """What the API and the metrics read (the daemon provides it)."""

    @property
    def clock(self) -> Clock: ...
    @property
    def config(self) -> Config: ...
    @property
    def ledger(self) -> Ledger | None: ...
    @property
    def gates(self) -> list[Gate]: ...
    @property
    def scheduler(self) -> PoolStatus: ...
    @property
    def metrics(self) -> BrokerMetrics | None: ...
    @property
    def idle_history(self) -> IdleHistory | None: ...
    @property
    def profile(self) -> PowerProfile | None: ...

    def status(self) -> dict[str, Any]: ...
