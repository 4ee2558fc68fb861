"""The pool state machine, step by step and through random histories.

The scenario tests read as stories; the property test drives the machine against a small model
of a Vast-like marketplace (offers lapse at their end date, rentals keep the end date they were
rented with, unlisting ends no rental) and checks SPEC invariants 1-3 after every step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import PolicySection
from broker.scheduling.pool import (
    Decision,
    DisplaceInterruptible,
    Drain,
    DrainStatus,
    EndDisplacement,
    GateMode,
    List,
    Observation,
    PoolMachine,
    PoolState,
    ProviderView,
    ResumeServices,
    Unlist,
)
from broker.scheduling.windows import Calendar, Recurrence

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
WINDOW_END = T0 + timedelta(hours=9)
# idle 15m, drain 2m, min_listed 30m, 6 cycles, hold 10m, commit 2h, renewed at half: the
# defaults these stories were written for (the defaults moved with issue 13's measurements).
POLICY = PolicySection(idle_window="15m", local_hold="10m", renew_every="1h")
FREE = ProviderView(listed=False, rentals_running=0)


class Story:
    """Drives a machine with observations at explicit times, keeping the last one's values."""

    def __init__(self, policy: PolicySection = POLICY, machine: PoolMachine | None = None):
        self.machine = machine or PoolMachine(policy)
        self.obs = Observation(
            now=T0,
            monotonic=0.0,
            window_end=WINDOW_END,
            gpus_idle=True,
            local_demand=False,
            provider=FREE,
        )

    def at(self, minutes: float, **changes: object) -> Decision:
        self.obs = replace(
            self.obs,
            now=T0 + timedelta(minutes=minutes),
            monotonic=minutes * 60,
            **changes,  # type: ignore[arg-type]
        )
        return self.machine.step(self.obs)

    def listed(self, minutes: float = 17.0) -> Decision:
        """Idle at 0, draining at 15, drain verified at `minutes`."""
        self.at(0)
        self.at(15)
        decision = self.at(minutes, drain=DrainStatus.VERIFIED)
        assert decision.state is PoolState.LISTED
        self.obs = replace(self.obs, drain=DrainStatus.NONE)
        return decision


def test_idle_drain_list_with_a_bounded_end_date() -> None:
    story = Story()
    assert story.at(0).state is PoolState.IDLE
    assert story.at(14).state is PoolState.IDLE
    draining = story.at(15)
    assert (draining.state, draining.actions) == (PoolState.DRAINING, (Drain(),))
    assert not draining.gates.guarded  # a local request during drain passes through
    assert story.at(16, drain=DrainStatus.RUNNING).actions == ()
    listed = story.at(17, drain=DrainStatus.VERIFIED)
    end = T0 + timedelta(minutes=17) + timedelta(hours=2)  # max_commitment, not window end
    assert (listed.state, listed.actions) == (PoolState.LISTED, (List(end),))
    assert listed.gates.guarded
    # The log line says why, in the pool's zone (UTC here): idle for, window end, offer end.
    assert listed.reason == "listed: idle 15m, window open until 07:00, offer ends 00:17"


def test_the_offer_never_ends_after_the_window() -> None:
    story = Story()
    story.obs = replace(story.obs, window_end=T0 + timedelta(minutes=60))
    listed = story.listed()
    assert listed.actions == (List(T0 + timedelta(minutes=60)),)


def test_no_listing_shorter_than_min_listed() -> None:
    story = Story()
    story.obs = replace(story.obs, window_end=T0 + timedelta(minutes=46))
    story.at(0)
    assert story.at(15).state is PoolState.DRAINING  # 31 minutes of window left
    decision = story.at(17, drain=DrainStatus.VERIFIED)  # 29 left: not worth listing
    assert Story().at(0, window_end=T0 + timedelta(minutes=29)).state is PoolState.LOCAL
    assert decision.state is PoolState.LOCAL
    assert decision.actions == (ResumeServices(),)
    assert "min_listed" in decision.reason


