"""Reading Vast.ai's market for our machine: comparable rentable offers and the market
metrics (FACTS.md, "Vast.ai market prices").

The reader has its own HTTP client (session, per-endpoint spacing, retries), so a search
that hangs or is rate-limited never delays a call on the reclaim path. It never reads our
machine itself: what it needs of it (GPU model, count, verification, our listed price)
comes from the marketplace watcher's latest status.

Peers are one per machine (the cheapest of its bundles), ours excluded, prices that are not
finite and above zero ignored, converted to host terms by the ratio between our own public
offer (`dph_base / num_gpus`, what a renter pays) and our `listed_gpu_cost` (what we get).
The ratio is read whenever our offer is public and kept; before it was ever seen, prices
are compared in renter terms (ratio 1, said in `note`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from broker.clock import Clock
from broker.errors import ProviderError
from broker.pricing.ask import Market
from broker.pricing.settings import PricingSection
from broker.providers.base import ProviderStatus

log = logging.getLogger(__name__)

SEARCH = "/api/v0/bundles/"
METRICS = "/api/v0/metrics/gpu/current/"
# The CLI's default storage for a search (GB); it shapes dph_total, not dph_base.
SEARCH_STORAGE = 5.0
METRIC_BUCKETS = {1, 2, 4, 8}


@dataclass(frozen=True)
class Machine:
    """What the search needs of our machine, from the marketplace watcher's last read."""

    machine_id: int
    gpu_name: str
    num_gpus: int
    verified: bool
    listed: bool
    listed_gpu_cost: float | None

    @classmethod
    def from_status(cls, status: ProviderStatus) -> Machine | None:
        raw = status.raw
        name, count = raw.get("gpu_name"), raw.get("num_gpus")
        if not isinstance(name, str) or not isinstance(count, int) or count < 1:
            return None
        ident = raw.get("id") or raw.get("machine_id") or status.machine_id
        return cls(
            machine_id=int(str(ident)),
            gpu_name=name,
            num_gpus=count,
            verified=raw.get("verification", "verified") == "verified",
            listed=bool(status.listed),
            listed_gpu_cost=status.price_gpu,
        )


@dataclass(frozen=True)
class MarketRead:
    """One read: the market in host terms, and what it was read from."""

    market: Market
    read_at: datetime
    ratio: float  # renter price / host price
    offers: int  # offers the search returned, before filtering
    p10: float | None = None  # the population's, host terms
    p90: float | None = None
    usage: float | None = None  # share of the population rented
    note: str = ""


def search_body(machine: Machine, limit: int) -> dict[str, Any]:
    """The official CLI's `search offers 'gpu_name=.. num_gpus=..' -o dph_total --limit N`
    (numbers as strings, spaces in GPU names), verification like our machine's."""
    return {
        "verified": {"eq": machine.verified},
        "external": {"eq": False},
        "rentable": {"eq": True},
        "gpu_name": {"eq": machine.gpu_name},
        "num_gpus": {"eq": str(machine.num_gpus)},
        "order": [["dph_total", "asc"]],
        "type": "on-demand",
        "limit": limit,
        "allocated_storage": SEARCH_STORAGE,
    }


def own_offer_body(machine_id: int) -> dict[str, Any]:
    """Our machine's offers whatever their filters (`search offers -n 'machine_id=N'`)."""
    return {
        "machine_id": {"eq": str(machine_id)},
        "order": [["dph_total", "asc"]],
        "type": "on-demand",
        "allocated_storage": SEARCH_STORAGE,
    }


def per_gpu(offer: Mapping[str, Any]) -> float | None:
    """The renter's price per GPU-hour of one offer; None when it is not a usable price."""
    base, count = offer.get("dph_base"), offer.get("num_gpus")
    if isinstance(base, bool) or not isinstance(base, int | float):
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return None
    price = float(base) / count
    return price if math.isfinite(price) and price > 0 else None


