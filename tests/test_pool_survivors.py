"""The pool machine's behaviours that no other test pinned (issue 21: mutation survivors).

Each test drives the pure machine through observations and asserts on the decision: the
state, the actions the marketplace would see, the gate mode and the reason in the journal.
Renewal timing is left to the policy tests (it is being reshaped); only "a renewal comes
before the offer lapses" is pinned here.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.config import PolicySection
from broker.scheduling.pool import (
    CheckProvider,
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

T0 = datetime(2027, 3, 9, 13, 37, tzinfo=UTC)


def old_defaults(**changes: object) -> PolicySection:
    """The policy these tests were written for (the defaults before the replay moved them):
    idle 15m, drain 2m, min_listed 30m, 6 cycles, hold 10m, commit 2h, renewal at half."""
    base = {"idle_window": "15m", "local_hold": "10m", "renew_every": "1h"}
    return PolicySection.model_validate({**base, **changes})


POLICY = old_defaults()
FREE = ProviderView(listed=False, rentals_running=0)
UP = ProviderView(listed=True, rentals_running=0)
LOCKED = T0 + timedelta(hours=1, minutes=3)


class Pool:
    """A machine fed observations at minutes after T0; each keeps the previous values."""

    def __init__(self, policy: PolicySection = POLICY) -> None:
        self.machine = PoolMachine(policy)
        self.obs = Observation(
            now=T0,
            monotonic=1000.0,
            window_end=T0 + timedelta(hours=8),
            gpus_idle=True,
            local_demand=False,
            provider=FREE,
        )

    def at(self, minutes: float, **changes: object) -> Decision:
        self.obs = replace(
            self.obs,
            now=T0 + timedelta(minutes=minutes),
            monotonic=1000.0 + minutes * 60,
            **changes,
        )  # type: ignore[arg-type]
        decision = self.machine.step(self.obs)
        self.obs = replace(self.obs, drain=DrainStatus.NONE)
        return decision

    def draining(self) -> Decision:
        self.at(0)
        decision = self.at(15)
        assert decision.state is PoolState.DRAINING and decision.actions == (Drain(),)
        return decision

    def listed(self, minutes: float = 17) -> Decision:
        self.draining()
        decision = self.at(minutes, drain=DrainStatus.VERIFIED)
        assert decision.state is PoolState.LISTED
        self.obs = replace(self.obs, provider=UP)
        return decision


def test_a_listed_pool_seeing_exactly_one_rental_is_rented() -> None:
    pool = Pool()
    pool.listed()
    one = ProviderView(listed=True, rentals_running=1, locked_until=LOCKED)
    decision = pool.at(20, provider=one)
    assert decision.state is PoolState.RENTED and decision.changed
    assert decision.gates == GateMode(True, LOCKED, renters=True)
    assert decision.reason == "rented: 1 rental(s), locked until 14:40"


def test_one_rental_found_while_local_is_respected_with_renters_shown_at_the_gate() -> None:
    pool = Pool()
    one = ProviderView(listed=False, rentals_running=1, locked_until=LOCKED)
    decision = pool.at(0, provider=one)
    assert decision.state is PoolState.RECLAIMING and decision.actions == ()
    assert decision.gates == GateMode(True, LOCKED, renters=True)
    assert decision.reason == "reclaiming: found running rentals (respected)"
    # the provider then goes dark: a rental we saw may still be there, so withdraw
    dark = pool.at(1, provider=None)
    assert dark.state is PoolState.DEGRADED and dark.actions == (Unlist(),)
    assert dark.gates.guarded


def test_a_found_listing_without_renters_is_withdrawn() -> None:
    decision = Pool().at(0, provider=UP)
    assert decision.state is PoolState.RECLAIMING and decision.actions == (Unlist(),)
    assert decision.gates == GateMode(True) and not decision.gates.renters
    assert decision.reason == "reclaiming: found a listing that should not exist"


def test_reclaiming_after_the_demand_left_but_not_the_renters() -> None:
    pool = Pool()
    pool.listed()
    rented = ProviderView(listed=True, rentals_running=1, locked_until=LOCKED)
    pool.at(20, provider=rented)
    reclaim = pool.at(21, local_demand=True)
    assert reclaim.state is PoolState.RECLAIMING and reclaim.actions == (Unlist(),)
    assert reclaim.reason == "reclaiming: local request"
    # the request went away; the unlist has not shown yet: retried, gates still guarded
    waiting = pool.at(22, local_demand=False)
    assert waiting.state is PoolState.RECLAIMING and not waiting.changed
    assert waiting.actions == (Unlist(),)
    assert waiting.gates == GateMode(True, LOCKED, renters=True)
    assert waiting.reason == "reclaiming: waiting for contracts to end"
    # unlisted now, the renter still there: nothing to do but wait
    off = pool.at(23, provider=replace(rented, listed=False))
    assert off.actions == () and off.gates == GateMode(True, LOCKED, renters=True)
    back = pool.at(70, provider=FREE)
    assert back.state is PoolState.LOCAL and back.actions == (ResumeServices(),)
    assert back.reason == "reclaimed: no renter left" and not back.gates.guarded


def test_a_reclaim_with_the_offer_already_down_sends_no_unlist() -> None:
    pool = Pool()
    pool.listed()
    pool.at(20, provider=ProviderView(listed=False, rentals_running=2, locked_until=LOCKED))
    decision = pool.at(21, reclaim_requested=True)
    assert decision.state is PoolState.RECLAIMING and decision.actions == ()
    assert decision.reason == "reclaiming: reclaim requested"


def test_resume_services_is_sent_once() -> None:
    pool = Pool()
    pool.draining()
    aborted = pool.at(16, local_demand=True)
    assert aborted.actions == (ResumeServices(),)
    assert pool.at(17).actions == ()
    assert pool.at(18, local_demand=False).actions == ()


def test_decision_changed_says_whether_the_state_changed() -> None:
    pool = Pool()
    assert pool.at(0).changed  # LOCAL -> IDLE
    assert not pool.at(1).changed
    assert pool.at(15).changed  # -> DRAINING
    assert not pool.at(16, drain=DrainStatus.RUNNING).changed


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"drain": DrainStatus.FAILED}, "drain failed"),
        ({"drain": DrainStatus.VERIFIED, "gpus_idle": False}, "drain aborted: GPUs busy"),
        (
            {"drain": DrainStatus.VERIFIED, "window_end": T0 + timedelta(minutes=40)},
            "not listed: window closes in under min_listed (30m)",
        ),
        ({"window_end": None}, "drain aborted: window closed"),
        ({"provider": None}, "drain aborted: the provider cannot be read"),
        ({"local_demand": True}, "drain aborted: local request"),
        ({"reclaim_requested": True}, "drain aborted: reclaim requested"),
        ({"paused": True}, "drain aborted: paused"),
    ],
)
def test_a_drain_that_does_not_list_goes_back_at_once_without_a_hold(
    changes: dict[str, object], reason: str
) -> None:
    pool = Pool()
    pool.draining()
    decision = pool.at(16, **changes)
    assert decision.reason == reason
    assert decision.actions == (ResumeServices(),)
    assert decision.state is (PoolState.PAUSED if changes.get("paused") else PoolState.LOCAL)
    # no post-reclaim hold: once things are quiet again the pool is idle in the next step
    again = pool.at(
        17,
        drain=DrainStatus.NONE,
        gpus_idle=True,
        window_end=T0 + timedelta(hours=8),
        provider=FREE,
        local_demand=False,
        reclaim_requested=False,
        paused=False,
    )
    if changes.get("paused"):
        assert again.reason == "resumed"
        again = pool.at(17.5)
    assert again.state is PoolState.IDLE, again.reason


def test_a_drain_times_out_at_drain_timeout_and_goes_back_without_a_hold() -> None:
    pool = Pool()
    pool.draining()  # drain started at minute 15; drain_timeout 2m
    assert pool.at(16.99, drain=DrainStatus.RUNNING).reason == "draining"
    timed_out = pool.at(17, drain=DrainStatus.RUNNING)
    assert timed_out.reason == "drain timed out" and timed_out.state is PoolState.LOCAL
    assert pool.at(18).state is PoolState.IDLE


def test_cycles_per_day_count_listings_of_the_last_24_hours_exactly() -> None:
    pool = Pool(old_defaults(max_cycles_per_day=1))
    pool.obs = replace(pool.obs, window_end=T0 + timedelta(days=3))
    pool.listed()  # listed at minute 17
    pool.at(18, provider=FREE)  # the offer went away
    day = 24 * 60
    assert pool.at(17 + day - 0.5).reason == "local: 1 listings in the last 24h"
    assert pool.at(17 + day).state is PoolState.IDLE


def test_the_local_hold_after_a_reclaim_ends_exactly_at_local_hold() -> None:
    pool = Pool()
    pool.listed()
    reclaimed = pool.at(20, local_demand=True)  # offer up, no renter: unlisted at once
    assert reclaimed.actions == (Unlist(),) and reclaimed.state is PoolState.RECLAIMING
    back = pool.at(21, local_demand=False, provider=FREE)
    assert back.reason == "reclaimed: no renter left"  # hold from minute 21, 10m
    assert pool.at(30.9).reason == "local: local hold after a reclaim (6s left)"
    assert pool.at(31).state is PoolState.IDLE


def test_unlisted_at_once_when_nothing_is_up_and_demand_comes() -> None:
    pool = Pool()
    pool.listed()
    decision = pool.at(20, local_demand=True, provider=FREE)
    assert decision.state is PoolState.LOCAL and decision.reason == "unlisted: local request"
    assert pool.at(29, local_demand=False).reason.startswith("local: local hold after a reclaim")


@pytest.mark.parametrize(("left", "listed"), [(30, True), (29.9, False)])
def test_min_listed_boundary(left: float, listed: bool) -> None:
    pool = Pool()
    pool.obs = replace(pool.obs, window_end=T0 + timedelta(minutes=17 + left))
    pool.draining()
    decision = pool.at(17, drain=DrainStatus.VERIFIED)
    assert (decision.state is PoolState.LISTED) is listed, decision.reason
    if listed:
        assert decision.actions == (List(T0 + timedelta(minutes=17 + left)),)


def test_a_second_reclaim_displaces_interruptible_renters_again() -> None:
    pool = Pool(old_defaults(reclaim="displace-interruptible"))
    pool.listed()
    first_end = T0 + timedelta(minutes=50)
    spot = ProviderView(
        listed=True, rentals_running=1, locked_until=first_end, only_interruptible=True
    )
    rented = pool.at(20, provider=spot)
    assert rented.gates == GateMode(True, None, renters=True)  # displaceable: no refusal
    first = pool.at(21, local_demand=True)
    assert first.actions == (Unlist(), DisplaceInterruptible(first_end))
    assert first.gates == GateMode(True, None, renters=True)  # displaced: hold, do not refuse
    assert pool.at(22).actions == (Unlist(),)  # not displaced twice in one reclaim
    pool.at(23, provider=FREE, local_demand=False)
    ended = pool.at(50)
    assert EndDisplacement() in ended.actions
    # a later listing, rented by interruptible renters again, reclaimed again
    pool.at(60, provider=FREE)
    pool.at(75)
    pool.at(77, drain=DrainStatus.VERIFIED)
    second_end = T0 + timedelta(minutes=150)
    pool.at(80, provider=replace(spot, locked_until=second_end))
    second = pool.at(81, local_demand=True)
    assert second.actions == (Unlist(), DisplaceInterruptible(second_end))


def test_a_displacement_without_a_contract_end_holds_for_max_commitment() -> None:
    pool = Pool(old_defaults(reclaim="displace-interruptible"))
    pool.listed()
    pool.at(20, provider=ProviderView(listed=False, rentals_running=1, only_interruptible=True))
    decision = pool.at(21, reclaim_requested=True)
    assert decision.actions == (DisplaceInterruptible(T0 + timedelta(minutes=21, hours=2)),)
    # the self-rental keeps the pool from listing until the displaced contracts end
    pool.at(22, reclaim_requested=False, provider=FREE)
    assert pool.at(40).reason == "local: our self-rental keeps displaced renters off until 15:58"


def test_mixed_renters_are_not_displaced_and_the_gate_refuses_until_their_end() -> None:
    pool = Pool(old_defaults(reclaim="displace-interruptible"))
    pool.listed()
    pool.at(20, provider=ProviderView(listed=True, rentals_running=2, locked_until=LOCKED))
    decision = pool.at(21, local_demand=True)
    assert decision.actions == (Unlist(),)
    assert decision.gates == GateMode(True, LOCKED, renters=True)


def test_an_outage_right_after_a_view_with_nothing_listed_withdraws_nothing() -> None:
    pool = Pool()
    pool.at(0)
    dark = pool.at(1, provider=None)
    assert dark.state is PoolState.DEGRADED and dark.actions == ()
    assert dark.gates == GateMode(False)
    assert dark.reason == "degraded: the provider cannot be read"
    back = pool.at(2, provider=FREE)
    assert back.state is PoolState.LOCAL and back.reason == "recovered"
    pool.at(3, provider=None)
    assert pool.at(4, paused=True).state is PoolState.PAUSED


def test_a_broker_that_starts_blind_withdraws_what_it_cannot_see() -> None:
    decision = Pool().at(0, provider=None)
    assert decision.state is PoolState.DEGRADED and decision.actions == (Unlist(),)
    assert decision.gates.guarded


def test_a_renewal_falls_back_to_the_machines_own_offer_end() -> None:
    """The marketplace does not show the offer's end: the machine renews from its own."""
    pool = Pool()
    listed = pool.listed()
    (offer,) = listed.actions
    assert isinstance(offer, List)
    renewals = []
    minute = 17.0
    while minute < 17 + 120:
        minute += 1
        decision = pool.at(minute, provider=UP)
        renewals += [a for a in decision.actions if isinstance(a, List)]
        if renewals:
            break
    assert renewals and renewals[0].renewal
    assert T0 + timedelta(minutes=minute) < offer.end  # before the offer lapsed
    # the marketplace showing a later end than ours: nothing to renew
    far = Pool()
    far.listed()
    shown = ProviderView(listed=True, rentals_running=0, offer_end=T0 + timedelta(hours=9))
    assert all(far.at(m, provider=shown).actions == () for m in range(18, 137))