def test_busy_gpus_or_demand_or_closed_window_keep_it_local() -> None:
    for changes, why in [
        ({"gpus_idle": False}, "GPUs busy"),
        ({"local_demand": True}, "local requests"),
        ({"window_end": None}, "outside every window"),
    ]:
        decision = Story().at(0, **changes)
        assert decision.state is PoolState.LOCAL, changes
        assert why in decision.reason


def test_the_idle_clock_restarts_after_any_activity() -> None:
    story = Story()
    story.at(0)
    story.at(10, local_demand=True)
    assert story.at(11, local_demand=False).state is PoolState.IDLE
    assert story.at(25).state is PoolState.IDLE  # 14 minutes since it became idle again
    assert story.at(26).state is PoolState.DRAINING


def test_demand_during_drain_aborts_it_and_passes_through() -> None:
    story = Story()
    story.at(0)
    story.at(15)
    decision = story.at(16, local_demand=True, drain=DrainStatus.RUNNING)
    assert decision.state is PoolState.LOCAL
    assert decision.actions == (ResumeServices(),)
    assert not decision.gates.guarded
    assert "local request" in decision.reason


def test_a_drain_that_cannot_verify_gives_up() -> None:
    story = Story()
    story.at(0)
    story.at(15)
    assert story.at(16, drain=DrainStatus.RUNNING).state is PoolState.DRAINING
    decision = story.at(17, drain=DrainStatus.RUNNING)  # drain_timeout is 2m
    assert (decision.state, decision.reason) == (PoolState.LOCAL, "drain timed out")
    assert decision.actions == (ResumeServices(),)
    story = Story()
    story.at(0)
    story.at(15)
    failed = story.at(16, drain=DrainStatus.FAILED)
    assert (failed.state, failed.actions) == (PoolState.LOCAL, (ResumeServices(),))


def test_verified_drain_but_gpus_still_busy_is_not_listed() -> None:
    story = Story()
    story.at(0)
    story.at(15)
    decision = story.at(16, drain=DrainStatus.VERIFIED, gpus_idle=False)
    assert decision.state is PoolState.LOCAL
    assert not any(isinstance(a, List) for a in decision.actions)


def test_local_request_while_listed_unlists_then_serves_and_holds_local() -> None:
    story = Story()
    story.listed()
    listed_view = ProviderView(listed=True, rentals_running=0)
    assert story.at(20, provider=listed_view).state is PoolState.LISTED
    reclaim = story.at(30, provider=listed_view, local_demand=True)
    assert (reclaim.state, reclaim.actions) == (PoolState.RECLAIMING, (Unlist(),))
    assert reclaim.gates.guarded  # the request waits until nobody can rent
    back = story.at(30.1, provider=FREE, local_demand=True)
    assert (back.state, back.actions) == (PoolState.LOCAL, (ResumeServices(),))
    assert not back.gates.guarded  # held requests go through now
    # local_hold: idle again, but it stays local for 10 minutes after the reclaim.
    held = story.at(31, local_demand=False)
    assert held.state is PoolState.LOCAL and "local hold" in held.reason
    assert story.at(40.2).state is PoolState.IDLE


def test_a_rental_that_starts_while_unlisting_is_respected() -> None:
    story = Story()
    story.listed()
    story.at(30, provider=ProviderView(listed=True, rentals_running=0), local_demand=True)
    locked = T0 + timedelta(hours=2, minutes=17)
    rented = ProviderView(listed=False, rentals_running=1, locked_until=locked)
    decision = story.at(30.1, provider=rented, local_demand=True)
    assert decision.state is PoolState.RECLAIMING
    assert decision.gates.guarded and decision.gates.rented_until == locked
    assert not any(isinstance(a, (Unlist, ResumeServices)) for a in decision.actions)
    done = story.at(137.1, provider=FREE, local_demand=True)
    assert (done.state, done.actions) == (PoolState.LOCAL, (ResumeServices(),))


