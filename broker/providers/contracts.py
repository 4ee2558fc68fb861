"""Vast.ai's contract rules as a small, clock-free model.

The paper market runs on it, and the fake Vast server in the tests does too, so both
behave like the platform (FACTS.md):
- a rental keeps the offer's end date and price from the moment it starts;
- unlisting, repricing or moving the end date earlier shortens nothing; unlisting only
  stops new rentals, and the offer lapses by itself at its end date;
- moving the end date later (at the same or a lower price) extends running contracts;
- on-demand and reserved rentals displace interruptible ones, which pause and resume when
  GPUs free up again; nothing displaces on-demand or reserved;
- earnings accrue per GPU-hour actually running, split by UTC day.
Every method takes `now`; the caller owns time.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from broker.providers.base import Occupancy, RentalKind, Rentals

_TOKENS: dict[RentalKind, str] = {
    RentalKind.ON_DEMAND: "D",
    RentalKind.INTERRUPTIBLE: "I",
    RentalKind.RESERVED: "R",
}


class RentRefused(Exception):
    """A renter could not rent (unlisted, too few GPUs, bid under the floor)."""


@dataclass
class Contract:
    id: int
    kind: RentalKind
    gpus: int
    price_gpu: float  # USD per GPU-hour, locked at rental time (the bid for interruptible)
    start: datetime
    end: datetime  # the offer's end date at rental time, later only by extension
    leaves_at: datetime | None = None  # the renter stops earlier of their own accord
    self_rental: bool = False  # the host renting its own offer: free, blocks renters
    ended_at: datetime | None = None
    paused: bool = False
    gpu_indices: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return self.ended_at is None

    @property
    def stops_at(self) -> datetime:
        return min(self.end, self.leaves_at) if self.leaves_at else self.end


@dataclass
class OfferState:
    listed: bool = False
    price_gpu: float = 0.0
    min_bid: float | None = None
    min_chunk: int = 1
    end_date: datetime | None = None


@dataclass
class ContractBook:
    num_gpus: int
    offer: OfferState = field(default_factory=OfferState)
    contracts: list[Contract] = field(default_factory=list)
    earnings_by_day: dict[date, float] = field(default_factory=lambda: defaultdict(float))
    _clock: datetime | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    # -- time --------------------------------------------------------------------------

    def advance(self, now: datetime) -> None:
        """Bring the book to `now`: accrue earnings, end contracts, lapse the offer."""
        if self._clock is None:
            self._clock = now
        while True:
            events = [c.stops_at for c in self.active() if c.stops_at <= now]
            if self.offer.listed and self.offer.end_date and self.offer.end_date <= now:
                events.append(self.offer.end_date)
            if not events:
                break
            moment = max(min(events), self._clock)
            self._accrue(moment)
            for contract in self.active():
                if contract.stops_at <= moment:
                    contract.ended_at = contract.stops_at
            if self.offer.listed and self.offer.end_date and self.offer.end_date <= moment:
                self.offer.listed = False
            self._allocate()
        self._accrue(max(now, self._clock))

    def _accrue(self, until: datetime) -> None:
        assert self._clock is not None
        start = self._clock
        while start < until:
            day_end = datetime.combine(start.date() + timedelta(days=1), datetime.min.time())
            day_end = day_end.replace(tzinfo=start.tzinfo)
            stop = min(until, day_end)
            hours = (stop - start).total_seconds() / 3600
            for contract in self.active():
                if not contract.paused and not contract.self_rental:
                    self.earnings_by_day[start.date()] += contract.price_gpu * contract.gpus * hours
            start = stop
        self._clock = max(self._clock, until)

    # -- the host's side ---------------------------------------------------------------

    def list_offer(
        self,
        now: datetime,
        price_gpu: float,
        end_date: datetime | None,
        min_bid: float | None = None,
        min_chunk: int = 1,
    ) -> int:
        """Create or update the offer; returns how many running contracts were extended."""
        self.advance(now)
        self.offer = OfferState(True, price_gpu, min_bid, min_chunk, end_date)
        extended = 0
        if end_date is None:
            return 0
        for contract in self.active():
            if contract.self_rental or end_date <= contract.end:
                continue
            floor = price_gpu if contract.kind != RentalKind.INTERRUPTIBLE else (min_bid or 0.0)
            if floor <= contract.price_gpu:
                contract.end = end_date
                extended += 1
        return extended

    def unlist(self, now: datetime) -> None:
        self.advance(now)
        self.offer.listed = False

    # -- the renters' side -------------------------------------------------------------

    def rent(
        self,
        now: datetime,
        kind: RentalKind,
        gpus: int,
        *,
        bid: float | None = None,
        leaves_at: datetime | None = None,
        self_rental: bool = False,
    ) -> Contract:
        """A renter takes `gpus` GPUs of the live offer (the host may always self-rent)."""
        self.advance(now)
        offer = self.offer
        if not self_rental:
            if not offer.listed:
                raise RentRefused("the machine is not listed")
            if gpus < offer.min_chunk:
                raise RentRefused(f"at least {offer.min_chunk} GPUs per rental")
        if not 1 <= gpus <= self.num_gpus:
            raise RentRefused(f"the machine has {self.num_gpus} GPUs")
        if kind == RentalKind.INTERRUPTIBLE:
            price = bid if bid is not None else (offer.min_bid or 0.0)
            if offer.min_bid is not None and price < offer.min_bid:
                raise RentRefused(f"bid {price} is under the floor {offer.min_bid}")
            if gpus > len(self._free()):
                raise RentRefused("not enough free GPUs for an interruptible rental")
        else:
            price = 0.0 if self_rental else offer.price_gpu
            if gpus > self.num_gpus - len(self._held_by_firm()):
                raise RentRefused("not enough GPUs free of on-demand renters")
        end = offer.end_date if offer.end_date and not self_rental else None
        contract = Contract(
            id=next(self._ids),
            kind=kind,
            gpus=gpus,
            price_gpu=price,
            start=now,
            end=end or datetime.max.replace(tzinfo=now.tzinfo),
            leaves_at=leaves_at,
            self_rental=self_rental,
        )
        contract.gpu_indices = self._pick(contract)
        self.contracts.append(contract)
        self._allocate()
        return contract

    def end(self, now: datetime, contract_id: int) -> None:
        """The renter (or the host, for a self-rental) stops a contract."""
        self.advance(now)
        for contract in self.active():
            if contract.id == contract_id:
                contract.ended_at = now
        self._allocate()

    # -- what the platform shows -------------------------------------------------------

    def active(self) -> list[Contract]:
        return [c for c in self.contracts if c.active]

    def running(self) -> list[Contract]:
        return [c for c in self.active() if not c.paused]

    def rentals(self) -> Rentals:
        running = [c for c in self.running() if not c.self_rental]
        return Rentals(
            on_demand=sum(c.kind == RentalKind.ON_DEMAND for c in running),
            interruptible=sum(c.kind == RentalKind.INTERRUPTIBLE for c in running),
            reserved=sum(c.kind == RentalKind.RESERVED for c in running),
        )

    def occupancy_tokens(self) -> list[str]:
        tokens = ["x"] * self.num_gpus
        for contract in self.running():
            for index in contract.gpu_indices:
                tokens[index] = _TOKENS[contract.kind]
        return tokens

    def occupancy(self) -> tuple[Occupancy, ...]:
        names: dict[str, Occupancy] = {
            "x": "free", "D": "on-demand", "I": "interruptible", "R": "reserved"
        }  # fmt: skip
        return tuple(names[t] for t in self.occupancy_tokens())

    def locked_until(self) -> datetime | None:
        """The latest end of a contract that holds the GPUs (paused ones may come back)."""
        ends = [c.end for c in self.active() if not c.self_rental]
        return max(ends) if ends else None

    # -- GPU assignment ----------------------------------------------------------------

    def _held_by_firm(self) -> set[int]:
        return {
            i
            for c in self.active()
            if c.kind != RentalKind.INTERRUPTIBLE
            for i in c.gpu_indices
        }

    def _free(self) -> list[int]:
        used = {i for c in self.running() for i in c.gpu_indices}
        return [i for i in range(self.num_gpus) if i not in used]

    def _pick(self, contract: Contract) -> tuple[int, ...]:
        """GPUs for a new contract: free ones first; on-demand then takes interruptible
        renters' GPUs, lowest bid first."""
        chosen = self._free()[: contract.gpus]
        if len(chosen) < contract.gpus and contract.kind != RentalKind.INTERRUPTIBLE:
            bids = sorted(
                (c for c in self.running() if c.kind == RentalKind.INTERRUPTIBLE),
                key=lambda c: (c.price_gpu, -c.start.timestamp()),
            )
            for victim in bids:
                for index in victim.gpu_indices:
                    if len(chosen) < contract.gpus and index not in chosen:
                        chosen.append(index)
        return tuple(sorted(chosen))

    def _allocate(self) -> None:
        """Firm contracts keep their GPUs; interruptible ones run where nothing firm is,
        highest bid first, and pause when no GPUs are left for them."""
        firm = self._held_by_firm()
        taken = set(firm)
        bids = sorted(
            (c for c in self.active() if c.kind == RentalKind.INTERRUPTIBLE),
            key=lambda c: (-c.price_gpu, c.start),
        )
        for contract in bids:
            if contract.gpu_indices and not taken & set(contract.gpu_indices):
                contract.paused = False
                taken |= set(contract.gpu_indices)
                continue
            spare = [i for i in range(self.num_gpus) if i not in taken]
            if len(spare) >= contract.gpus:
                contract.gpu_indices = tuple(spare[: contract.gpus])
                contract.paused = False
                taken |= set(contract.gpu_indices)
            else:
                contract.paused = True