def test_telemetry_lost_while_listed_withdraws_the_offer() -> None:
    pool = Pool()
    pool.listed()
    decision = pool.at(20, gpus_idle=None)
    assert decision.actions == (Unlist(),) and decision.state is PoolState.RECLAIMING
    assert decision.reason == "reclaiming: GPU telemetry unavailable"


def test_the_window_closing_while_listed_withdraws_the_offer() -> None:
    pool = Pool()
    pool.listed()
    decision = pool.at(20, window_end=None)
    assert decision.actions == (Unlist(),) and decision.reason == "reclaiming: window closed"


def test_the_offer_lapsing_unseen_goes_back_to_local_without_a_hold() -> None:
    pool = Pool()
    pool.listed()
    decision = pool.at(20, provider=FREE)
    assert decision.state is PoolState.LOCAL and decision.reason == "offer no longer listed"
    assert decision.actions == (ResumeServices(),)
    assert pool.at(21).state is PoolState.IDLE


def test_a_refused_request_keeps_the_pool_local_until_its_retry_time() -> None:
    pool = Pool()
    promised = T0 + timedelta(minutes=45)
    assert (
        pool.at(0, refused_until=promised).reason
        == "local: a refused request was promised the GPUs by 14:22"
    )
    assert pool.at(44.9).state is PoolState.LOCAL
    assert pool.at(45).state is PoolState.IDLE


