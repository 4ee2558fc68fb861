"""The scheduler's hands: every external action journaled before it is taken and completed
after (intent -> act -> done/failed), so a restart can tell what was in flight.

Crash points (`broker.crashpoints`, used by the real-process crash tests) mark the moments
between journaling and acting: `KIND:journaled`, `KIND:called`, `drain:journaled`,
`drain:called`, `transition:STATE:before-ledger`.

Marketplace calls made while stopping share one deadline (`set_deadline`), so a stop ends
inside systemd's TimeoutStopSec however the marketplace answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from broker.clock import Clock
from broker.config import Config
from broker.crashpoints import crashpoint
from broker.errors import DrainError, LedgerError, ProviderError
from broker.gpu.idle import IdleDetector
from broker.gpu.sampler import GpuSampler
from broker.ledger.base import JournalEntry, Ledger, PriceRecord
from broker.pricing.watch import PriceWatch
from broker.providers.base import Provider, ProviderStatus
from broker.scheduling.pool import DrainStatus, List, PoolState
from broker.scheduling.status import POOL, SchedulerHooks
from broker.scheduling.tariffs import TariffSchedule
from broker.services.base import ServiceAdapter

log = logging.getLogger(__name__)


# The action that offers the machine to renters: never taken without its intent journaled.
ACQUIRING = frozenset({"list"})


class Journal:
    """The ledger's journal as the scheduler writes it; a failing ledger never stops it."""

    def __init__(self, ledger: Ledger, clock: Clock) -> None:
        self.ledger = ledger
        self._clock = clock
        self._notes: list[JournalEntry] = []

    async def intent(self, kind: str, payload: dict[str, Any]) -> int | None:
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

    async def complete(self, entry: int | None, status: str, outcome: str = "") -> None:
        if entry is None:
            return
        try:
            await self.ledger.complete(
                entry, "done" if status == "done" else "failed", self._clock.now(), outcome
            )
        except LedgerError as err:
            log.error("cannot complete journal entry %d: %s", entry, err)

    async def note(self, kind: str, payload: dict[str, Any]) -> None:
        await self.ledger.journal(
            JournalEntry(at=self._clock.now(), kind=kind, status="note", subject=POOL,
                         payload=payload)
        )  # fmt: skip

    def later(self, entry: JournalEntry) -> None:
        """Written at the end of the step (the gates tell from inside requests)."""
        self._notes.append(entry)

    async def flush(self) -> None:
        notes, self._notes = self._notes, []
        for note in notes:
            try:
                await self.ledger.journal(note)
            except LedgerError as err:
                log.error("cannot record a %s: %s", note.kind, err)

    async def transition(self, state: PoolState, reason: str) -> datetime:
        at = self._clock.now()
        crashpoint(f"transition:{state.value}:before-ledger")
        await self.ledger.journal(
            JournalEntry(at=at, kind="transition", status="note", subject=POOL,
                         payload={"state": state.value, "reason": reason})
        )  # fmt: skip
        await self.ledger.record_state("pool", POOL, state.value, at, reason)
        return at


