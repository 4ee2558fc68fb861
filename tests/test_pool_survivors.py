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
POLICY = PolicySection()  # idle 15m, drain 2m, min_listed 30m, 6 cycles, hold 10m, commit 2h
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
    pool = Pool(PolicySection(max_cycles_per_day=1))
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
    pool = Pool(PolicySection(reclaim="displace-interruptible"))
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
    pool = Pool(PolicySection(reclaim="displace-interruptible"))
    pool.listed()
    pool.at(20, provider=ProviderView(listed=False, rentals_running=1, only_interruptible=True))
    decision = pool.at(21, reclaim_requested=True)
    assert decision.actions == (DisplaceInterruptible(T0 + timedelta(minutes=21, hours=2)),)
    # the self-rental keeps the pool from listing until the displaced contracts end
    pool.at(22, reclaim_requested=False, provider=FREE)
    assert pool.at(40).reason == "local: our self-rental keeps displaced renters off until 15:58"


def test_mixed_renters_are_not_displaced_and_the_gate_refuses_until_their_end() -> None:
    pool = Pool(PolicySection(reclaim="displace-interruptible"))
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