def test_rented_then_demand_then_contract_ends() -> None:
    story = Story()
    story.listed()
    locked = T0 + timedelta(hours=2, minutes=17)
    rented_view = ProviderView(listed=True, rentals_running=2, locked_until=locked)
    rented = story.at(40, provider=rented_view)
    assert rented.state is PoolState.RENTED
    assert rented.gates.rented_until == locked
    reclaim = story.at(50, provider=rented_view, local_demand=True)
    assert (reclaim.state, reclaim.actions) == (PoolState.RECLAIMING, (Unlist(),))
    waiting = story.at(51, provider=replace(rented_view, listed=False), local_demand=True)
    assert (waiting.state, waiting.actions) == (PoolState.RECLAIMING, ())
    done = story.at(137, provider=FREE, local_demand=True)
    assert done.state is PoolState.LOCAL and ResumeServices() in done.actions


def test_renewal_rolls_the_offer_while_unwanted_and_stops_at_the_window_end() -> None:
    story = Story()
    story.listed()
    offer_end = T0 + timedelta(minutes=137)
    view = ProviderView(listed=True, rentals_running=0, offer_end=offer_end)
    assert story.at(60, provider=view).actions == ()  # 77 minutes left: more than half
    renew = story.at(80, provider=view)  # 57 minutes left
    assert renew.actions == (List(T0 + timedelta(minutes=200), renewal=True),)
    # Near the window's end the renewal stops at it, and then stops altogether.
    view = replace(view, offer_end=WINDOW_END - timedelta(minutes=30))
    last = story.at(9 * 60 - 60, provider=view)
    assert last.actions == (List(WINDOW_END, renewal=True),)
    view = replace(view, offer_end=WINDOW_END)
    assert story.at(9 * 60 - 20, provider=view).actions == ()


def test_a_renter_is_extended_only_while_the_gpus_stay_unwanted() -> None:
    story = Story()
    story.listed()
    view = ProviderView(listed=True, rentals_running=1, offer_end=T0 + timedelta(minutes=137))
    assert isinstance(story.at(90, provider=view).actions[0], List)
    demand = story.at(91, provider=view, local_demand=True)
    assert not any(isinstance(a, List) for a in demand.actions)


def test_window_closing_while_listed_and_while_rented() -> None:
    story = Story()
    story.listed()
    listed_view = ProviderView(listed=True, rentals_running=0)
    closing = story.at(60, provider=listed_view, window_end=None)
    assert (closing.state, closing.actions) == (PoolState.RECLAIMING, (Unlist(),))
    assert closing.reason == "reclaiming: window closed"

    story = Story()
    story.listed()
    rented_view = ProviderView(listed=True, rentals_running=1, locked_until=WINDOW_END)
    story.at(60, provider=rented_view)
    closing = story.at(540, provider=rented_view, window_end=None)
    assert (closing.state, closing.actions) == (PoolState.RECLAIMING, (Unlist(),))


def test_max_cycles_per_day() -> None:
    story = Story(POLICY.model_copy(update={"max_cycles_per_day": 2, "local_hold": timedelta(0)}))
    minute = 0.0
    for _ in range(2):
        story.at(minute)
        story.at(minute + 15)
        assert story.at(minute + 16, drain=DrainStatus.VERIFIED).state is PoolState.LISTED
        story.obs = replace(story.obs, drain=DrainStatus.NONE)
        story.at(minute + 20, provider=ProviderView(listed=True, rentals_running=0),
                 local_demand=True)  # fmt: skip
        story.at(minute + 21, provider=FREE, local_demand=False)
        minute += 30
    decision = story.at(minute)
    assert decision.state is PoolState.LOCAL
    assert "2 listings in the last 24h" in decision.reason
    next_night = T0 + timedelta(days=1, hours=9)
    # 24 hours after the first listing it has aged out; the second still counts.
    assert story.at(24 * 60 + 17, window_end=next_night).state is PoolState.IDLE