class Actions:
    """Drain, resume, list, unlist, displace: each journaled, each failure contained."""

    def __init__(
        self,
        config: Config,
        clock: Clock,
        *,
        journal: Journal,
        provider: Provider,
        sampler: GpuSampler,
        idle: IdleDetector,
        adapters: Sequence[ServiceAdapter],
        hooks: list[SchedulerHooks],
        wake: Callable[[], None],
    ) -> None:
        self.config = config
        self._clock = clock
        self.journal = journal
        self.provider = provider
        self.sampler = sampler
        self.idle = idle
        self.adapters = list(adapters)
        self.hooks = hooks
        self._wake = wake
        self.tariffs = TariffSchedule.from_config(config.energy, config.broker.tz)
        self.drain_status = DrainStatus.NONE
        self._drain_task: asyncio.Task[None] | None = None
        self._deadline: float | None = None  # loop time by which marketplace calls end
        # price_gpu = "market": the watcher whose ask each listing carries (scheduler.py).
        self.pricing: PriceWatch | None = None
        self.listed_price: float | None = None  # USD per GPU-hour of the last listing made

    def configure(self, config: Config) -> None:
        self.config = config
        self.tariffs = TariffSchedule.from_config(config.energy, config.broker.tz)

    @property
    def pool_gpus(self) -> list[int]:
        return [d.index for d in self.sampler.devices]

    def set_deadline(self, seconds: float) -> None:
        """From now on, marketplace calls end within `seconds` (real time) in all."""
        self._deadline = asyncio.get_running_loop().time() + seconds

    # ---- the marketplace ----------------------------------------------------------------

    async def provider_call(
        self, kind: str, payload: dict[str, Any], call: Callable[[], Awaitable[Any]]
    ) -> tuple[bool, Any]:
        """(succeeded, what the call returned)."""
        entry = await self.journal.intent(kind, payload)
        if entry is None and kind in ACQUIRING:
            # Invariant 4: nothing is offered to renters that the ledger has not been told
            # of first (a shared database may be away); giving back never waits on it.
            log.warning("%s not done: it could not be journaled first", kind)
            return False, None
        crashpoint(f"{kind}:journaled")
        try:
            async with asyncio.timeout_at(self._deadline):
                result = await call()
        except asyncio.CancelledError:
            # Called off (an unlist overtakes a listing, or the broker stops): whether the
            # platform did it is for the next read to say.
            await self.journal.complete(entry, "failed", "called off")
            raise
        except Exception as err:  # a marketplace failing in any way must not stop the broker
            if isinstance(err, TimeoutError) and self._deadline is not None:
                log.warning("%s given up: the stop deadline passed", kind)
            elif not isinstance(err, ProviderError):
                log.exception("%s failed unexpectedly", kind)
            else:
                log.warning("%s failed: %s", kind, err)
            await self.journal.complete(entry, "failed", str(err) or type(err).__name__)
            return False, None
        crashpoint(f"{kind}:called")
        await self.journal.complete(entry, "done")
        self.tell("action_done", kind, payload)
        return True, result

    async def unlist(self, reason: str, *, urgent: bool) -> tuple[bool, ProviderStatus | None]:
        async def call() -> ProviderStatus | None:
            return await self.provider.unlist(urgent=urgent)

        done, status = await self.provider_call("unlist", {"reason": reason}, call)
        return done, status if isinstance(status, ProviderStatus) else None

    def load_watts_per_gpu(self) -> float | None:
        watts = [d.power_limit_w for d in self.sampler.devices if d.power_limit_w]
        return max(watts) if watts else None

    async def list(self, action: List, *, rented: bool = False) -> bool:
        """List or renew; `rented`: renters run (a market ask then stays as it is)."""
        now = self._clock.now()
        rate = self.tariffs.rate_at(now)
        ask = self.pricing.take(rented=rented) if self.pricing is not None else None
        if self.pricing is not None and ask is None:
            log.warning("list not done: no market ask yet (%s)", self.pricing.status().reason)
            return False
        offer = self.provider.make_offer(
            action.end,
            load_watts_per_gpu=self.load_watts_per_gpu(),
            price_per_kwh=rate.price_per_kwh,
            ask=ask,
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

        done, _ = await self.provider_call("list", payload, call)
        if done:
            self.listed_price = offer.price_gpu
            await self.record_price(PriceRecord(now, "ask", offer.price_gpu))
            if self.pricing is not None:
                self.pricing.listed()
        return done

    async def record_price(self, record: PriceRecord) -> None:
        """Into the ledger's prices (the report's realised price and market median)."""
        try:
            await self.journal.ledger.add_price(record)
        except LedgerError as err:
            log.warning("cannot record a %s price: %s", record.kind, err)

    async def displace(self, until: datetime) -> bool:
        payload = {"until": until.isoformat()}
        done, _ = await self.provider_call(
            "displace", payload, self.provider.displace_interruptible
        )
        return done

    async def end_displacement(self, reason: str | None = None) -> bool:
        payload = {"reason": reason} if reason else {}
        done, _ = await self.provider_call(
            "end_displacement", payload, self.provider.end_displacement
        )
        return done

    async def read(self, *, urgent: bool = False) -> ProviderStatus | None:
        """One read under the stop deadline; None when it fails."""
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self.provider.status(urgent=urgent)
        except Exception as err:
            log.warning("cannot read the provider: %s", err)
            return None

    def tell(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, event)(*args)
            except Exception:  # a metrics bug must never stop the scheduler
                log.exception("scheduler hook %s failed", event)

    # ---- the services -------------------------------------------------------------------

    async def start_drain(self) -> None:
        await self.cancel_drain()
        entry = await self.journal.intent("drain", {"services": [a.name for a in self.adapters]})
        crashpoint("drain:journaled")
        self.drain_status = DrainStatus.RUNNING
        self._drain_task = asyncio.create_task(self._drain(entry), name="drain")

    async def cancel_drain(self) -> None:
        task = self._drain_task
        self._drain_task = None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.drain_status is DrainStatus.RUNNING:
            self.drain_status = DrainStatus.NONE

    def take_drain_status(self) -> DrainStatus:
        """The drain's outcome for this step; a finished outcome is consumed."""
        status = self.drain_status
        if status in (DrainStatus.VERIFIED, DrainStatus.FAILED):
            self.drain_status = DrainStatus.NONE
        return status

    async def _drain(self, entry: int | None) -> None:
        limit = self.config.policy.drain_timeout.total_seconds()
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
            await self.journal.complete(entry, "failed", "aborted")
            raise
        except Exception as err:  # a failed drain aborts the listing; it never stops the broker
            log.warning("drain failed: %s", err)
            self.drain_status = DrainStatus.FAILED
            await self.journal.complete(entry, "failed", str(err))
        else:
            crashpoint("drain:called")
            self.drain_status = DrainStatus.VERIFIED
            await self.journal.complete(entry, "done", "verified: no local process, memory free")
        finally:
            self._wake()

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

    async def resume(self, adapters: Sequence[ServiceAdapter]) -> None:
        if not adapters:
            return
        entry = await self.journal.intent(
            "resume_services", {"services": [a.name for a in adapters]}
        )
        results = await asyncio.gather(*(a.resume() for a in adapters), return_exceptions=True)
        failed = [str(r) for r in results if isinstance(r, BaseException)]
        for problem in failed:
            log.error("%s", problem)
        await self.journal.complete(entry, "failed" if failed else "done", "; ".join(failed))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.cancel_drain()