def test_a_refused_request_while_rented_stops_renewals_and_reclaims() -> None:
    pool = Pool()
    pool.listed()
    rented = ProviderView(listed=True, rentals_running=1, locked_until=LOCKED)
    pool.at(20, provider=rented)
    decision = pool.at(21, refused_until=LOCKED)
    assert decision.actions == (Unlist(),)
    assert decision.reason == "reclaiming: a refused request waits for the GPUs"


def test_reasons_show_far_times_with_their_day() -> None:
    pool = Pool()
    far = T0 + timedelta(hours=30)
    assert pool.at(0, refused_until=far).reason == (
        "local: a refused request was promised the GPUs by Wed 10 Mar 19:37"
    )
    near = T0 + timedelta(hours=19, minutes=59)
    assert pool.at(1, refused_until=near).reason.endswith("by 09:36")


# -- a provider that cannot list (observed only) ------------------------------------------------


def test_observed_only_follows_the_renters_the_provider_shows() -> None:
    pool = Pool()
    pool.obs = replace(pool.obs, can_list=False)
    idle = pool.at(0)
    assert (idle.state, idle.actions, idle.gates) == (PoolState.IDLE, (), GateMode(False))
    assert idle.reason == "idle (observed only: listing is done in the provider's dashboard)"
    for changes in ({"gpus_idle": False}, {"local_demand": True}, {"window_end": None}):
        local = pool.at(1, **changes)
        assert local.state is PoolState.LOCAL and local.reason == "local (observed only)"
        pool.obs = replace(
            pool.obs, gpus_idle=True, local_demand=False, window_end=T0 + timedelta(hours=8)
        )
    rented = pool.at(2, provider=ProviderView(listed=True, rentals_running=1, locked_until=LOCKED))
    assert rented.state is PoolState.RENTED and rented.actions == ()
    assert rented.gates == GateMode(True, LOCKED, renters=True)
    assert rented.reason == "rented (observed): 1 rental(s) until 14:40"
    unknown = pool.at(3, provider=ProviderView(listed=True, rentals_running=2))
    assert unknown.reason == "rented (observed): 2 rental(s) until unknown"
    gone = pool.at(4, provider=FREE)
    assert gone.state is PoolState.LOCAL and gone.reason == "no renter left (observed)"
    assert not gone.gates.guarded
    pool.at(4.5, provider=ProviderView(listed=True, rentals_running=1))
    # the provider goes dark: the renters seen last may still be there
    dark = pool.at(5, provider=None)
    assert dark.state is PoolState.DEGRADED and dark.actions == ()
    assert dark.gates == GateMode(True, None, renters=True)
    assert dark.reason == "degraded: the provider cannot be read (observed only)"
    assert pool.at(6, provider=FREE).state is PoolState.IDLE
    blind = pool.at(7, provider=None)
    assert blind.state is PoolState.DEGRADED and blind.gates == GateMode(False)
    paused = pool.at(8, paused=True)
    assert paused.state is PoolState.PAUSED and paused.reason.endswith("(observed only)")
    assert pool.at(9, provider=FREE).reason == "paused"


