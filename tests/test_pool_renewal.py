"""The pool machine's offer end and renewals: renew_every, max_commitment, the window and
the weekly rhythm's cap (policy.demand_risk). Pure steps, as in test_pool_survivors.py."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from test_pool_survivors import LOCKED, T0, Pool, old_defaults

from broker.scheduling.pool import List, PoolMachine, PoolState, ProviderView, Unlist


def _at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def _shown(end: datetime) -> ProviderView:
    """Listed, nobody renting, the marketplace showing the offer's end."""
    return ProviderView(listed=True, rentals_running=0, offer_end=end)


def test_renew_every_renews_once_the_end_is_that_much_nearer_than_max_commitment() -> None:
    pool = Pool(old_defaults(renew_every="10m"))
    (offer,) = pool.listed(17).actions  # listed at 17 min, ending 2 h later
    assert offer == List(_at(137))
    assert pool.at(26.99, provider=_shown(_at(137))).actions == ()
    assert pool.at(27, provider=_shown(_at(137))).actions == (List(_at(147), renewal=True),)


def test_without_renew_every_the_offer_is_renewed_at_half_of_max_commitment() -> None:
    machine = PoolMachine(old_defaults())  # renew_every 1h: the same as the old half
    assert machine.renewal_due(_at(120)) == _at(60)
    machine.policy = machine.policy.model_copy(update={"renew_every": None})
    assert machine.renewal_due(_at(120)) == _at(60)
    machine.policy = machine.policy.model_copy(update={"max_commitment": timedelta(hours=3)})
    assert machine.renewal_due(_at(180)) == _at(90)


def test_a_renew_every_longer_than_max_commitment_renews_only_at_the_end() -> None:
    machine = PoolMachine(old_defaults(renew_every="3h"))
    assert machine.renewal_due(_at(120)) == _at(120)


def test_no_renewal_when_the_new_end_would_not_be_later() -> None:
    # The window ends at 2h17m: the first offer ends there already; a renewal would not
    # move it, so none is sent however often the pool is stepped.
    pool = Pool(old_defaults(renew_every="10m"))
    pool.obs = replace(pool.obs, window_end=_at(137))
    pool.listed(17)
    assert all(pool.at(m, provider=_shown(_at(137))).actions == () for m in range(18, 136))


def test_the_rhythm_caps_the_offer_only_with_demand_risk() -> None:
    quiet = _at(17 + 45)  # the team likely back 45 min after listing
    careful = Pool(old_defaults(demand_risk=0.2))
    careful.obs = replace(careful.obs, quiet_until=quiet)
    assert careful.listed(17).actions == (List(quiet),)
    plain = Pool()
    plain.obs = replace(plain.obs, quiet_until=quiet)
    assert plain.listed(17).actions == (List(_at(137)),)


def test_a_capped_offer_is_renewed_to_the_cap_while_min_listed_is_left() -> None:
    pool = Pool(old_defaults(demand_risk=0.2, renew_every="10m"))
    pool.obs = replace(pool.obs, quiet_until=_at(100))
    pool.listed(17)
    # the cap moved later: renewed to it, even though it is less than max_commitment away
    renewed = pool.at(30, provider=_shown(_at(100)), quiet_until=_at(110))
    assert renewed.actions == (List(_at(110), renewal=True),)
    # exactly min_listed (30 min) left to the cap: still renewed
    edge = pool.at(90, provider=_shown(_at(110)), quiet_until=_at(120))
    assert edge.actions == (List(_at(120), renewal=True),)
    # under min_listed: the offer is let run out
    late = pool.at(91, provider=_shown(_at(120)), quiet_until=_at(120.99))
    assert late.actions == () and late.state is PoolState.LISTED


def test_a_cap_that_is_not_the_rhythms_is_renewed_however_short() -> None:
    # At 2h15m the window ends 25 minutes later, before the rhythm's cap: the rule "let a
    # short capped offer run out" is the rhythm's alone, the window's end is renewed to.
    pool = Pool(old_defaults(demand_risk=0.2, renew_every="10m"))
    pool.obs = replace(pool.obs, window_end=_at(160), quiet_until=_at(300))
    pool.listed(17)
    decision = pool.at(135, provider=_shown(_at(137)))
    assert decision.actions == (List(_at(160), renewal=True),)


