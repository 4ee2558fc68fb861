"""The pool machine's time rules, explored: random instants, a zone with DST, bad reads.

The other pool tests start at one fixed epoch, so a mutant that shifts a time comparison
by a step can hide behind a convenient number. Here every story starts at a random instant
(wall clock and monotonic clock independently), with random policy durations, and each
rule is checked on both sides of its boundary. The walk runs windows written in a zone
with daylight saving time across its changes, with provider reads that are slow (stale),
or fail, and checks the invariants and the clock times the journal shows after each step.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import PolicySection
from broker.scheduling.pool import (
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
from broker.scheduling.windows import Calendar, Recurrence

SECOND = timedelta(seconds=1)
FREE = ProviderView(listed=False, rentals_running=0)
UP = ProviderView(listed=True, rentals_running=0)
ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]

instants = st.datetimes(
    min_value=datetime(2001, 1, 1), max_value=datetime(2090, 12, 31), timezones=st.just(UTC)
)
# whole seconds: a float clock adds them exactly, so a boundary lands on its second
monotonic_bases = st.integers(min_value=0, max_value=10**9).map(float)
minutes = st.integers(min_value=1, max_value=180)


class Clocked:
    """A machine observed at offsets from a random start, wall and monotonic clocks alike."""

    def __init__(self, policy: PolicySection, start: datetime, mono: float, zone: str) -> None:
        self.machine = PoolMachine(policy, tz=ZoneInfo(zone))
        self.start, self.mono = start, mono
        self.obs = Observation(
            now=start,
            monotonic=mono,
            window_end=start + timedelta(days=2),
            gpus_idle=True,
            local_demand=False,
            provider=FREE,
        )

    def at(self, offset: timedelta, **changes: object):  # type: ignore[no-untyped-def]
        self.obs = replace(
            self.obs,
            now=self.start + offset,
            monotonic=self.mono + offset.total_seconds(),
            **changes,
        )  # type: ignore[arg-type]
        decision = self.machine.step(self.obs)
        self.obs = replace(self.obs, drain=DrainStatus.NONE)
        return decision


def _policy(idle: int, drain: int, hold: int, listed: int) -> PolicySection:
    return PolicySection(
        idle_window=timedelta(minutes=idle),
        drain_timeout=timedelta(minutes=drain),
        local_hold=timedelta(minutes=hold),
        min_listed=timedelta(minutes=listed),
        max_commitment=timedelta(hours=4),
    )


@settings(max_examples=60, deadline=None)
@given(
    start=instants,
    mono=monotonic_bases,
    zone=st.sampled_from(ZONES),
    idle=minutes,
    drain=st.integers(1, 30),
    hold=minutes,
    listed=minutes,
)
def test_idle_window_drain_timeout_and_local_hold_at_random_instants(
    start: datetime, mono: float, zone: str, idle: int, drain: int, hold: int, listed: int
) -> None:
    pool = Clocked(_policy(idle, drain, hold, listed), start, mono, zone)
    t = timedelta(0)
    assert pool.at(t).state is PoolState.IDLE
    idle_d = timedelta(minutes=idle)
    assert pool.at(t + idle_d - SECOND).state is PoolState.IDLE
    t += idle_d
    assert pool.at(t).actions == (Drain(),)
    drain_d = timedelta(minutes=drain)
    assert pool.at(t + drain_d - SECOND, drain=DrainStatus.RUNNING).reason == "draining"
    timed_out = pool.at(t + drain_d, drain=DrainStatus.RUNNING)
    assert timed_out.reason == "drain timed out" and timed_out.actions == (ResumeServices(),)
    # again, to a listing this time, then reclaimed: the hold runs from the reclaim
    t += drain_d
    assert pool.at(t).state is PoolState.IDLE  # no hold after a drain that timed out
    t += idle_d
    assert pool.at(t).actions == (Drain(),)
    listing = pool.at(t + SECOND, drain=DrainStatus.VERIFIED)
    assert listing.state is PoolState.LISTED
    t += 2 * SECOND
    pool.at(t, provider=UP)
    assert pool.at(t + SECOND, local_demand=True).actions == (Unlist(),)
    t += 2 * SECOND
    back = pool.at(t, provider=FREE, local_demand=False)
    assert back.state is PoolState.LOCAL and back.reason == "reclaimed: no renter left"
    hold_d = timedelta(minutes=hold)
    assert "local hold" in pool.at(t + hold_d - SECOND).reason
    assert pool.at(t + hold_d).state is PoolState.IDLE


@settings(max_examples=60, deadline=None)
@given(
    start=instants,
    mono=monotonic_bases,
    zone=st.sampled_from(ZONES),
    listed=minutes,
    extra=st.integers(-1, 1),
)
def test_min_listed_and_the_offer_end_at_random_instants(
    start: datetime, mono: float, zone: str, listed: int, extra: int
) -> None:
    policy = _policy(10, 5, 10, listed)
    pool = Clocked(policy, start, mono, zone)
    verified_at = timedelta(minutes=11)
    left = policy.min_listed + extra * SECOND
    window_end = start + verified_at + left
    pool.obs = replace(pool.obs, window_end=window_end)
    pool.at(timedelta(0))
    pool.at(timedelta(minutes=10))
    decision = pool.at(verified_at, drain=DrainStatus.VERIFIED)
    if extra < 0:
        assert decision.state is PoolState.LOCAL and "min_listed" in decision.reason
        return
    end = min(window_end, start + verified_at + policy.max_commitment)
    assert decision.actions == (List(end),)
    # the journal shows the window's and the offer's end in the pool's zone
    now = start + verified_at
    assert decision.reason.endswith(
        f"window open until {_clock(window_end, now, zone)}, offer ends {_clock(end, now, zone)}"
    )


def _clock(t: datetime, now: datetime, zone: str) -> str:
    local = t.astimezone(ZoneInfo(zone))
    return local.strftime("%H:%M" if t - now < timedelta(hours=20) else "%a %d %b %H:%M")


@settings(max_examples=40, deadline=None)
@given(
    start=instants,
    mono=monotonic_bases,
    zone=st.sampled_from(ZONES),
    hours=st.integers(1, 40),
    extra=st.integers(-1, 1),
)
def test_a_refusal_keeps_the_pool_local_until_its_time_shown_in_the_zone(
    start: datetime, mono: float, zone: str, hours: int, extra: int
) -> None:
    pool = Clocked(_policy(10, 5, 10, 30), start, mono, zone)
    promised = start + timedelta(hours=hours) + extra * timedelta(minutes=1)
    first = pool.at(timedelta(0), refused_until=promised)
    assert (
        first.reason
        == f"local: a refused request was promised the GPUs by {_clock(promised, start, zone)}"
    )
    assert pool.at(promised - start - SECOND).state is PoolState.LOCAL
    assert pool.at(promised - start).state is PoolState.IDLE


@settings(max_examples=30, deadline=None)
@given(start=instants, mono=monotonic_bases, cycles=st.integers(1, 4))
def test_the_cycle_limit_is_a_rolling_24_hours_at_random_instants(
    start: datetime, mono: float, cycles: int
) -> None:
    policy = PolicySection(
        max_cycles_per_day=cycles,
        idle_window=timedelta(minutes=1),
        local_hold=timedelta(0),
        min_listed=timedelta(0),
    )
    pool = Clocked(policy, start, mono, "UTC")
    pool.obs = replace(pool.obs, window_end=start + timedelta(days=3))
    t, first = timedelta(0), None
    for _ in range(cycles):
        pool.at(t)
        pool.at(t + timedelta(minutes=1))
        listed = pool.at(t + timedelta(minutes=2), drain=DrainStatus.VERIFIED)
        assert listed.state is PoolState.LISTED
        first = first or t + timedelta(minutes=2)
        assert pool.at(t + timedelta(minutes=3), provider=FREE).state is PoolState.LOCAL
        t += timedelta(minutes=4)
    assert first is not None
    blocked = pool.at(first + timedelta(days=1) - SECOND)
    assert blocked.reason == f"local: {cycles} listings in the last 24h"
    assert pool.at(first + timedelta(days=1)).state is PoolState.IDLE


# -- a walk across daylight-saving changes, with stale and failing provider reads -------------


def _dst_walk(seed: int) -> int:
    rng = random.Random(seed)
    zone = ZoneInfo(rng.choice(["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]))
    # a few days around a DST change of that zone (spring or autumn, either hemisphere)
    change = rng.choice(
        [
            datetime(2026, 3, 29),
            datetime(2026, 10, 25),
            datetime(2026, 3, 8),
            datetime(2026, 11, 1),
            datetime(2026, 4, 5),
            datetime(2026, 10, 4),
        ]
    )
    start = change.replace(tzinfo=UTC) - timedelta(days=1, minutes=rng.randint(0, 600))
    calendar = Calendar(
        [
            Recurrence(
                rng.choice(["0 22 * * *", "30 1 * * *", "0 */6 * * *"]),
                timedelta(minutes=rng.randint(45, 300)),
                zone,
            )
        ]
    )
    policy = PolicySection(
        idle_window=timedelta(minutes=rng.choice([5, 10, 15])),
        min_listed=timedelta(minutes=30),
        local_hold=timedelta(minutes=10),
        max_commitment=timedelta(hours=2),
    )
    machine = PoolMachine(policy, tz=zone)
    now, mono = start, rng.uniform(0, 1e7)
    listed_until: datetime | None = None  # the offer as the marketplace holds it
    renters_until: datetime | None = None
    views: list[ProviderView] = []
    pending_drain = False
    steps = rng.randint(150, 300)
    for _ in range(steps):
        step = timedelta(minutes=rng.choice([1, 2, 5, 10, 20, 60]))
        now += step
        mono += step.total_seconds()
        if listed_until is not None and now >= listed_until:
            listed_until = None
        if renters_until is not None and now >= renters_until:
            renters_until = None
        if listed_until is not None and renters_until is None and rng.random() < 0.1:
            renters_until = listed_until
        truth = ProviderView(
            listed=listed_until is not None,
            rentals_running=1 if renters_until else 0,
            locked_until=renters_until,
            offer_end=listed_until,
        )
        views.append(truth)
        read = rng.random()
        # a failing read (None), a slow one (a view from a few steps back), or a fresh one
        if read < 0.1:
            view: ProviderView | None = None
        elif read < 0.3:
            view = views[max(0, len(views) - 1 - rng.randint(1, 3))]
        else:
            view = truth
        window_end = calendar.end_of(now)
        obs = Observation(
            now=now,
            monotonic=mono,
            window_end=window_end,
            gpus_idle=rng.random() > 0.05,
            local_demand=rng.random() < 0.05,
            provider=view,
            drain=DrainStatus.VERIFIED if pending_drain else DrainStatus.NONE,
        )
        pending_drain = False
        decision = machine.step(obs)
        for action in decision.actions:
            if isinstance(action, List):
                # Invariant 1 at every instant, in every zone: inside the window, no
                # offer end beyond it nor beyond max_commitment.
                assert window_end is not None and calendar.is_open(now)
                assert action.end <= window_end and action.end <= now + policy.max_commitment
                if not action.renewal:
                    assert action.end - now >= policy.min_listed
                    assert view is not None and not view.listed and not view.rentals_running
                    assert decision.reason.endswith(
                        f"window open until {_clock(window_end, now, zone.key)}, "
                        f"offer ends {_clock(action.end, now, zone.key)}"
                    )
                listed_until = action.end
            elif isinstance(action, Unlist):
                listed_until = None
            elif isinstance(action, Drain):
                pending_drain = True
        if view is None and machine.exposed:
            # an offer we cannot see is withdrawn at every step, with the gates guarded
            assert Unlist() in decision.actions and decision.gates.guarded
        if obs.local_demand and view is not None and view.listed:
            assert Unlist() in decision.actions
    return steps


def test_invariants_hold_across_dst_changes_with_stale_and_failing_reads() -> None:
    assert sum(_dst_walk(seed) for seed in range(40)) >= 6000