def test_observed_only_refusal_is_cleared_once_no_renter_is_shown() -> None:
    pool = Pool()
    pool.obs = replace(pool.obs, can_list=False)
    pool.at(0, provider=ProviderView(listed=False, rentals_running=1, locked_until=LOCKED))
    pool.at(1, refused_until=LOCKED)
    assert pool.machine.refused_pending
    pool.at(2, provider=FREE)
    assert not pool.machine.refused_pending
    assert pool.at(3, can_list=True, refused_until=None).state is PoolState.IDLE


# -- the remaining branches of the listed side ----------------------------------------------------


def test_a_reclaim_without_renters_shows_none_at_the_gate() -> None:
    pool = Pool()
    pool.listed()
    reclaim = pool.at(20, local_demand=True)
    assert reclaim.gates == GateMode(True, None, renters=False)
    waiting = pool.at(21, local_demand=False)  # the offer still shows: retried
    assert waiting.actions == (Unlist(),)
    assert waiting.gates == GateMode(True, None, renters=False)


def test_displaced_renters_waiting_out_a_reclaim_do_not_make_the_gate_refuse() -> None:
    pool = Pool(old_defaults(reclaim="displace-interruptible"))
    pool.listed()
    spot = ProviderView(
        listed=False, rentals_running=1, locked_until=LOCKED, only_interruptible=True
    )
    pool.at(20, provider=spot)
    pool.at(21, local_demand=True)
    waiting = pool.at(22, local_demand=False)
    assert waiting.reason == "reclaiming: waiting for contracts to end"
    assert waiting.gates == GateMode(True, None, renters=True)