@pytest.mark.parametrize(
    ("window_end", "quiet_until", "reason"),
    [
        (25, None, "local: window closes in under min_listed (30m)"),
        (25, 24, "local: local use likely within min_listed (30m), by the weekly rhythm"),
        (25, 25, "local: window closes in under min_listed (30m)"),
        (300, 20, "local: local use likely within min_listed (30m), by the weekly rhythm"),
    ],
)
def test_the_reason_for_not_listing_names_the_window_or_the_rhythm(
    window_end: float, quiet_until: float | None, reason: str
) -> None:
    pool = Pool(old_defaults(demand_risk=0.2))
    quiet = None if quiet_until is None else _at(quiet_until)
    decision = pool.at(0, window_end=_at(window_end), quiet_until=quiet)
    assert decision.state is PoolState.LOCAL and decision.reason == reason


def test_the_rhythm_message_needs_the_cap_below_max_commitment_too() -> None:
    # A short max_commitment (20 min) under min_listed: the window is far, the rhythm's
    # cap beyond the commitment, so it is not the rhythm that keeps the pool local.
    pool = Pool(old_defaults(demand_risk=0.2, max_commitment="20m"))
    decision = pool.at(0, window_end=_at(300), quiet_until=_at(20))
    assert decision.reason == "local: window closes in under min_listed (30m)"
    rhythm = Pool(old_defaults(demand_risk=0.2, max_commitment="20m"))
    decision = rhythm.at(0, window_end=_at(300), quiet_until=_at(19))
    assert decision.reason.endswith("by the weekly rhythm")


def test_renewal_is_not_sent_while_a_request_was_refused() -> None:
    pool = Pool(old_defaults(renew_every="10m"))
    pool.listed(17)
    decision = pool.at(30, provider=_shown(_at(137)), refused_until=_at(60))
    assert not any(isinstance(a, List) for a in decision.actions)
    assert decision.state is PoolState.RECLAIMING


BELOW_COST = "market median 0.12 below your power cost 0.15 per GPU-hour"


def test_an_unrented_offer_comes_down_when_the_market_falls_below_the_power_cost() -> None:
    pool = Pool()
    pool.listed(17)
    down = pool.at(20, market_blocked=BELOW_COST)
    assert (down.state, down.actions) == (PoolState.RECLAIMING, (Unlist(),))
    assert down.reason == f"reclaiming: {BELOW_COST}"
    # and an idle pool is not listed while the market stays there
    idle = Pool()
    idle.at(0, market_blocked=BELOW_COST)
    held = idle.at(15)
    assert (held.state, held.actions, held.reason) == (PoolState.LOCAL, (), f"local: {BELOW_COST}")


def test_a_renter_keeps_the_offer_when_the_market_falls_below_the_power_cost() -> None:
    pool = Pool()
    pool.listed(17)
    rented = ProviderView(listed=True, rentals_running=1, locked_until=LOCKED)
    # the rental and the market read land in the same step: the contract runs on
    decision = pool.at(20, provider=rented, market_blocked=BELOW_COST)
    assert (decision.state, decision.actions) == (PoolState.RENTED, ())
    assert pool.at(21).state is PoolState.RENTED


def test_an_offer_whose_end_nobody_knows_is_not_renewed() -> None:
    # e.g. after a restart, before the marketplace shows the offer's end: no renewal can
    # be timed, so none is sent (and nothing breaks) until the end is known again.
    pool = Pool(old_defaults(renew_every="10m"))
    pool.listed(17)
    pool.machine.offer_end = None
    unknown = ProviderView(listed=True, rentals_running=0, offer_end=None)
    assert all(pool.at(m, provider=unknown).actions == () for m in (27, 60, 130))
    assert pool.at(131, provider=_shown(_at(137))).actions == (List(_at(251), renewal=True),)
