"""The gate's control surface: what the scheduler drives and what it reads back.

The gate itself only relays bytes; this object decides whether an inference request may
go upstream now, must wait for the GPUs to come back, or is refused because a renter's
contract outlasts the hold. All waiting runs on the injected Clock, so tests advance a
FakeClock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from broker.clock import Clock
from broker.ledger.base import DemandOutcome
from broker.scheduling.pool import OPEN, GateMode
from broker.services.demand import DemandBuffer

__all__ = ["GateControl", "GateMode", "GateStats", "Refusal"]

log = logging.getLogger(__name__)

ReclaimCallback = Callable[[], Awaitable[None]]
# Told of each request held ("held") or answered 503 ("rejected"), with the service's name
# and when; the daemon keeps these in its ledger for the report.
EventListener = Callable[[str, str, datetime], None]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an inference request is answered 503 instead of being forwarded."""

    retry_after_s: int
    rented_until: datetime | None
    message: str


@dataclass(frozen=True, slots=True)
class GateStats:
    mode: GateMode
    in_flight: int  # inference requests being served by the upstream now
    held: int  # inference requests waiting for the GPUs now
    held_total: int  # ever held (released or refused later)
    rejected_total: int  # ever answered 503
    last_request_at: datetime | None  # arrival of the latest inference request


