"""A seeded random walk over the pure pool machine and the GPU attribution layer together,
against a small marketplace whose reads lag, stall and fail, renters whose load starts before
their rental shows and lingers after it ends, team use through the gate and beside it, and
refusals. SPEC invariants 1-3 (and issue 11's rules on renters, refusals and observe-only
providers) are checked after every step; 300 walks of 40-80 steps (over 10,000 steps) run in
a few seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from broker.config import PolicySection
from broker.scheduling.attribution import Attribution
from broker.scheduling.pool import (
    CheckProvider,
    DisplaceInterruptible,
    Drain,
    DrainStatus,
    List,
    Observation,
    PoolMachine,
    PoolState,
    ProviderView,
    ResumeServices,
    Unlist,
)

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
GPUS = (0, 1)
MAX_HOLD = timedelta(seconds=30)


@dataclass
class Rental:
    end: datetime
    interruptible: bool
    gpus: frozenset[int]
    linger: int  # steps its load stays on the GPUs after it ends
    seen: bool = False  # a provider read the broker took showed it


@dataclass
class World:
    """What is true: the marketplace, the renters' load, the team's use."""

    listed: bool = False
    offer_end: datetime | None = None
    rentals: list[Rental] = field(default_factory=list)
    lingering: dict[int, int] = field(default_factory=dict)  # GPU -> steps of leftover load
    # GPUs whose leftover load is from a rental the broker saw: it must know it is a renter's
    seen_lingering: set[int] = field(default_factory=set)

    def tick(self, now: datetime) -> None:
        for rental in [r for r in self.rentals if r.end <= now]:
            self.end(rental)
        if self.offer_end is not None and now >= self.offer_end:
            self.listed = False
        self.lingering = {g: n - 1 for g, n in self.lingering.items() if n > 1}
        self.seen_lingering &= set(self.lingering)

    def end(self, rental: Rental) -> None:
        self.rentals.remove(rental)
        for gpu in rental.gpus:
            if rental.linger:
                self.lingering[gpu] = max(self.lingering.get(gpu, 0), rental.linger)
                if rental.seen:
                    self.seen_lingering.add(gpu)

    def view(self) -> ProviderView:
        return ProviderView(
            listed=self.listed,
            rentals_running=len(self.rentals),
            locked_until=max((r.end for r in self.rentals), default=None),
            offer_end=self.offer_end if self.listed else None,
            only_interruptible=bool(self.rentals) and all(r.interruptible for r in self.rentals),
        )

    def renter_gpus(self) -> set[int]:
        return {g for r in self.rentals for g in r.gpus}

    def renter_load(self) -> set[int]:
        return self.renter_gpus() | set(self.lingering)

    def known_renter_load(self) -> set[int]:
        """The renters' load the broker can know of: rentals a read showed (until their
        load ends), and rentals still running (a fresh read shows them)."""
        return self.renter_gpus() | self.seen_lingering


@dataclass
class Reads:
    """The marketplace watcher: reads numbered at start, a view from the newest delivered
    read begun after the last action (older ones are dropped, as `Poller.floor` does)."""

    started: int = 0
    view: ProviderView | None = None
    view_read: int = 0
    ok: bool = True
    floor: int = 0
    in_flight: list[tuple[int, ProviderView | None, int, list[Rental]]] = field(
        default_factory=list
    )

    def start(self, world: World, delay: int, fails: bool) -> None:
        self.started += 1
        view = None if fails else world.view()
        self.in_flight.append((self.started, view, delay, list(world.rentals)))

    def deliver(self) -> None:
        still: list[tuple[int, ProviderView | None, int, list[Rental]]] = []
        for read, view, delay, rentals in self.in_flight:
            if delay > 0:
                still.append((read, view, delay - 1, rentals))
            elif read >= self.floor and read >= self.view_read:
                self.view_read = read
                self.view, self.ok = view, view is not None
                if view is not None:
                    for rental in rentals:
                        rental.seen = True
        self.in_flight = still

    def action(self, world: World) -> None:
        """An action's own read-back: begun after it, delivered at once."""
        self.started += 1
        self.floor = self.started
        self.view_read = self.started
        self.view, self.ok = world.view(), True
        for rental in world.rentals:
            rental.seen = True