def test_no_drain_and_no_listing_while_the_ledger_cannot_journal() -> None:
    story = Story()
    for minute in (0, 20, 60):  # idle far past idle_window: never drained
        decision = story.at(minute, can_journal=False)
        assert (decision.state, decision.actions) == (PoolState.LOCAL, ())
        assert "the ledger cannot journal a listing" in decision.reason
    # The database went away during a drain: the drain ends, nothing is listed.
    story.at(100, can_journal=True)
    assert story.at(115).state is PoolState.DRAINING
    aborted = story.at(116, drain=DrainStatus.VERIFIED, can_journal=False)
    assert aborted.state is PoolState.LOCAL and List not in map(type, aborted.actions)
    # Back: no listing was counted meanwhile (max_cycles_per_day), it lists as before.
    assert story.machine.listings == deque()
    story.at(120, drain=DrainStatus.NONE, can_journal=True)
    story.at(135)
    assert story.at(136, drain=DrainStatus.VERIFIED).state is PoolState.LISTED


def test_pause_and_user_reclaim() -> None:
    story = Story()
    story.listed()
    view = ProviderView(listed=True, rentals_running=0)
    paused = story.at(20, provider=view, paused=True)
    assert (paused.state, paused.actions) == (PoolState.RECLAIMING, (Unlist(),))
    assert story.at(21, provider=FREE, paused=True).state is PoolState.PAUSED
    assert story.at(60, paused=True).state is PoolState.PAUSED
    assert story.at(61, paused=False).state is PoolState.LOCAL

    story = Story()
    story.listed()
    reclaim = story.at(20, provider=view, reclaim_requested=True)
    assert reclaim.actions == (Unlist(),) and "reclaim requested" in reclaim.reason


def test_reclaim_request_stops_an_idle_pool_and_aborts_a_drain() -> None:
    story = Story()
    story.at(0)
    assert story.at(1).state is PoolState.IDLE
    stopped = story.at(2, reclaim_requested=True)
    assert stopped.state is PoolState.LOCAL and "reclaim requested" in stopped.reason
    assert story.at(3, reclaim_requested=False).state is PoolState.IDLE
    draining = story.at(18)
    assert draining.state is PoolState.DRAINING
    aborted = story.at(19, reclaim_requested=True)
    assert aborted.state is PoolState.LOCAL and "reclaim requested" in aborted.reason
    assert ResumeServices() in aborted.actions


def test_displace_interruptible_renters_once_and_keep_them_off_until_their_end() -> None:
    story = Story(PolicySection(reclaim="displace-interruptible"))
    story.listed()
    contract_end = T0 + timedelta(hours=1)
    view = ProviderView(
        listed=True, rentals_running=1, only_interruptible=True, locked_until=contract_end
    )
    story.at(30, provider=view)
    first = story.at(31, provider=view, local_demand=True)
    assert first.actions == (Unlist(), DisplaceInterruptible(contract_end))
    # The renters leave in moments, so requests are held, not refused for the contract.
    assert first.gates == GateMode(guarded=True, rented_until=None, renters=True)
    again = story.at(32, provider=replace(view, listed=False), local_demand=True)
    assert again.actions == ()
    # Displaced: local again, but the self-rental stays, or the renters would resume on the
    # GPUs the team is using ...
    done = story.at(33, provider=FREE, local_demand=True)
    assert done.state is PoolState.LOCAL and EndDisplacement() not in done.actions
    # ... and nothing is listed while it holds the machine ...
    quiet = story.at(50, provider=FREE, local_demand=False)
    assert quiet.state is PoolState.LOCAL and "self-rental" in quiet.reason
    # ... until the displaced contracts are over.
    over = story.at(60, provider=FREE)
    assert EndDisplacement() in over.actions
    assert story.at(61, provider=FREE).state is PoolState.IDLE
    on_demand = Story(PolicySection(reclaim="displace-interruptible"))
    on_demand.listed()
    view = ProviderView(listed=True, rentals_running=1, only_interruptible=False)
    assert on_demand.at(31, provider=view, local_demand=True).actions == (Unlist(),)


