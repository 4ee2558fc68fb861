"""Vast.ai's contract rules, as the paper market and the fake Vast server apply them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from broker.providers.base import RentalKind
from broker.providers.contracts import ContractBook, RentRefused

T0 = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)
H = timedelta(hours=1)


def test_paused_interruptible_renters_earn_nothing_and_resume() -> None:
    book = ContractBook(num_gpus=2)
    book.list_offer(T0, 0.5, T0 + 10 * H, min_bid=0.1)
    bid = book.rent(T0, RentalKind.INTERRUPTIBLE, 2, bid=0.2)
    firm = book.rent(T0 + H, RentalKind.ON_DEMAND, 1)
    assert book.occupancy_tokens() == ["D", "x"]  # the bid needs two GPUs: it pauses
    assert bid.paused
    book.end(T0 + 2 * H, firm.id)
    assert book.occupancy_tokens() == ["I", "I"] and not bid.paused
    book.advance(T0 + 3 * H)
    # 1 h of the bid (0.4) + 1 h on-demand (0.5) + 1 h of the bid again (0.4).
    assert book.earnings_by_day[date(2026, 11, 25)] == pytest.approx(1.3)


def test_a_later_end_extends_bids_at_or_above_the_new_floor() -> None:
    book = ContractBook(num_gpus=4)
    book.list_offer(T0, 0.5, T0 + H, min_bid=0.1)
    low = book.rent(T0, RentalKind.INTERRUPTIBLE, 1, bid=0.1)
    high = book.rent(T0, RentalKind.INTERRUPTIBLE, 1, bid=0.3)
    assert book.list_offer(T0, 0.5, T0 + 5 * H, min_bid=0.2) == 1
    assert (low.end, high.end) == (T0 + H, T0 + 5 * H)
    assert book.locked_until() == T0 + 5 * H


def test_nothing_displaces_on_demand() -> None:
    book = ContractBook(num_gpus=2)
    book.list_offer(T0, 0.5, T0 + H)
    book.rent(T0, RentalKind.RESERVED, 2)
    with pytest.raises(RentRefused):
        book.rent(T0, RentalKind.ON_DEMAND, 1)
    with pytest.raises(RentRefused):
        book.rent(T0, RentalKind.INTERRUPTIBLE, 1, bid=1.0)


def test_min_chunk_and_the_offer_lapsing() -> None:
    book = ContractBook(num_gpus=4)
    book.list_offer(T0, 0.5, T0 + H, min_chunk=2)
    with pytest.raises(RentRefused, match="at least 2"):
        book.rent(T0, RentalKind.ON_DEMAND, 1)
    book.advance(T0 + 2 * H)
    assert not book.offer.listed
    with pytest.raises(RentRefused, match="not listed"):
        book.rent(T0 + 2 * H, RentalKind.ON_DEMAND, 2)
