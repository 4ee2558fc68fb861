"""The market watcher: reads the market every `refresh` on its own task (a `Poller`, like
the other watchers), outside the decision loop and never on the reclaim path, and keeps the
ask the next listing or renewal uses.

A failed read keeps the last good view (the poller logs the first failure and the recovery
only). A read that cannot price (truncated search, too few peers) keeps the last ask and
says why, logged when the reason changes. The ask itself is decided in `ask.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.clock import Clock
from broker.errors import ProviderError
from broker.ledger.base import PriceRecord
from broker.pricing.ask import Target, decayed, market_median, next_ask, rank, target
from broker.pricing.market import MarketRead, MarketReader
from broker.pricing.settings import PricingSection
from broker.scheduling.watch import Poller

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PricingStatus:
    """What `status`, the API and /metrics show."""

    ask: float | None
    floor: float | None
    market_median: float | None
    rank: int | None
    peers: int | None
    searched_at: datetime | None
    reason: str
    below_floor: bool
    read_error: str | None
    # The whole population's (rented machines too), from the market metrics: host terms.
    market_p10: float | None = None
    market_p90: float | None = None
    usage: float | None = None  # the population's share rented


    def as_json(self) -> dict[str, Any]:
        return {
            "ask": self.ask,
            "floor": self.floor,
            "market_median": None if self.market_median is None else round(self.market_median, 4),
            "rank": self.rank,
            "peers": self.peers,
            "searched_at": self.searched_at.isoformat() if self.searched_at else None,
            "reason": self.reason,
            "below_floor": self.below_floor,
            "read_error": self.read_error,
            "market_p10": None if self.market_p10 is None else round(self.market_p10, 4),
            "market_p90": None if self.market_p90 is None else round(self.market_p90, 4),
            "usage": self.usage,
        }


def listing_blocker(verdict: Target, ask: float | None) -> str | None:
    """Why a read's verdict forbids a listing: the market median below the floor, or no
    ask formed yet (none in force and none from this read). None when it allows one."""
    if verdict.below_floor:
        return verdict.reason
    if verdict.price is None and ask is None:
        return f"no market ask yet: {verdict.reason}"
    return None


class PriceWatch:
    def __init__(
        self,
        reader: MarketReader,
        clock: Clock,
        settings: PricingSection,
        floor: Callable[[], float],
        *,
        on_update: Callable[[], None] | None = None,
        record: Callable[[PriceRecord], Awaitable[None]] | None = None,
    ) -> None:
        self.reader = reader
        self._record = record  # each read's market median, into the ledger
        self._clock = clock
        self.settings = settings
        self._floor = floor  # USD per GPU-hour, from the tariff in force (auto) or config
        self.ask: float | None = None  # the ask in force (the last listed at)
        self._changed_at: float | None = None  # monotonic time the ask last changed
        self._unrented_since: float | None = None  # listed and unrented since (decay)
        self._reason = "no market read yet"
        # The ask in force was formed before our own offer was ever seen, so peers were
        # compared in renter terms: corrected at the first read that sees our offer,
        # without waiting out `refresh`.
        self.provisional = False
        # The last read could not start: our machine had not been read yet.
        self.awaiting_machine = False
        self.poller: Poller[MarketRead] = Poller(
            "market prices", self._fetch, clock, lambda: settings.refresh.total_seconds(),
            on_update=on_update,
            describe=lambda err: str(err) if isinstance(err, ProviderError)
            else f"unexpected {type(err).__name__}: {err}",
        )  # fmt: skip

    async def _fetch(self, urgent: bool) -> MarketRead:
        self.awaiting_machine = not self.reader.knows_machine()
        read = await self.reader.read()
        verdict = target(read.market, self.settings, self._floor())
        if verdict.reason != self._reason:
            level = logging.INFO if verdict.price is not None else logging.WARNING
            log.log(level, "market prices: %s", verdict.reason)
            self._reason = verdict.reason
        median = market_median(read.market)
        if median is not None and self._record is not None:
            peers = len(read.market.peers)
            await self._record(PriceRecord(read.read_at, "market", median, peers))
        return read

    def target(self) -> Target | None:
        """Where the last good read puts the ask; None before any."""
        read = self.poller.latest
        return None if read is None else target(read.market, self.settings, self._floor())

    def blocker(self) -> str | None:
        """Why the pool must not be (or stay) listed now: the market median is below the
        floor, or no ask could be formed yet. None when it may."""
        verdict = self.target()
        if verdict is None:
            return None if self.ask is not None else "no market price read yet"
        return listing_blocker(verdict, self.ask)

    def adopt(self, listed_price: float | None) -> None:
        """The platform shows our offer listed at `listed_price` while no ask is in force
        (a restart): that is the ask in force, so a renewal while a renter runs keeps it."""
        if self.ask is None and listed_price is not None and listed_price > 0:
            self.ask = listed_price
            self._changed_at = self._clock.monotonic()

    def note_rented(self, rented: bool, listed: bool) -> None:
        """The marketplace's latest view: decay counts listed-and-unrented time only (and
        a read that waited for our machine to be known goes now)."""
        if (
            self.awaiting_machine
            and self.reader.knows_machine()  # not before: the read would fail at once again
            and not self.poller.fetching
            and not self.poller.refreshing
        ):
            self.awaiting_machine = False
            self.poller.request_refresh()
        if rented or not listed:
            self._unrented_since = None
        elif self._unrented_since is None:
            self._unrented_since = self._clock.monotonic()

    def wanted(self) -> float | None:
        """The market's ask now, decayed while listed and unrented; None: keep the last."""
        verdict = self.target()
        if verdict is None or verdict.price is None:
            return None
        since = self._unrented_since
        if since is None:
            return verdict.price
        return decayed(verdict.price, self._floor(), self.settings, self._clock.monotonic() - since)

    def proposal(self, *, rented: bool) -> float | None:
        """The ask a listing or renewal made now would carry (nothing is changed)."""
        since = None if self._changed_at is None else self._clock.monotonic() - self._changed_at
        if self.provisional and self.reader.ratio is not None:
            since = None
        return next_ask(
            self.ask, self.wanted(), rented=rented, since_change_s=since, settings=self.settings
        )

    def reprice_due(self, *, rented: bool) -> bool:
        """A listing's ask should change now (listed, unrented, moved enough, not too soon)."""
        proposal = self.proposal(rented=rented)
        return self.ask is not None and proposal is not None and proposal != self.ask

    def take(self, *, rented: bool) -> float | None:
        """The ask for a listing or renewal being made now; remembered as the one in force."""
        proposal = self.proposal(rented=rented)
        if proposal is not None and proposal != self.ask:
            if self.ask is not None:
                log.info("ask %.2f -> %.2f USD/GPU-h (%s)", self.ask, proposal, self._reason)
            self.ask = proposal
            self._changed_at = self._clock.monotonic()
            self.provisional = self.reader.ratio is None
        return proposal

    def listed(self) -> None:
        """A listing went up: a provisional ask is corrected at the read right after."""
        if self.provisional:
            self.poller.request_refresh()

    def status(self) -> PricingStatus:
        read = self.poller.latest
        verdict = self.target()
        market = read.market if read is not None else None
        median = market_median(market) if market is not None else None
        return PricingStatus(
            ask=self.ask,
            floor=self._floor(),
            market_median=median,
            rank=rank(self.ask, market.peers) if market and self.ask is not None else None,
            peers=len(market.peers) if market is not None else None,
            searched_at=read.read_at if read is not None else None,
            reason=(verdict.reason if verdict is not None else self._reason)
            + (f" ({read.note})" if read is not None and read.note else ""),
            below_floor=verdict.below_floor if verdict is not None else False,
            read_error=self.poller.error,
            market_p10=read.p10 if read is not None else None,
            market_p90=read.p90 if read is not None else None,
            usage=read.usage if read is not None else None,
        )
