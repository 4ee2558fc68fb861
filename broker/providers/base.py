"""What the scheduler may ask of a marketplace, whichever one it is.

Each marketplace is one module beside this one (`vast`, `runpod`, `paper`) implementing
`Provider`. Everything here is plain data: a snapshot of what the platform said, with
`None` wherever the platform did not say, because the broker must never guess a GPU free
or a contract over.
"""

from __future__ import annotations

import abc
import builtins
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Literal, Self

from broker.errors import ProviderRejected
from broker.ledger.base import EarningsRecord, EarningsSource


class RentalKind(enum.StrEnum):
    ON_DEMAND = "on-demand"
    INTERRUPTIBLE = "interruptible"
    RESERVED = "reserved"


# What one GPU is doing, as the platform reports it. "unknown" is not "free".
Occupancy = Literal["free", "on-demand", "interruptible", "reserved", "rented", "unknown"]


@dataclass(frozen=True)
class Capabilities:
    can_list: bool
    # Vast lists a whole machine: one offer covers every GPU, so the pool is the machine.
    granularity: Literal["machine", "gpu"]
    can_displace_interruptible: bool
    earnings_source: EarningsSource
    # Said to the user by `check` and `status` (e.g. RunPod: list in its dashboard).
    note: str = ""


@dataclass(frozen=True)
class Offer:
    """What to list: prices in USD, and the end date every new contract will keep."""

    price_gpu: float  # USD per GPU-hour, on-demand
    end_date: datetime | None  # None = no end date (the broker itself always sets one)
    min_bid: float | None = None  # USD per GPU-hour, interruptible floor; None = platform's
    min_chunk: int = 1
    price_disk: float | None = None  # USD per GB-month

    def __post_init__(self) -> None:
        if self.end_date is not None and self.end_date.tzinfo is None:
            raise ValueError("Offer.end_date must be timezone-aware")
        if self.price_gpu <= 0:
            raise ValueError("Offer.price_gpu must be above zero")


@dataclass(frozen=True)
class ListResult:
    extended: int  # running contracts the platform moved to the new, later end date


@dataclass(frozen=True)
class Rentals:
    """Running contracts by kind; `unknown_kind` where the platform does not say."""

    on_demand: int = 0
    interruptible: int = 0
    reserved: int = 0
    unknown_kind: int = 0

    @property
    def total(self) -> int:
        return self.on_demand + self.interruptible + self.reserved + self.unknown_kind

    @property
    def only_interruptible(self) -> bool:
        return self.interruptible > 0 and self.total == self.interruptible


@dataclass(frozen=True)
class ProviderStatus:
    machine_id: str
    observed_at: datetime
    listed: bool | None
    offer_end: datetime | None  # when the live offer lapses (None when unlisted or unknown)
    rentals: Rentals
    # One entry per GPU of the machine, in the platform's order.
    gpu_occupancy: tuple[Occupancy, ...]
    # The latest end of any running contract: the GPUs are promised until then.
    locked_until: datetime | None
    online: bool | None
    price_gpu: float | None = None
    min_bid: float | None = None
    # GPUs that renter containers hold per the local Docker engine (see docker.py);
    # None when Docker was not read.
    renter_gpus: RenterGpus | None = None
    note: str = ""
    raw: Mapping[str, object] = field(default_factory=dict, repr=False)

    @property
    def rented(self) -> bool:
        busy = any(o not in ("free", "unknown") for o in self.gpu_occupancy)
        return self.rentals.total > 0 or busy


@dataclass(frozen=True)
class RenterGpus:
    """Which GPUs renter containers hold. `held()` answers None when it cannot tell."""

    ids: frozenset[str]  # indices ("0") or UUIDs ("GPU-...") named by device requests
    all_gpus: bool  # some renter asked for every GPU
    unknown: bool  # some renter holds GPUs we cannot name
    containers: tuple[str, ...] = ()

    def held(self, index: int, uuid: str | None = None) -> bool | None:
        if self.all_gpus or str(index) in self.ids or (uuid is not None and uuid in self.ids):
            return True
        return None if self.unknown else False