def test_start_finds_a_listing_it_should_not_have() -> None:
    decision = Story().at(0, provider=ProviderView(listed=True, rentals_running=0))
    assert (decision.state, decision.actions) == (PoolState.RECLAIMING, (Unlist(),))
    found = ProviderView(listed=True, rentals_running=1, locked_until=WINDOW_END)
    decision = Story().at(0, provider=found)
    assert decision.state is PoolState.RECLAIMING and decision.gates.rented_until == WINDOW_END


def test_provider_unreadable_never_lists_and_withdraws_what_it_cannot_see() -> None:
    start = Story().at(0, provider=None)  # just started: a listing might be up
    assert (start.state, start.actions) == (PoolState.DEGRADED, (Unlist(),))
    story = Story()
    story.at(0)  # the provider said: nothing listed, nothing rented
    quiet = story.at(1, provider=None)
    assert (quiet.state, quiet.actions) == (PoolState.DEGRADED, ())
    assert not quiet.gates.guarded
    story = Story()
    story.listed()
    lost = story.at(20, provider=None)
    assert (lost.state, lost.actions) == (PoolState.DEGRADED, (Unlist(),))
    assert lost.gates.guarded
    assert story.at(21, provider=None).actions == (Unlist(),)  # retried every step
    back = story.at(22, provider=FREE)
    assert back.state is PoolState.LOCAL and ResumeServices() in back.actions


def test_telemetry_failure_is_degraded_and_unlists_an_unrented_offer() -> None:
    assert Story().at(0, gpus_idle=None).state is PoolState.DEGRADED
    story = Story()
    story.listed()
    decision = story.at(20, provider=ProviderView(listed=True, rentals_running=0), gpus_idle=None)
    assert decision.actions == (Unlist(),)
    assert "telemetry" in decision.reason


# -- random histories -----------------------------------------------------------------------


@dataclass
class Market:
    """A Vast-like marketplace, reduced to its contract rules."""

    listed: bool = False
    offer_end: datetime | None = None
    rentals: list[tuple[datetime, bool]] = field(default_factory=list)  # (end, interruptible)

    def tick(self, now: datetime) -> None:
        self.rentals = [r for r in self.rentals if r[0] > now]
        if self.offer_end is not None and now >= self.offer_end:
            self.listed = False

    def view(self) -> ProviderView:
        return ProviderView(
            listed=self.listed,
            rentals_running=len(self.rentals),
            locked_until=max((r[0] for r in self.rentals), default=None),
            offer_end=self.offer_end if self.listed else None,
            only_interruptible=bool(self.rentals) and all(r[1] for r in self.rentals),
        )

    def apply(self, action: object, now: datetime) -> None:
        if isinstance(action, List):
            if self.offer_end and action.end > self.offer_end:
                self.rentals = [(action.end, i) for _, i in self.rentals]  # extension
            self.listed, self.offer_end = True, action.end
        elif isinstance(action, Unlist):
            self.listed = False
        elif isinstance(action, DisplaceInterruptible):
            self.rentals = [r for r in self.rentals if not r[1]]


