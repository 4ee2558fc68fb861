"""The pool state machine of SPEC section 3, as a pure function of what the broker observes.

`PoolMachine.step(observation)` returns the new state, the actions to take and the reason.
It does no I/O and reads no clock: the observation carries the time. The daemon gathers the
observation (telemetry, gates, provider, windows), journals the actions, performs them and
feeds their outcome back in the next observation. Being pure, it can be driven through
thousands of random histories by a property test that checks the invariants after each step.

The invariants it is built to keep:
1. Never listed outside a window; no offer end beyond the window's end.
2. Never listed while a local service holds the GPUs: `List` only follows a verified drain
   observed together with idle GPUs and no local demand.
3. No local request is lost: local demand while listed or rented always unlists at once, and
   held requests are released as soon as no renter holds the GPUs. A request refused with
   503 stays demand until the GPUs are back, and the pool is not listed again before the
   time the refusal told that user to retry.
6. Anti-flap: `min_listed` (no listing shorter than that), `max_cycles_per_day` (rolling 24h),
   `local_hold` after a reclaim.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import ClassVar

from broker.config import PolicySection
from broker.units import describe_duration, format_duration


class PoolState(StrEnum):
    LOCAL = "LOCAL"
    IDLE = "IDLE"
    DRAINING = "DRAINING"
    LISTED = "LISTED"
    RENTED = "RENTED"
    RECLAIMING = "RECLAIMING"
    PAUSED = "PAUSED"
    DEGRADED = "DEGRADED"


class DrainStatus(StrEnum):
    NONE = "none"  # no drain requested, or its outcome already consumed
    RUNNING = "running"
    VERIFIED = "verified"  # models unloaded and NVML shows the GPUs free
    FAILED = "failed"


@dataclass(frozen=True)
class ProviderView:
    """What the marketplace says right now (None in the observation: it cannot be read)."""

    listed: bool
    rentals_running: int
    locked_until: datetime | None = None  # latest contract end
    offer_end: datetime | None = None
    only_interruptible: bool = False


@dataclass(frozen=True)
class Observation:
    now: datetime  # wall time, UTC
    monotonic: float
    window_end: datetime | None  # end of the window open now; None outside every window
    gpus_idle: bool | None  # every GPU of the pool idle; None when telemetry cannot tell
    local_demand: bool  # an inference request in flight or held at a gate
    provider: ProviderView | None
    drain: DrainStatus = DrainStatus.NONE
    paused: bool = False
    reclaim_requested: bool = False
    # Whose is the GPU activity (see attribution.py)? True: every busy GPU is a renter's
    # (its container, or a GPU the provider shows occupied), so it is not local use.
    busy_is_renters: bool = False
    # The provider view was read after the unexplained GPU activity began: if it shows no
    # renter, the activity is local. False: read the marketplace before deciding.
    view_after_activity: bool = True
    # The latest time a 503 told a refused user to retry by (kept by the scheduler).
    refused_until: datetime | None = None
    # The provider's capabilities: a provider that cannot list is only observed.
    can_list: bool = True
    can_displace: bool = True
    # With policy.demand_risk: until when a local request stays unlikely by the team's
    # weekly rhythm (rhythm.py); offers end there. None: no opinion (not learned yet).
    quiet_until: datetime | None = None
    # price_gpu = "market": why the market forbids a listing now (its median below the
    # power cost, or no ask yet; broker/pricing/). A listed, unrented offer is withdrawn.
    market_blocked: str | None = None
    # The ledger can journal a listing's intent (a shared database may be away). False:
    # no listing is started (invariant 4), so the services are not drained for nothing.
    can_journal: bool = True


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drain:
    """Unload the local services' models and verify the GPUs are free."""


@dataclass(frozen=True)
class ResumeServices:
    """Give the GPUs back to the local services (restart what a drain stopped)."""


@dataclass(frozen=True)
class List:
    """Put up (or renew) the offer, ending at `end`."""

    end: datetime
    renewal: bool = False


@dataclass(frozen=True)
class Unlist:
    """Withdraw the offer. Running contracts go on; no new renter can come."""


@dataclass(frozen=True)
class DisplaceInterruptible:
    """Push interruptible renters off the way the platform allows (see FACTS.md): a
    self-rental that holds the machine until `until`, when their contracts end."""

    until: datetime


@dataclass(frozen=True)
class EndDisplacement:
    """End the self-rental. Only once the displaced contracts are over: they would resume
    on GPUs the team is using."""