class Provider(abc.ABC):
    """A marketplace's host side. Use as `async with provider:` so its session closes."""

    kind: str
    machine_id: str

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open sessions; called by `async with`."""

    def set_deadline(self, deadline: float | None) -> None:  # noqa: B027 - optional hook
        """Bound every marketplace call by `deadline` (the provider's Clock, monotonic
        seconds), or lift the bound (None). The scheduler sets it when it stops, so a stop
        ends within systemd's TimeoutStopSec: once set, calls skip spacing waits, retry
        only while the next try can start before the deadline, and cut each request's
        timeout to what is left; one that cannot finish in time raises
        `ProviderUnavailable`. A provider without network calls ignores it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close sessions; safe to call twice."""

    @abc.abstractmethod
    def make_offer(
        self,
        end_date: datetime | None,
        *,
        load_watts_per_gpu: float | None = None,
        price_per_kwh: float | None = None,
        ask: float | None = None,
    ) -> Offer:
        """The offer the configuration asks for, ending at `end_date`.

        `load_watts_per_gpu` (measured) and `price_per_kwh` (the tariff in force, in
        energy.currency) feed `min_bid = "auto"`. `ask`: the price the market watcher
        chose (`price_gpu = "market"`, broker/pricing/); a marketplace that does not
        price by the market ignores it.
        """

    @abc.abstractmethod
    async def list(self, offer: Offer) -> ListResult:
        """Create or update the offer; returns once the platform shows it live."""

    @abc.abstractmethod
    async def unlist(self, *, urgent: bool = False) -> ProviderStatus | None:
        """Stop new rentals; running contracts continue. Returns once shown unlisted, with
        the state read back to confirm it when the adapter read one (None otherwise): a
        rental that slipped in just before the unlist shows there.

        `urgent`: a local request waits on this call. It skips the spacing meant for
        background polls and retries a rate-limited answer quickly.
        """

    @abc.abstractmethod
    async def status(self, *, urgent: bool = False) -> ProviderStatus:
        """What the platform shows now. `urgent` as for `unlist`."""

    @abc.abstractmethod
    async def earnings(self, first_day: date, last_day: date) -> builtins.list[EarningsRecord]:
        """Per-day earnings for days first_day..last_day (UTC days), inclusive."""

    async def displace_interruptible(self) -> None:
        """Push interruptible renters off the GPUs (only when capabilities allow)."""
        raise ProviderRejected(f"{self.kind}: displacing interruptible renters is not supported")

    async def end_displacement(self) -> None:
        """Undo `displace_interruptible`, letting paused renters resume."""
        raise ProviderRejected(f"{self.kind}: displacing interruptible renters is not supported")

    @abc.abstractmethod
    async def probe(self) -> builtins.list[str]:
        """Verify credentials and the machine; lines saying what was found (for `check`)."""


def auto_min_bid(
    load_watts_per_gpu: float,
    price_per_kwh: float,
    margin: float,
    usd_per_currency: float = 1.0,
) -> float:
    """The interruptible floor in USD per GPU-hour: the power a GPU draws under load, priced
    at the tariff and converted to USD, plus a margin. Below it a bid would lose money."""
    if load_watts_per_gpu < 0 or price_per_kwh < 0 or margin < 0 or usd_per_currency <= 0:
        raise ValueError("auto_min_bid needs non-negative inputs")
    usd = load_watts_per_gpu / 1000.0 * price_per_kwh * usd_per_currency * (1.0 + margin)
    # Vast shows prices to the tenth of a cent; round up so the floor is never below cost.
    return -(-round(usd * 1e6) // 1000) / 1000


def utc_day_bounds(first_day: date, last_day: date) -> tuple[datetime, datetime]:
    """[first_day 00:00 UTC, day after last_day 00:00 UTC)."""
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    end = datetime(last_day.year, last_day.month, last_day.day, tzinfo=UTC) + timedelta(days=1)
    return start, end
