"""What a replay consumes: local requests and renter arrivals, as plain sorted lists.

Times are POSIX seconds (floats): the replay jumps between thousands of events and
datetime arithmetic would cost more than the machine's own step.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from broker.errors import UsageError
from broker.ledger.base import DemandRecord

KINDS = ("on-demand", "interruptible")


class InputError(UsageError):
    """A demand or market file that cannot be read (exit 2: bad usage)."""


@dataclass(frozen=True, slots=True)
class Request:
    at: float
    duration_s: float
    service: str = "ollama"


@dataclass(frozen=True, slots=True)
class Renter:
    """One renter looking at the market: it rents the machine at `at` if it is listed,
    nobody rents it, the price suits and the offer has `min_offer_hours` left or more;
    it then stays `hours` (or until the offer's end, extended by renewals)."""

    at: float
    gpus: int
    hours: float
    kind: str  # "on-demand" | "interruptible"
    max_price: float  # USD per GPU-hour: the most it pays (an interruptible renter's bid)
    min_offer_hours: float


def _time(text: str, where: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        expected = "expected an ISO 8601 time or POSIX seconds"
        raise InputError(f"{where}: {expected}, got {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def _number(text: str, where: str, *, minimum: float = 0.0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise InputError(f"{where}: expected a number of at least {minimum:g}, got {text!r}")
    return value


def _rows(path: Path, required: tuple[str, ...]) -> Iterable[tuple[int, dict[str, str]]]:
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: {err.strerror or err}") from None
    with handle:
        reader = csv.DictReader(row for row in handle if not row.startswith("#"))
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        yield from enumerate(reader, start=2)


def read_demand(path: Path) -> list[Request]:
    """`timestamp,duration_s[,service]`, one local inference request a row."""
    out: list[Request] = []
    for line, row in _rows(path, ("timestamp", "duration_s")):
        where = f"{path}:{line}"
        out.append(
            Request(
                _time(row["timestamp"], where),
                _number(row["duration_s"], where),
                (row.get("service") or "ollama").strip() or "ollama",
            )
        )
    out.sort(key=lambda r: r.at)
    return out


def read_market(path: Path) -> list[Renter]:
    """`timestamp,gpus,hours,kind,max_price,min_offer_hours`, one renter arrival a row."""
    out: list[Renter] = []
    columns = ("timestamp", "gpus", "hours", "kind", "max_price", "min_offer_hours")
    for line, row in _rows(path, columns):
        where = f"{path}:{line}"
        kind = row["kind"].strip().lower().replace("_", "-")
        if kind not in KINDS:
            raise InputError(f"{where}: kind: expected on-demand or interruptible, got {kind!r}")
        out.append(
            Renter(
                _time(row["timestamp"], where),
                int(_number(row["gpus"], where, minimum=1)),
                _number(row["hours"], where),
                kind,
                _number(row["max_price"], where),
                _number(row["min_offer_hours"], where),
            )
        )
    out.sort(key=lambda r: r.at)
    return out


def demand_from_records(records: Iterable[DemandRecord]) -> list[Request]:
    """The ledger's demand record as requests to replay.

    A request ran for its duration less the time it was held. A refused one never ran: it
    is given the mean run time of those that did. A compacted record (`count` > 1) keeps
    only its first arrival and summed durations: its requests are spread from there one
    mean duration apart, which keeps the busy time it stood for."""
    kept = list(records)
    ran = [(r.duration_s - r.held_s, r.count) for r in kept if r.outcome != "refused"]
    runs = sum(c for _, c in ran)
    typical = sum(d for d, _ in ran) / runs if runs else 5.0
    out: list[Request] = []
    for record in kept:
        start = record.arrival.timestamp()
        count = max(1, record.count)
        if record.outcome == "refused":
            mean = typical
        else:
            mean = max(0.0, record.duration_s - record.held_s) / count
        for k in range(count):
            out.append(Request(start + k * mean, mean, record.service))
    out.sort(key=lambda r: r.at)
    return out


@dataclass(frozen=True)
class PaperModel:
    """The paper market's renters (broker/providers/paper.py) drawn ahead of time.

    The paper market's arrival rate falls as exp(-elasticity x overprice) and in
    proportion to the offer's duration up to `full_demand_after`. The same stream comes
    from renters arriving at `arrivals_per_hour`, each with a top price of market x (1 + X),
    X exponential with rate `elasticity`, and a minimum offer duration uniform on
    [0, full_demand_after]: a renter rents when the ask and the duration suit it. Drawn
    once, the renters are the same for every policy and the oracle.
    """

    arrivals_per_hour: float
    market_price_gpu: float
    price_elasticity: float
    full_demand_after_h: float
    interruptible_share: float
    mean_rental_h: float
    seed: int = 0

    def renters(self, start: float, end: float, gpu_count: int) -> list[Renter]:
        rng = random.Random(self.seed)
        out: list[Renter] = []
        if self.arrivals_per_hour <= 0:
            return out
        t = start
        while True:
            t += rng.expovariate(self.arrivals_per_hour) * 3600
            if t >= end:
                return out
            over = rng.expovariate(self.price_elasticity) if self.price_elasticity > 0 else 1e9
            top = self.market_price_gpu * (1 + over)
            interruptible = rng.random() < self.interruptible_share
            if interruptible:
                top = round(self.market_price_gpu * rng.uniform(0.4, 0.9), 3)
            out.append(
                Renter(
                    at=t,
                    gpus=rng.randint(1, gpu_count),
                    hours=rng.expovariate(1 / self.mean_rental_h),
                    kind="interruptible" if interruptible else "on-demand",
                    max_price=top,
                    min_offer_hours=rng.uniform(0, self.full_demand_after_h),
                )
            )