@dataclass(frozen=True)
class CheckProvider:
    """Read the marketplace now (urgently): GPU activity nobody explains is only taken for
    local use once a provider read newer than the activity still shows no renter."""


Action = (
    Drain | ResumeServices | List | Unlist | DisplaceInterruptible | EndDisplacement | CheckProvider
)


@dataclass(frozen=True)
class GateMode:
    """What the gates should do now; applied every step, so it is a setting, not an action.
    The one gate-mode type: the machine decides it, `GateControl` applies it.

    `guarded` False: pass everything through (held requests are released). True: an inference
    request triggers a reclaim and waits; with `rented_until` set the GPUs are known to be
    taken until then at the latest, so a request that cannot wait that long is refused at
    once. `renters`: the provider shows renters on the GPUs (a refusal may say so).
    """

    OPEN: ClassVar[GateMode]

    guarded: bool
    rented_until: datetime | None = None
    renters: bool = False

    @property
    def value(self) -> str:
        """Either "guarded" or "open", as the status API shows it."""
        return "guarded" if self.guarded else "open"


OPEN = GateMode(guarded=False)
GateMode.OPEN = OPEN  # `mode is GateMode.OPEN` reads as it did when it was an enum


@dataclass(frozen=True)
class Decision:
    state: PoolState
    actions: tuple[Action, ...]
    gates: GateMode
    reason: str
    changed: bool


# -- the machine --------------------------------------------------------------------------

# A renewal is due when the offer has less than this share of max_commitment left, so a
# renewal failing once or twice still leaves time before the offer lapses.
RENEW_AT_FRACTION = 0.5


