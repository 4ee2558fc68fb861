"""scripts/foresight-bound: the bound's arithmetic on cases worked out by hand."""

from __future__ import annotations

from types import ModuleType

import pytest
from script_module import load_script


@pytest.fixture(scope="module")
def fb() -> ModuleType:
    return load_script("foresight-bound")


def test_bound_fills_the_quietest_hours_first(fb: ModuleType) -> None:
    # 100 h at 0.1 visits/h, 50 h at 1.0, 10 h never visited; 4 refusals allowed:
    # the 10 free hours, then 40 of the quiet ones (4 visits), none of the busy ones.
    rates = {0.01: 0.1, 0.9: 1.0, 0.0: 0.0}
    capacity = {0.01: 100.0, 0.9: 50.0, 0.0: 10.0}
    net, rented = fb.bound(rates, capacity, 4.0, 0.5, 0.0)
    assert rented == {0.0: 10.0, 0.01: pytest.approx(40.0)}
    assert net == pytest.approx(0.5 * 50.0)


def test_bound_counts_held_visits_as_not_refused(fb: ModuleType) -> None:
    # half the visits in rented time are held: the same budget rents twice the hours
    net, rented = fb.bound({1: 0.1}, {1: 100.0}, 4.0, 1.0, 0.5)
    assert rented[1] == pytest.approx(80.0)
    assert net == pytest.approx(80.0)


def test_bound_stops_at_capacity(fb: ModuleType) -> None:
    net, rented = fb.bound({1: 0.1, 2: 0.2}, {1: 10.0, 2: 10.0}, 100.0, 1.0, 0.0)
    assert rented == {1: 10.0, 2: 10.0}
    assert net == pytest.approx(20.0)


def test_union_merges_overlapping_and_touching_spans(fb: ModuleType) -> None:
    spans = [(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0), (6.0, 6.5)]
    assert fb._union(spans) == [(0.0, 4.0), (5.0, 7.0)]


def test_take_uses_the_best_stretches(fb: ModuleType) -> None:
    stretches = [(2.0, 0.3), (5.0, 0.1)]  # best first, as _bid_channel returns them
    assert fb._take(stretches, 3.0) == pytest.approx(2 * 0.3 + 1 * 0.1)
    assert fb._take(stretches, 100.0) == pytest.approx(0.6 + 0.5)
    assert fb._take(stretches, 0.0) == 0.0