def test_interruptible_renters_keep_the_gpus_when_the_policy_is_graceful() -> None:
    pool = Pool()  # reclaim = "graceful"
    pool.listed()
    spot = ProviderView(
        listed=True, rentals_running=1, locked_until=LOCKED, only_interruptible=True
    )
    assert pool.at(20, provider=spot).gates == GateMode(True, LOCKED, renters=True)
    cannot = Pool(old_defaults(reclaim="displace-interruptible"))
    cannot.listed()
    decision = cannot.at(20, provider=spot, can_displace=False)
    assert decision.gates == GateMode(True, LOCKED, renters=True)


def test_gpu_activity_nobody_explains_while_listed_is_checked_first() -> None:
    pool = Pool()
    pool.listed()
    check = pool.at(20, gpus_idle=False, view_after_activity=False)
    assert check.state is PoolState.LISTED and check.actions == (CheckProvider(),)
    assert check.reason == "listed: GPU activity nobody explains yet, checking"
    renters = pool.at(21, gpus_idle=False, busy_is_renters=True, view_after_activity=False)
    assert renters.actions == () and renters.reason == "listed"
    quiet = pool.at(22, gpus_idle=True, busy_is_renters=False, view_after_activity=False)
    assert quiet.actions == () and quiet.reason == "listed"
    local = pool.at(23, gpus_idle=False, view_after_activity=True)
    assert local.actions == (Unlist(),) and local.reason == "reclaiming: local GPU use"