@dataclass
class PoolMachine:
    policy: PolicySection
    state: PoolState = PoolState.LOCAL
    since: float = 0.0  # monotonic time the state began
    local_hold_until: float | None = None
    listings: deque[float] = field(default_factory=deque)  # monotonic times of new listings
    offer_end: datetime | None = None  # the end date of the offer we put up
    displaced: bool = False  # interruptible renters already asked to go in this reclaim
    # Our self-rental keeps displaced renters off until their contracts end at this time.
    displaced_until: datetime | None = None
    # An offer or a rental may exist. True until a provider view says otherwise, so a broker
    # that starts while the provider cannot be read withdraws a listing it cannot see.
    exposed: bool = True
    services_stopped: bool = False  # a drain was started and the services not resumed since
    # A request was refused with 503 since the GPUs were last local: it is demand until
    # they are back (no renewal, no new renter).
    refused_pending: bool = False
    refusal_seen: datetime | None = None  # the latest `refused_until` taken in
    gates: GateMode = OPEN
    tz: tzinfo = UTC  # times in reasons are shown in this zone

    @property
    def reclaim_displaces(self) -> bool:
        # Read from the policy each time, so a reloaded policy applies at once.
        return self.policy.reclaim == "displace-interruptible"

    def step(self, obs: Observation) -> Decision:
        before = self.state
        actions, reason = self._decide(obs)
        if self.displaced_until is not None and obs.now >= self.displaced_until:
            actions.append(EndDisplacement())  # the displaced contracts are over
            self.displaced_until = None
        if any(isinstance(a, Drain) for a in actions):
            self.services_stopped = True
        elif (
            self.services_stopped
            and not self.gates.guarded
            and self.state is not PoolState.DRAINING
        ):
            # Whatever path led back to local use, the services get their GPUs back.
            actions.append(ResumeServices())
            self.services_stopped = False  # pragma: no mutate (None is as false)
        if self.state is not before:
            self.since = obs.monotonic
        return Decision(self.state, tuple(actions), self.gates, reason, self.state is not before)

    # -- helpers --------------------------------------------------------------------------

    def _go(self, state: PoolState, gates: GateMode = OPEN) -> None:
        self.state = state
        self.gates = gates

    def _clock_time(self, t: datetime, now: datetime) -> str:
        local = t.astimezone(self.tz)
        if t - now < timedelta(hours=20):
            return local.strftime("%H:%M")
        return local.strftime("%a %d %b %H:%M")

    def _window_words(self, end: datetime, now: datetime) -> str:
        # A window merged past the calendar's 31-day horizon is one that never closes:
        # its computed end is only where the look-ahead stopped.
        if end - now > timedelta(days=30):
            return "window always open"
        return f"window open until {self._clock_time(end, now)}"

    def _cycles_today(self, now: float) -> int:
        while self.listings and now - self.listings[0] >= 86400:
            self.listings.popleft()
        return len(self.listings)

    def _offer_end_for(self, obs: Observation) -> datetime | None:
        if obs.window_end is None:
            return None
        end = min(obs.window_end, obs.now + self.policy.max_commitment)
        if obs.quiet_until is not None and self.policy.demand_risk is not None:
            end = min(end, obs.quiet_until)
        return end

    def _blocker(self, obs: Observation) -> str | None:
        """Why the pool may not start towards a listing now; None when it may."""
        if obs.window_end is None:
            return "outside every window"
        if obs.reclaim_requested:
            return "reclaim requested"
        if obs.local_demand:
            return "local requests"
        if obs.gpus_idle is not True:
            return "GPUs busy"
        if obs.market_blocked:
            return obs.market_blocked
        if not obs.can_journal:
            return "the ledger cannot journal a listing (its database is unreachable)"
        if self.local_hold_until is not None and obs.monotonic < self.local_hold_until:
            left = timedelta(seconds=self.local_hold_until - obs.monotonic)
            return f"local hold after a reclaim ({describe_duration(left)} left)"
        if obs.refused_until is not None and obs.now < obs.refused_until:
            until = self._clock_time(obs.refused_until, obs.now)
            return f"a refused request was promised the GPUs by {until}"
        if self.displaced_until is not None:
            until = self._clock_time(self.displaced_until, obs.now)
            return f"our self-rental keeps displaced renters off until {until}"
        if self._cycles_today(obs.monotonic) >= self.policy.max_cycles_per_day:
            return f"{self.policy.max_cycles_per_day} listings in the last 24h"
        end = self._offer_end_for(obs)
        if end is None or end - obs.now < self.policy.min_listed:
            shown = format_duration(self.policy.min_listed)
            if end is not None and obs.window_end is not None and end < obs.window_end and (
                end < obs.now + self.policy.max_commitment
            ):
                return f"local use likely within min_listed ({shown}), by the weekly rhythm"
            return f"window closes in under min_listed ({shown})"
        return None

    def _back_to_local(self, obs: Observation) -> list[Action]:
        """Local services own the GPUs again (`step` adds the ResumeServices)."""
        self._go(PoolState.PAUSED if obs.paused else PoolState.LOCAL)
        self.offer_end = None  # pragma: no mutate (any falsy value: set again before use)
        self.refused_pending = False  # pragma: no mutate (_decide_unlisted clears it too)
        self.displaced = False  # pragma: no mutate (None is as false; self-rental stays)
        return []

    def _reclaimed(self, obs: Observation) -> list[Action]:
        """Back to local after renters held the GPUs: local use at least `local_hold`."""
        self.local_hold_until = obs.monotonic + self.policy.local_hold.total_seconds()
        return self._back_to_local(obs)

    def _reclaim(self, obs: Observation, view: ProviderView, why: str) -> tuple[list[Action], str]:
        actions: list[Action] = []
        if view.listed:
            actions.append(Unlist())
        if (
            self.reclaim_displaces
            and obs.can_displace
            and not self.displaced
            and view.only_interruptible
            and view.rentals_running
        ):
            self.displaced = True
            until = view.locked_until or obs.now + self.policy.max_commitment
            self.displaced_until = max(self.displaced_until or until, until)
            actions.append(DisplaceInterruptible(until))
        # Renters being displaced leave in moments: hold requests up to max_hold rather
        # than refusing them for a contract that no longer keeps the GPUs.
        rented_until = None if self.displaced else view.locked_until
        self._go(PoolState.RECLAIMING, GateMode(True, rented_until, view.rentals_running > 0))
        return actions, f"reclaiming: {why}"

    # -- the transitions ------------------------------------------------------------------

    def _decide(self, obs: Observation) -> tuple[list[Action], str]:
        state = self.state
        view = obs.provider
        if view is not None:
            self.exposed = view.listed or view.rentals_running > 0
        if obs.refused_until is not None and (
            self.refusal_seen is None or obs.refused_until > self.refusal_seen
        ):
            self.refusal_seen = obs.refused_until
            self.refused_pending = True

        if not obs.can_list:
            return self._decide_observed(obs, view)

        if state is PoolState.DRAINING:
            return self._decide_draining(obs)

        if view is None:
            if self.exposed:
                # Never leave up a listing we cannot see: withdraw it, retrying every step.
                # The gates stay guarded: renters may still hold the GPUs.
                self._go(PoolState.DEGRADED, replace(self.gates, guarded=True))
                return [Unlist()], "degraded: the provider cannot be read"
            if obs.paused:
                self._go(PoolState.PAUSED)
                return [], "paused"
            self._go(PoolState.DEGRADED)
            return [], "degraded: the provider cannot be read"

        if state in (PoolState.LOCAL, PoolState.IDLE, PoolState.PAUSED, PoolState.DEGRADED):
            return self._decide_unlisted(obs, view)

        # LISTED, RENTED, RECLAIMING: an offer may be up or renters may hold the GPUs.

        if view.rentals_running == 0 and state is PoolState.RECLAIMING and not view.listed:
            return self._reclaimed(obs), "reclaimed: no renter left"

        want_local = self._local_reason(obs, view)
        if want_local:
            if view.rentals_running == 0 and not view.listed:
                return self._reclaimed(obs), f"unlisted: {want_local}"
            return self._reclaim(obs, view, want_local)

        if state is PoolState.RECLAIMING:
            # Demand went away before the renters did; keep the offer down (no flapping).
            rented_until = None if self.displaced else view.locked_until
            self.gates = GateMode(True, rented_until, view.rentals_running > 0)
            actions: list[Action] = [Unlist()] if view.listed else []
            return actions, "reclaiming: waiting for contracts to end"

        if view.rentals_running > 0:
            # Interruptible renters we may displace do not keep the GPUs until their end.
            displaceable = self.reclaim_displaces and obs.can_displace and view.only_interruptible
            rented_until = None if displaceable else view.locked_until
            self._go(PoolState.RENTED, GateMode(True, rented_until, renters=True))
            until = self._clock_time(view.locked_until, obs.now) if view.locked_until else "unknown"
            reason = f"rented: {view.rentals_running} rental(s), locked until {until}"
            return self._renewal(obs, view), reason

        if not view.listed:
            # The offer lapsed or was withdrawn from the dashboard; nobody rents.
            return self._back_to_local(obs), "offer no longer listed"

        self._go(PoolState.LISTED, GateMode(True))
        if self._unexplained(obs) and not obs.view_after_activity:
            # A renter's container may load the GPUs before the provider shows its rental:
            # read the marketplace first, decide on that read (no renewal meanwhile).
            return [CheckProvider()], "listed: GPU activity nobody explains yet, checking"
        return self._renewal(obs, view), "listed"

    @staticmethod
    def _unexplained(obs: Observation) -> bool:
        return obs.gpus_idle is False and not obs.busy_is_renters

    def _local_reason(self, obs: Observation, view: ProviderView) -> str | None:
        if obs.paused:
            return "paused"
        if obs.reclaim_requested:
            return "reclaim requested"
        if obs.local_demand:
            return "local request"
        if self.refused_pending:
            return "a refused request waits for the GPUs"
        if obs.window_end is None:
            return "window closed"
        if self.state is PoolState.LISTED:
            # Nobody rents, yet something uses (or may use) the GPUs: once a provider read
            # newer than the activity shows no renter either, it is local.
            if obs.gpus_idle is None:
                return "GPU telemetry unavailable"
            if self._unexplained(obs) and obs.view_after_activity:
                return "local GPU use"
            if view.rentals_running == 0:
                # price_gpu = "market": an unrented offer under the power cost comes down;
                # a renter's contract runs on. None: the market allows the listing.
                return obs.market_blocked
        return None

    def _renewal(self, obs: Observation, view: ProviderView) -> list[Action]:
        end = self._offer_end_for(obs)
        current = view.offer_end or self.offer_end
        if end is None or current is None:
            return []
        if obs.now < self.renewal_due(current) or end <= current:
            return []
        if obs.quiet_until is not None and end == obs.quiet_until and (
            end - obs.now < self.policy.min_listed
        ):
            return []  # local use is likely soon (weekly rhythm): let the offer run out
        self.offer_end = end
        return [List(end, renewal=True)]

    def renewal_due(self, offer_end: datetime) -> datetime:
        """When an offer ending at `offer_end` is renewed (while unwanted and inside the
        window). With `renew_every` the offer shows renters about max_commitment all the
        time; without it, the end moves once half of max_commitment is left."""
        step = self.policy.renew_every
        if step is None:
            return offer_end - self.policy.max_commitment * RENEW_AT_FRACTION
        return offer_end - max(self.policy.max_commitment - step, timedelta(0))

    def _decide_observed(
        self, obs: Observation, view: ProviderView | None
    ) -> tuple[list[Action], str]:
        """A provider that cannot list (RunPod: listed by hand in its dashboard) is only
        watched: no drain, no list or unlist, and the gates hold or refuse local requests
        only while the provider shows renters on the GPUs."""
        if view is None:
            # Renters seen last may still be there; nobody else can come through us.
            gates = self.gates if self.gates.renters else OPEN
            self._go(PoolState.PAUSED if obs.paused else PoolState.DEGRADED, gates)
            return [], "degraded: the provider cannot be read (observed only)"
        if view.rentals_running:
            until = self._clock_time(view.locked_until, obs.now) if view.locked_until else "unknown"
            self._go(PoolState.RENTED, GateMode(True, view.locked_until, renters=True))
            return [], f"rented (observed): {view.rentals_running} rental(s) until {until}"
        was_rented = self.state in (PoolState.RENTED, PoolState.RECLAIMING)
        self.refused_pending = False  # pragma: no mutate (None is as false)
        self.offer_end = None  # pragma: no mutate (never read while only observing)
        if obs.paused:
            self._go(PoolState.PAUSED)
            return [], "paused"
        if was_rented:
            self._go(PoolState.LOCAL)
            return [], "no renter left (observed)"
        quiet = obs.gpus_idle is True and not obs.local_demand and obs.window_end is not None
        if quiet:
            self._go(PoolState.IDLE)
            return [], "idle (observed only: listing is done in the provider's dashboard)"
        self._go(PoolState.LOCAL)
        return [], "local (observed only)"

    def _decide_unlisted(self, obs: Observation, view: ProviderView) -> tuple[list[Action], str]:
        if not view.listed and not view.rentals_running:
            # the GPUs are local: the refused user gets them
            self.refused_pending = False  # pragma: no mutate (None is as false)
        if view.listed or view.rentals_running:
            # Found an offer or renters we did not put there, or left from before a crash.
            if view.rentals_running:
                return self._reclaim(obs, view, "found running rentals (respected)")
            self._go(PoolState.RECLAIMING, GateMode(True))
            return [Unlist()], "reclaiming: found a listing that should not exist"
        if obs.paused:
            self._go(PoolState.PAUSED)
            return [], "paused"
        if obs.gpus_idle is None:
            self._go(PoolState.DEGRADED)
            return [], "degraded: GPU telemetry unavailable"
        if self.state in (PoolState.PAUSED, PoolState.DEGRADED):
            reason = "recovered" if self.state is PoolState.DEGRADED else "resumed"
            self._go(PoolState.LOCAL)
            return [], reason
        blocker = self._blocker(obs)
        if blocker:
            self._go(PoolState.LOCAL)
            return [], f"local: {blocker}"
        if self.state is PoolState.LOCAL:
            self._go(PoolState.IDLE)
            return [], "idle: every GPU idle inside a window"
        idle_for = obs.monotonic - self.since
        if idle_for < self.policy.idle_window.total_seconds():
            return [], "idle"
        self._go(PoolState.DRAINING)
        return [Drain()], f"draining: idle {format_duration(self.policy.idle_window)}"

    def _decide_draining(self, obs: Observation) -> tuple[list[Action], str]:
        if (
            obs.paused
            or obs.reclaim_requested
            or obs.local_demand
            or obs.window_end is None
            or obs.provider is None
        ):
            why = (
                "paused" if obs.paused
                else "reclaim requested" if obs.reclaim_requested
                else "local request" if obs.local_demand
                else "window closed" if obs.window_end is None
                else "the provider cannot be read"
            )  # fmt: skip
            return self._back_to_local(obs), f"drain aborted: {why}"
        if obs.drain is DrainStatus.FAILED:
            return self._back_to_local(obs), "drain failed"
        if obs.drain is not DrainStatus.VERIFIED:
            if obs.monotonic - self.since >= self.policy.drain_timeout.total_seconds():
                return self._back_to_local(obs), "drain timed out"
            return [], "draining"
        if obs.gpus_idle is not True:
            return self._back_to_local(obs), "drain aborted: GPUs busy"
        blocker = self._blocker(obs)
        end = self._offer_end_for(obs)
        if blocker or end is None:
            return self._back_to_local(obs), f"not listed: {blocker}"
        self._go(PoolState.LISTED, GateMode(True))
        self.offer_end = end
        self.exposed = True
        self.listings.append(obs.monotonic)
        assert obs.window_end is not None  # the blocker checked it
        reason = (
            f"listed: idle {format_duration(self.policy.idle_window)}, "
            f"{self._window_words(obs.window_end, obs.now)}, offer ends "
            f"{self._clock_time(end, obs.now)}"
        )
        return [List(end)], reason
