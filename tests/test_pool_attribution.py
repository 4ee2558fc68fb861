"""Whose is the GPU activity (broker.scheduling.attribution), step by step (issue 21).

What each test pins is what the pool machine is then told: whether every busy GPU is a
renter's, which GPUs nobody explains, and whether the provider view is newer than that.
"""

from __future__ import annotations

from broker.scheduling.attribution import Activity, Attribution


def test_a_gpu_busy_under_a_renter_stays_the_renters_until_seen_idle() -> None:
    who = Attribution()
    first = who.update({0: True, 1: False}, {0}, reads_started=1, view_read=1)
    assert first == Activity(True, frozenset(), True)
    # the rental is gone from the view, the load lingers: still the renter's
    lingering = who.update({0: True, 1: False}, set(), reads_started=2, view_read=2)
    assert lingering == Activity(True, frozenset(), True)
    # seen idle once: the next load on it is nobody's
    who.update({0: False, 1: False}, set(), reads_started=2, view_read=2)
    after = who.update({0: True, 1: False}, set(), reads_started=3, view_read=2)
    assert after == Activity(False, frozenset({0}), False)


def test_a_renter_shown_on_an_idle_gpu_does_not_own_it() -> None:
    who = Attribution()
    assert who.update({0: False}, {0}, reads_started=1, view_read=1) == Activity(
        False, frozenset(), True
    )
    assert who.renters_own == set()
    # nor does a busy GPU the renter is not shown on become the renter's
    busy = who.update({0: False, 1: True}, {0}, reads_started=1, view_read=1)
    assert busy == Activity(False, frozenset({1}), False)
    assert who.renters_own == set()


def test_unexplained_activity_is_local_only_after_a_newer_read() -> None:
    who = Attribution()
    seen = who.update({0: True}, set(), reads_started=4, view_read=4)
    assert seen == Activity(False, frozenset({0}), False)  # read 4 began before it
    assert who.update({0: True}, set(), reads_started=5, view_read=4).view_after_activity is False
    newer = who.update({0: True}, set(), reads_started=5, view_read=5)
    assert newer == Activity(False, frozenset({0}), True)
    # once quiet, the mark is dropped: new activity waits for a newer read again
    assert who.update({0: False}, set(), reads_started=5, view_read=5) == Activity(
        False, frozenset(), True
    )
    again = who.update({0: True}, set(), reads_started=6, view_read=5)
    assert again == Activity(False, frozenset({0}), False)


def test_blind_telemetry_keeps_what_is_known() -> None:
    who = Attribution()
    who.update({0: True}, set(), reads_started=3, view_read=3)
    blind = who.update(None, set(), reads_started=3, view_read=3)
    assert blind == Activity(False, frozenset(), False)
    assert who.update(None, set(), reads_started=4, view_read=4) == Activity(
        False, frozenset(), True
    )
    assert Attribution().update(None, {0}, reads_started=0, view_read=0) == Activity(
        False, frozenset(), True
    )


def test_one_renter_gpu_and_one_unexplained_is_not_all_renters() -> None:
    who = Attribution()
    mixed = who.update({0: True, 1: True}, {0}, reads_started=2, view_read=2)
    assert mixed == Activity(False, frozenset({1}), False)