step_strategy = st.tuples(
    st.integers(min_value=1, max_value=40),  # minutes to the next step
    st.booleans(),  # local demand
    st.sampled_from([True, True, True, False, None]),  # GPUs idle (None: telemetry fails)
    st.sampled_from([True] * 8 + [False]),  # provider readable
    st.sampled_from([None, None, None, "on-demand", "interruptible"]),  # a renter arrives
    st.sampled_from([DrainStatus.VERIFIED] * 4 + [DrainStatus.FAILED, DrainStatus.RUNNING]),
    st.sampled_from([False] * 12 + [True]),  # paused
)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(step_strategy, min_size=5, max_size=80),
    cron=st.sampled_from(["0 22 * * *", "*/45 * * * *", "0 */3 * * *", "30 1 * * 1-5"]),
    window_minutes=st.integers(min_value=20, max_value=600),
    displace=st.booleans(),
)
def test_invariants_hold_through_random_histories(
    steps: list[tuple[int, bool, bool | None, bool, str | None, DrainStatus, bool]],
    cron: str,
    window_minutes: int,
    displace: bool,
) -> None:
    policy = PolicySection(
        idle_window="10m",
        local_hold="5m",
        reclaim="displace-interruptible" if displace else "graceful",
    )
    # A day's horizon is plenty: no offer reaches further than max_commitment (2h), and a
    # month's walk through never-closing windows would make each example slow.
    calendar = Calendar(
        [Recurrence(cron, timedelta(minutes=window_minutes), ZoneInfo("UTC"))],
        horizon=timedelta(days=1),
    )
    machine = PoolMachine(policy)
    market = Market()
    now, mono = T0, 0.0
    services_loaded = True  # the local services hold models on the GPUs
    pending_drain = False
    for minutes, demand, idle, readable, renter, drain_result, paused in steps:
        now += timedelta(minutes=minutes)
        mono += minutes * 60
        market.tick(now)
        if renter and market.listed:
            assert market.offer_end is not None
            market.rentals.append((market.offer_end, renter == "interruptible"))
        window_end = calendar.end_of(now)
        gpus_idle = idle if not demand else False
        if market.rentals:
            gpus_idle = False  # renters' containers use the GPUs
        obs = Observation(
            now=now,
            monotonic=mono,
            window_end=window_end,
            gpus_idle=gpus_idle,
            local_demand=demand,
            provider=market.view() if readable else None,
            drain=drain_result if pending_drain else DrainStatus.NONE,
            paused=paused,
        )
        if pending_drain and obs.drain is DrainStatus.VERIFIED:
            services_loaded = False  # the drain finished in the world before this step
            pending_drain = False
        decision = machine.step(obs)
        for action in decision.actions:
            if isinstance(action, List):
                # Invariant 1: listed only inside a window, never beyond its end.
                assert window_end is not None and calendar.is_open(now)
                assert action.end <= window_end
                assert action.end <= now + policy.max_commitment
                # Invariant 2: only after a verified drain, with idle GPUs and no demand.
                if not action.renewal:
                    assert obs.drain is DrainStatus.VERIFIED
                assert obs.gpus_idle is True or market.rentals
                assert not demand
                assert not services_loaded
            if isinstance(action, Drain):
                pending_drain = True
            if isinstance(action, ResumeServices):
                services_loaded = True
                pending_drain = False
                # The GPUs are handed back only when nobody can rent them.
                assert not market.rentals
                assert not market.listed or (market.offer_end or now) <= now
            if readable:
                market.apply(action, now)
        if not decision.gates.guarded and demand and not services_loaded:
            services_loaded = True  # a request that passes through loads a model

        # Invariant 1 on the market: an offer never outlives the window it was made in.
        if market.listed:
            assert market.offer_end is not None
            assert calendar.is_open(now) or not readable or market.offer_end <= now
            assert calendar.end_of(now) is None or market.offer_end <= (
                calendar.end_of(now) or market.offer_end
            )
        # Invariant 2 on the market: never rentable while local services hold the GPUs.
        if market.listed and market.offer_end and market.offer_end > now:
            assert not services_loaded
        # Invariant 3: demand while an offer is up withdraws it in the same step, and
        # requests pass once nobody can rent the GPUs.
        if demand and readable:
            assert not market.listed
        if readable and not market.listed and not market.rentals and not paused:
            assert not decision.gates.guarded or decision.state is PoolState.RECLAIMING
        if decision.gates.guarded:
            assert decision.state in (
                PoolState.LISTED,
                PoolState.RENTED,
                PoolState.RECLAIMING,
                PoolState.DEGRADED,
            )