def peers_of(offers: list[Any], machine: Machine) -> dict[int, float]:
    """Cheapest renter price per GPU-hour per comparable machine, ours included."""
    out: dict[int, float] = {}
    for offer in offers:
        if not isinstance(offer, dict):
            continue
        ident = offer.get("machine_id")
        if not isinstance(ident, int) or isinstance(ident, bool):
            continue
        if offer.get("gpu_name") != machine.gpu_name or offer.get("num_gpus") != machine.num_gpus:
            continue  # a bundle of part of a machine, or another model
        price = per_gpu(offer)
        if price is not None and (ident not in out or price < out[ident]):
            out[ident] = price
    return out


def ratio_from(offer_price: float | None, listed: float | None) -> float | None:
    if offer_price is None or listed is None or not math.isfinite(listed) or listed <= 0:
        return None
    ratio = offer_price / listed
    return ratio if 0.5 <= ratio <= 3.0 else None  # anything else is not a platform share


class MarketReader(Protocol):
    """What the watcher reads the market through (Vast.ai's API, or the paper market)."""

    ratio: float | None  # renter price / host price, when known

    def knows_machine(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self) -> MarketRead: ...


class VastMarketReader:
    """Reads the market on its own client (see the module docstring)."""

    def __init__(
        self,
        api: Any,  # broker.providers.http.JsonApi (imported lazily by its maker)
        clock: Clock,
        settings: PricingSection,
        machine: Callable[[], Machine | None],
    ) -> None:
        self._api = api
        self._clock = clock
        self.settings = settings
        self._machine = machine
        self.ratio: float | None = None  # renter / host, from our own public offer

    def knows_machine(self) -> bool:
        return self._machine() is not None

    async def start(self) -> None:
        await self._api.start()

    async def close(self) -> None:
        await self._api.close()

    async def read(self) -> MarketRead:
        machine = self._machine()
        if machine is None:
            raise ProviderError("our machine's GPU model is not known yet (no marketplace read)")
        limit = self.settings.search_limit
        answer = await self._api.request("POST", SEARCH, body=search_body(machine, limit))
        offers = answer.get("offers") if isinstance(answer, dict) else None
        if not isinstance(offers, list):
            raise ProviderError(f"Vast.ai: unexpected answer to a search: {answer!r:.200}")
        found = peers_of(offers, machine)
        own = found.pop(machine.machine_id, None)
        if own is None and machine.listed:
            own = await self._own_offer(machine)
        self.ratio = ratio_from(own, machine.listed_gpu_cost) or self.ratio
        ratio = self.ratio or 1.0
        note = "" if self.ratio else "no own offer seen yet: peers compared in renter terms"
        metrics = await self._metrics(machine)
        median = _host(metrics.get("price_median"), ratio)
        return MarketRead(
            market=Market(
                peers=tuple(sorted(p / ratio for p in found.values())),
                truncated=len(offers) >= limit,
                median=median,
            ),
            read_at=self._clock.now(),
            ratio=ratio,
            offers=len(offers),
            p10=_host(metrics.get("price_p10"), ratio),
            p90=_host(metrics.get("price_p90"), ratio),
            usage=_number(metrics.get("usage")),
            note=note,
        )

    async def _own_offer(self, machine: Machine) -> float | None:
        answer = await self._api.request("POST", SEARCH, body=own_offer_body(machine.machine_id))
        offers = answer.get("offers") if isinstance(answer, dict) else None
        if not isinstance(offers, list):
            return None
        return peers_of(offers, machine).get(machine.machine_id)

    async def _metrics(self, machine: Machine) -> Mapping[str, Any]:
        """Our GPU model's row of the market metrics; empty when there is none. A failure
        here is not the search's: the peers alone still price."""
        bucket = str(machine.num_gpus) if machine.num_gpus in METRIC_BUCKETS else "other"
        query = [
            ("verified", "yes" if machine.verified else "no"),
            ("hosting_type", "all"),
            ("num_gpus", bucket),
        ]
        try:
            answer = await self._api.request("GET", METRICS, query=query)
        except ProviderError as err:
            log.debug("market metrics not read: %s", err)
            return {}
        rows = answer.get("gpus") if isinstance(answer, dict) else None
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("gpu_name") == machine.gpu_name:
                return row
        return {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _host(value: object, ratio: float) -> float | None:
    number = _number(value)
    return number / ratio if number is not None and number > 0 else None