def test_a_listed_offer_never_lapses_while_the_window_is_open() -> None:
    """Whatever the renewal rule, with the marketplace not showing the offer's end, the
    machine's own offer end is renewed before it passes, again and again."""
    pool = Pool()
    pool.obs = replace(pool.obs, window_end=T0 + timedelta(hours=12))
    (offer,) = pool.listed().actions
    assert isinstance(offer, List)
    end, renewals = offer.end, 0
    for minute in range(18, 6 * 60):
        decision = pool.at(minute, provider=UP)
        for action in decision.actions:
            assert isinstance(action, List) and action.renewal
            end, renewals = action.end, renewals + 1
        assert end > T0 + timedelta(minutes=minute), minute
    assert renewals >= 2


@pytest.mark.parametrize(("hours", "shown"), [(19.99, "09:36"), (20, "Wed 10 Mar 09:37")])
def test_a_time_20_hours_away_is_shown_with_its_day(hours: float, shown: str) -> None:
    pool = Pool()
    promised = T0 + timedelta(hours=hours)
    reason = pool.at(0, refused_until=promised).reason
    assert reason == f"local: a refused request was promised the GPUs by {shown}"


@pytest.mark.parametrize(
    ("days", "words"),
    [(30, "window open until Thu 08 Apr 13:54"), (30.5, "window always open")],
)
def test_a_window_more_than_30_days_long_reads_as_always_open(days: float, words: str) -> None:
    # listed 17 minutes in: the window ends `days` after that
    pool = Pool()
    pool.obs = replace(pool.obs, window_end=T0 + timedelta(days=days, minutes=17))
    assert pool.listed().reason == f"listed: idle 15m, {words}, offer ends 15:54"


def test_observed_only_and_paused_is_paused() -> None:
    decision = Pool().at(0, can_list=False, paused=True)
    assert decision.state is PoolState.PAUSED and decision.reason == "paused"


def test_a_guarded_gate_without_renters_opens_when_the_pool_becomes_observed_only() -> None:
    # Listed (gates guarded, no renter yet); the provider is swapped for one that cannot
    # list, and it cannot be read: nobody can have come through us, so the gates open.
    pool = Pool()
    pool.listed()
    decision = pool.at(18, can_list=False, provider=None)
    assert decision.state is PoolState.DEGRADED and decision.gates == GateMode.OPEN


def test_renters_found_with_a_refusal_pending_keep_reclaiming_for_it() -> None:
    # At start the marketplace shows renters (no offer) and a 503 told someone to come
    # back: the pool reclaims for that request, not merely waits the contracts out.
    pool = Pool()
    found = ProviderView(listed=False, rentals_running=1, locked_until=LOCKED)
    first = pool.at(0, provider=found, refused_until=T0 + timedelta(minutes=30))
    assert first.reason == "reclaiming: found running rentals (respected)"
    again = pool.at(1)
    assert again.reason == "reclaiming: a refused request waits for the GPUs"