class GateControl:
    """Hold-and-release state for one service's gate.

    `guard()` before the GPUs leave local use (draining, listing); `release()` once they are
    back (or `apply(mode)` with the machine's `GateMode`). While guarded, the first inference
    request calls `on_reclaim` (once per guarded spell, again after it fails) and every
    inference request waits up to `max_hold`. With `set_rented_until(t)` and `t` beyond the
    hold, requests are refused at once. Each refusal is remembered (`refused_until`: the
    latest time a refused user was told to retry by) and logged once.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        name: str,
        max_hold: timedelta,
        on_reclaim: ReclaimCallback | None = None,
        display_tz: tzinfo | None = None,
    ) -> None:
        self._clock = clock
        self.name = name
        self.max_hold = max_hold
        self.on_reclaim = on_reclaim
        self.on_event: EventListener | None = None
        # Where each inference request's record goes (the daemon's, written to the ledger
        # in batches); None: not recorded.
        self.demand: DemandBuffer | None = None
        self._display_tz = display_tz
        self._mode = OPEN
        self._wake: asyncio.Future[None] | None = None  # resolved on any change of state
        self._reclaim_task: asyncio.Task[None] | None = None
        self._reclaim_asked = False
        self.in_flight = 0
        self.held = 0
        self.held_total = 0
        self.rejected_total = 0
        self.last_request_at: datetime | None = None
        self.last_request_monotonic: float | None = None
        self.refused_until: datetime | None = None

    # ---- driven by the scheduler
    @property
    def mode(self) -> GateMode:
        return self._mode

    @property
    def rented_until(self) -> datetime | None:
        return self._mode.rented_until

    @property
    def guarded(self) -> bool:
        return self._mode.guarded

    def apply(self, mode: GateMode) -> None:
        """Take up the scheduler's decision: open, or guarded (with what is known of the
        renters)."""
        if mode.rented_until is not None and mode.rented_until.tzinfo is None:
            raise ValueError("rented_until must be timezone-aware")
        before = self._mode
        if not mode.guarded:
            if not before.guarded:
                return
            self._mode = OPEN
            self._notify()
            log.info("gate %s: open, %d held request(s) released", self.name, self.held)
            return
        if mode == before:
            return
        self._mode = mode
        if not before.guarded:
            self._reclaim_asked = False
            log.info("gate %s: guarded, inference requests will be held", self.name)
        self._notify()  # held requests re-check: a long contract refuses them now

    def guard(self) -> None:
        if not self._mode.guarded:
            self.apply(GateMode(True))

    def release(self) -> None:
        """GPUs are local again: forward everything, wake every held request."""
        self.apply(OPEN)

    def set_rented_until(self, until: datetime | None) -> None:
        """A renter's contract keeps the GPUs until `until` at the latest (None: not known /
        no contract)."""
        if self._mode.guarded:
            self.apply(GateMode(True, until, renters=until is not None or self._mode.renters))

    def stats(self) -> GateStats:
        return GateStats(
            self._mode,
            self.in_flight,
            self.held,
            self.held_total,
            self.rejected_total,
            self.last_request_at,
        )

    async def aclose(self) -> None:
        task = self._reclaim_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ---- used by the gate for every inference request
    async def admit(self) -> Refusal | None:
        """None when the request may go upstream now; a Refusal to answer 503.

        Its arrival is `last_request_at` / `last_request_monotonic` as this returns or first
        waits; a refusal, or a client that leaves while held, is recorded here (demand); a
        request let through is recorded by `request_finished`."""
        arrival = self.last_request_at = self._clock.now()
        arrived = self.last_request_monotonic = self._clock.monotonic()
        if not self._mode.guarded:
            return None
        self._ask_reclaim()
        if self._outlasts_hold():
            self._record(arrival, arrived, "refused", 0.0)
            return self._reject()
        self.held += 1
        self.held_total += 1
        self._tell("held")
        try:
            released = await self._wait_for_release()
        except asyncio.CancelledError:
            # the client went away while held
            waited = self._clock.monotonic() - arrived
            self._record(arrival, arrived, "held", waited)
            raise
        finally:
            self.held -= 1
        if released:
            return None
        self._record(arrival, arrived, "refused", self._clock.monotonic() - arrived)
        return self._reject()

    def held_since(self, arrived: float) -> float:
        """Seconds a request that arrived at monotonic `arrived` has waited: its time held,
        asked by the gate as admit() lets it through after a hold."""
        return self._clock.monotonic() - arrived

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(
        self,
        arrival: datetime | None = None,
        arrived: float | None = None,
        held_s: float = -1.0,
    ) -> None:
        """An admitted request's answer ended (or broke, or its client left). `arrival` and
        `arrived` are admit()'s (None: not recorded); `held_s` how long it was held, < 0
        when it passed at once."""
        self.in_flight -= 1
        demand = self.demand
        if demand is not None and arrival is not None and arrived is not None:
            demand.add(
                self.name,
                arrival,
                self._clock.monotonic() - arrived,
                "passed" if held_s < 0 else "held",
                held_s if held_s > 0 else 0.0,
            )

    def _record(
        self, arrival: datetime, arrived: float, outcome: DemandOutcome, held_s: float
    ) -> None:
        demand = self.demand
        if demand is not None:
            demand.add(self.name, arrival, self._clock.monotonic() - arrived, outcome, held_s)

    # ---- internals
    def _reject(self) -> Refusal:
        self.rejected_total += 1
        self._tell("rejected")
        refusal = self._refusal()
        retry_by = self._clock.now() + timedelta(seconds=refusal.retry_after_s)
        if self.refused_until is None or retry_by > self.refused_until:
            self.refused_until = retry_by
        log.info("gate %s: request refused (503): %s", self.name, refusal.message)
        return refusal

    def _tell(self, event: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, self.name, self._clock.now())
            except Exception:
                log.exception("gate %s: event listener failed", self.name)

    def _outlasts_hold(self) -> bool:
        until = self._mode.rented_until
        return until is not None and until - self._clock.now() > self.max_hold

    async def _wait_for_release(self) -> bool:
        """Wait for release(); false at max_hold or once a contract is known to outlast it."""
        deadline = self._clock.monotonic() + self.max_hold.total_seconds()
        timer = asyncio.ensure_future(self._clock.sleep_until(deadline))
        try:
            while True:
                if not self._mode.guarded:
                    return True
                if timer.done() or self._outlasts_hold():
                    return False
                # One shared future wakes every held request at once; asyncio.wait leaves it
                # alone when this request gives up or its client leaves.
                await asyncio.wait((self._changed(), timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()

    def _changed(self) -> asyncio.Future[None]:
        if self._wake is None or self._wake.done():
            self._wake = asyncio.get_running_loop().create_future()
        return self._wake

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _ask_reclaim(self) -> None:
        if self.on_reclaim is None or self._reclaim_asked:
            return
        self._reclaim_asked = True
        self._reclaim_task = asyncio.create_task(
            self._run_reclaim(self.on_reclaim), name=f"gate-{self.name}-reclaim"
        )

    async def _run_reclaim(self, callback: ReclaimCallback) -> None:
        log.info("gate %s: local inference request while guarded, asking for a reclaim", self.name)
        try:
            await callback()
        except Exception:
            self._reclaim_asked = False  # let the next request ask again
            log.exception("gate %s: reclaim callback failed", self.name)

    def _refusal(self) -> Refusal:
        # A contract's end is the latest the renter may keep the GPUs (it may leave sooner),
        # so the retry time is an upper bound: the broker keeps the GPUs local for this user
        # until then rather than listing them again.
        now = self._clock.now()
        until = self._mode.rented_until
        if until is not None and until > now:
            wait_s = max(1, math.ceil((until - now).total_seconds()))
            shown = until.astimezone(self._display_tz or until.tzinfo).isoformat(
                timespec="seconds"
            )
            message = (
                f"the GPUs of this server are rented until {shown} at the latest; "
                f"gpu-broker hands them back then: retry after {wait_s} s at the latest"
            )
            return Refusal(wait_s, until, message)
        wait_s = max(1, math.ceil(self.max_hold.total_seconds()))
        source = "from a renter" if self._mode.renters else "from the marketplace"
        message = (
            f"the GPUs of this server are being reclaimed {source} and were not free "
            f"within {wait_s} s; retry in {wait_s} s at the latest"
        )
        return Refusal(wait_s, None, message)
