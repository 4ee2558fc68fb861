"""What the scheduler watches, each kept fresh by its own `Poller` (watch.py):

- the marketplace, every `provider.poll_interval` while an offer or a renter may exist (or
  the pool is on its way to a listing), `QUIET_POLL_FACTOR` times less often otherwise, and
  again the moment the last contract ends (`locked_until`);
- the local services' probes, every `SERVICE_POLL` seconds;
- the provider's earnings, copied into the ledger hourly.

GPU telemetry has its own sampler task (broker/gpu/sampler.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import date

from broker.clock import Clock
from broker.errors import LedgerError, ProviderError
from broker.ledger.base import Ledger
from broker.providers.base import Provider, ProviderStatus
from broker.scheduling.pool import ProviderView
from broker.scheduling.watch import Poller
from broker.services.base import ServiceAdapter, ServiceProbe
from broker.services.loads import ModelLoadRecorder

log = logging.getLogger(__name__)

QUIET_POLL_FACTOR = 6
SERVICE_POLL = 5.0
EARNINGS_POLL = 3600.0


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


def renter_held(status: ProviderStatus, devices: Sequence[tuple[int, str]]) -> set[int]:
    """GPUs renters hold now: in Docker's view, or shown occupied by the provider (all of
    them when it shows a rental but not on which GPU)."""
    held: set[int] = set()
    occupancy = status.gpu_occupancy
    for index, uuid in devices:
        if index < len(occupancy) and occupancy[index] not in ("free", "unknown"):
            held.add(index)
        if status.renter_gpus is not None and status.renter_gpus.held(index, uuid):
            held.add(index)
    named = any(o not in ("free", "unknown") for o in occupancy)
    if status.rentals.total > 0 and not named:
        held.update(index for index, _ in devices)
    return held


class MarketWatch:
    """The marketplace's latest status, read off the decision loop."""

    def __init__(
        self,
        provider: Provider,
        clock: Clock,
        poll: float,
        *,
        busy: Callable[[], bool],
        on_update: Callable[[], None],
    ) -> None:
        self.provider = provider
        self._clock = clock
        self.poll = poll
        self._busy = busy  # the pool is on its way to or in a listing: poll at full rate
        # What an action made true (or may have), until a read begun after it.
        self._assumed: ProviderView | None = None
        self._pending = False
        self.poller: Poller[ProviderStatus] = Poller(
            "marketplace", self._fetch, clock, self.interval, on_update=on_update,
            describe=lambda err: str(err) if isinstance(err, ProviderError)
            else f"unexpected {type(err).__name__}: {err}",
        )  # fmt: skip

    async def _fetch(self, urgent: bool) -> ProviderStatus:
        status = await self.provider.status(urgent=urgent)
        if not isinstance(status, ProviderStatus):
            raise ProviderError(f"the provider answered {type(status).__name__}, not a status")
        return status

    @property
    def status(self) -> ProviderStatus | None:
        return self.poller.latest if self.poller.ok else None

    @property
    def view(self) -> ProviderView | None:
        snap = self.poller.snapshot
        if self._assumed is not None:
            if self._pending or snap is None or snap.read < self.poller.floor:
                return self._assumed
            self._assumed = None
        status = self.status
        return view_of(status) if status is not None else None

    def assume(self, view: ProviderView) -> None:
        """A listing call is under way: an offer may be up, so decide as if it were (a
        local request then withdraws it) until the call ends."""
        self._assumed, self._pending = view, True
        self.poller.set_floor(self.poller.reads_started + 1)

    def confirmed(self, view: ProviderView) -> None:
        """The provider confirmed the action: show `view` until a read begun after it."""
        self._assumed, self._pending = view, False
        self.poller.set_floor(self.poller.reads_started + 1)
        self.poller.request_refresh()

    def forget(self) -> None:
        """The action failed or was called off: nothing is known until the next read."""
        self._assumed, self._pending = None, False
        self.poller.set_floor(self.poller.reads_started + 1)
        self.poller.request_refresh()

    def interval(self) -> float:
        view = self.view
        exposed = view is None or view.listed or view.rentals_running > 0
        poll = self.poll if exposed or self._busy() else self.poll * QUIET_POLL_FACTOR
        if view is not None and view.locked_until is not None:
            # Read again the moment the last contract ends, to hand the GPUs back at once.
            left = (view.locked_until - self._clock.now()).total_seconds()
            snap = self.poller.snapshot
            since = self._clock.monotonic() - snap.started if snap is not None else 0.0
            if left > 0:
                poll = min(poll, since + left + 0.5)
        return poll


class ServiceWatch:
    """The local services' probes; a probe that fails in any way is "unknown"."""

    def __init__(
        self,
        adapters: Sequence[ServiceAdapter],
        clock: Clock,
        on_update: Callable[[], None],
        loads: ModelLoadRecorder | None = None,
    ) -> None:
        self.adapters = list(adapters)
        self._clock = clock
        self.loads = loads  # records the models each round shows newly loaded
        self.probes: dict[str, ServiceProbe] = {}
        self.poller: Poller[dict[str, ServiceProbe]] = Poller(
            "services", self._fetch, clock, lambda: SERVICE_POLL, on_update=on_update
        )

    async def _probe(self, adapter: ServiceAdapter) -> ServiceProbe:
        try:
            return await adapter.probe()
        except Exception as err:  # an adapter bug must not stop the broker: unknown
            log.warning("service %s: probe failed: %r", adapter.name, err)
            return ServiceProbe(reachable=False, busy=None, detail=f"probe failed: {err!r}")

    async def _fetch(self, urgent: bool) -> dict[str, ServiceProbe]:
        results = await asyncio.gather(*(self._probe(a) for a in self.adapters))
        for adapter, probe in zip(self.adapters, results, strict=True):
            before = self.probes.get(adapter.name)
            if before is not None and before.reachable != probe.reachable:
                if probe.reachable:
                    log.info("service %s is reachable again", adapter.name)
                else:
                    log.warning("service %s is unreachable: %s", adapter.name, probe.detail)
            self.probes[adapter.name] = probe
        if self.loads is not None:
            await self.loads.observe(self.probes, self._clock.now())
        return dict(self.probes)


class EarningsWatch:
    """Copies the provider's per-day earnings into the ledger (idempotent per day)."""

    def __init__(self, provider: Provider, ledger: Ledger, clock: Clock) -> None:
        self.provider = provider
        self.ledger = ledger
        self._clock = clock
        self.poller: Poller[int] = Poller("earnings", self._fetch, clock, lambda: EARNINGS_POLL)

    async def _fetch(self, urgent: bool) -> int:
        return await self.sync()

    async def sync(self, days: int = 2) -> int:
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