def walk(seed: int) -> int:
    rng = random.Random(seed)
    policy = PolicySection(
        idle_window="10m",
        local_hold="5m",
        min_listed="30m",
        max_commitment="2h",
        reclaim=rng.choice(["graceful", "displace-interruptible"]),
    )
    can_list = rng.random() > 0.2
    can_displace = rng.random() > 0.3
    period = timedelta(hours=rng.choice([3, 6, 24]))
    duration = timedelta(minutes=rng.randint(40, 600))
    duration = min(duration, period)

    def window_end(now: datetime) -> datetime | None:
        start = T0 + ((now - T0) // period) * period
        end = start + duration
        return end if now < end else None

    machine = PoolMachine(policy)
    attribution = Attribution()
    world = World()
    reads = Reads()
    now, mono = T0, 0.0
    services_loaded = True
    pending_drain = False
    refused_until: datetime | None = None
    promised: datetime | None = None  # the latest retry time a refusal gave
    check_asked = False
    steps = rng.randint(40, 80)
    for _ in range(steps):
        minutes = rng.choice([0.25, 0.5, 1, 2, 5, 10, 30])
        now += timedelta(minutes=minutes)
        mono += minutes * 60
        world.tick(now)
        # A renter may take the live offer (its load starts at once; the view lags).
        if world.listed and rng.random() < 0.15 and world.offer_end is not None:
            gpus = frozenset(rng.sample(GPUS, rng.randint(1, 2)))
            world.rentals.append(
                Rental(world.offer_end, rng.random() < 0.4, gpus, rng.randint(0, 3))
            )
        if world.rentals and rng.random() < 0.1:
            world.end(rng.choice(world.rentals))  # a renter leaves before its end
        # The marketplace watcher: a read may start (slow ones arrive later, some fail).
        if check_asked or rng.random() < 0.5:
            slow = 0 if check_asked else rng.choice([0, 0, 0, 1, 3])
            reads.start(world, slow, fails=rng.random() < 0.1)
            check_asked = False
        reads.deliver()
        # The team: a request at the gate, or GPU use beside it (a notebook).
        demand = rng.random() < 0.15
        local_gpu = {g for g in GPUS if rng.random() < 0.05}
        telemetry_ok = rng.random() > 0.03
        busy_gpus = (
            world.renter_load()
            | local_gpu
            | (set(GPUS) if demand and not machine.gates.guarded else set())
        )
        busy = {g: g in busy_gpus for g in GPUS} if telemetry_ok else None
        renter_now = set(GPUS) if reads.view and reads.view.rentals_running else set()
        activity = attribution.update(
            busy, renter_now, reads_started=reads.started, view_read=reads.view_read if
            reads.ok else 0,
        )  # fmt: skip
        paused = rng.random() < 0.03
        end = window_end(now)
        obs = Observation(
            now=now,
            monotonic=mono,
            window_end=end,
            gpus_idle=None if busy is None else not any(busy.values()),
            local_demand=demand,
            provider=reads.view if reads.ok else None,
            drain=rng.choice([DrainStatus.VERIFIED] * 3 + [DrainStatus.FAILED])
            if pending_drain
            else DrainStatus.NONE,
            paused=paused,
            busy_is_renters=activity.busy_is_renters,
            view_after_activity=activity.view_after_activity,
            refused_until=refused_until,
            can_list=can_list,
            can_displace=can_displace,
        )
        if pending_drain and obs.drain is not DrainStatus.NONE:
            pending_drain = False
            if obs.drain is DrainStatus.VERIFIED:
                services_loaded = False
        before = machine.state
        decision = machine.step(obs)

        acted = False
        for action in decision.actions:
            if not can_list:
                assert not isinstance(action, Drain | List | Unlist | DisplaceInterruptible), (
                    "an observe-only provider is never drained for, listed or unlisted"
                )
            if isinstance(action, List):
                # Invariant 1: inside a window, never beyond its end nor max_commitment.
                assert end is not None and action.end <= end
                assert action.end <= now + policy.max_commitment
                if not action.renewal:
                    # Invariant 2: after a verified drain, idle GPUs, no demand, no refusal.
                    assert obs.drain is DrainStatus.VERIFIED and obs.gpus_idle is True
                    assert not demand and not services_loaded
                    early = promised is not None and now < promised
                    assert not early, "listed before a refused user's retry"
                assert not machine.refused_pending
                world.listed, world.offer_end = True, action.end
                for rental in world.rentals:
                    rental.end = max(rental.end, action.end)
                acted = True
            elif isinstance(action, Unlist):
                # A renter's own load is never the reason to withdraw the offer.
                if "local GPU use" in decision.reason:
                    assert busy_gpus - world.known_renter_load(), decision.reason
                world.listed = False
                acted = True
            elif isinstance(action, DisplaceInterruptible):
                assert can_displace
                world.rentals = [r for r in world.rentals if not r.interruptible]
                acted = True
            elif isinstance(action, Drain):
                pending_drain = True
            elif isinstance(action, ResumeServices):
                services_loaded = True
                pending_drain = False
                assert not world.rentals or not can_list
            elif isinstance(action, CheckProvider):
                check_asked = True
        if acted:
            reads.action(world)
        if "local GPU use" in decision.reason and before is PoolState.LISTED:
            assert busy_gpus - world.known_renter_load(), "a renter's load taken for local use"

        # Refusals: a guarded gate refuses a request a contract keeps from the GPUs.
        gates = decision.gates
        until = gates.rented_until
        if demand and gates.guarded and until is not None and until - now > MAX_HOLD:
            refused_until = max(refused_until or until, until)
            promised = refused_until
        if not gates.guarded and demand:
            services_loaded = True

        # Invariant 2 on the world: never rentable while local services hold the GPUs.
        if world.listed and world.offer_end and world.offer_end > now and can_list:
            assert not services_loaded
        # Invariant 3: demand while the offer is seen up withdraws it in the same step.
        if demand and can_list and obs.provider is not None and obs.provider.listed:
            assert not world.listed
        # Held requests pass once nobody can rent the GPUs (as the machine can see).
        view = obs.provider
        free = view is not None and not view.listed and not view.rentals_running
        if free and not acted and not paused and can_list:
            assert not gates.guarded or decision.state is PoolState.RECLAIMING
        if not can_list and view is not None:
            # Observe-only: the gates hold requests only while renters are shown.
            assert gates.guarded == (view.rentals_running > 0)
    return steps


def test_invariants_hold_through_a_random_walk_of_ten_thousand_steps() -> None:
    total = sum(walk(seed) for seed in range(220))
    assert total >= 10_000
