"""One `simulate` run: every policy over the same demand and renters, then the oracle."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from broker.config import Config, PolicySection
from broker.pricing.settings import PricingSection
from broker.scheduling.windows import Calendar
from broker.simulation.competition import CompetingMarket
from broker.simulation.economics import EnergyPrice, Machine
from broker.simulation.inputs import Renter, Request
from broker.simulation.oracle import solve
from broker.simulation.replay import Timings, Totals, replay


@dataclass(frozen=True)
class Row:
    policy: str
    net: float
    extra_net: float
    earnings: float
    energy_cost: float
    extra_energy_cost: float
    rented_gpu_hours: float
    listings: int
    renewals: int
    rentals: int
    renters_turned_away: int
    requests: int
    requests_held: int
    requests_refused: int
    visits_refused: int
    wait_p50: float
    wait_p95: float
    wait_max: float
    share_of_oracle: float | None

    def as_json(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "net": round(self.net, 2),
            "extra_net": round(self.extra_net, 2),
            "earnings": round(self.earnings, 2),
            "energy_cost": round(self.energy_cost, 2),
            "extra_energy_cost": round(self.extra_energy_cost, 2),
            "rented_gpu_hours": round(self.rented_gpu_hours, 2),
            "listings": self.listings,
            "renewals": self.renewals,
            "rentals": self.rentals,
            "renters_turned_away": self.renters_turned_away,
            "requests": self.requests,
            "requests_held": self.requests_held,
            "requests_refused": self.requests_refused,
            "visits_refused": self.visits_refused,
            "wait_s": {
                "p50": round(self.wait_p50, 1),
                "p95": round(self.wait_p95, 1),
                "max": round(self.wait_max, 1),
            },
            "share_of_oracle": (
                None if self.share_of_oracle is None else round(self.share_of_oracle, 4)
            ),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values (nobody waited)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _row(name: str, t: Totals) -> Row:
    return Row(
        policy=name,
        net=t.net,
        extra_net=t.extra_net,
        earnings=t.earnings,
        energy_cost=t.energy_cost,
        extra_energy_cost=t.extra_energy_cost,
        rented_gpu_hours=t.rented_gpu_hours,
        listings=t.listings,
        renewals=t.renewals,
        rentals=t.rentals,
        renters_turned_away=t.renters_turned_away,
        requests=t.requests,
        requests_held=t.held,
        requests_refused=t.refused,
        visits_refused=t.visits_refused,
        wait_p50=percentile(t.waits, 0.5),
        wait_p95=percentile(t.waits, 0.95),
        wait_max=max(t.waits, default=0.0),
        share_of_oracle=None,
    )


def _share(net: float, oracle: float) -> float | None:
    return net / oracle if oracle > 0 else None


def simulate(
    config: Config,
    policies: Sequence[tuple[str, PolicySection]],
    demand: Sequence[Request],
    renters: Sequence[Renter],
    start: datetime,
    end: datetime,
    *,
    timings: Timings | None = None,
    progress: Callable[[float], None] | None = None,
    pricing: Mapping[str, PricingSection | None] | None = None,
    competition: Callable[[], CompetingMarket] | None = None,
) -> list[Row]:
    """A row per policy, then the oracle's (its max_commitment is the first policy's)."""
    machine = Machine.from_config(config)
    price = EnergyPrice(config, start.timestamp(), end.timestamp())
    timings = timings or Timings.from_config(config)
    rows: list[Row] = []
    for k, (name, policy) in enumerate(policies):
        def part(x: float, k: int = k) -> None:
            if progress is not None:
                progress((k + x) / (len(policies) + 0.2))

        sim = replay(
            config, policy, demand, renters, start, end,
            timings=timings, machine=machine, price=price, progress=part,
            competition=competition() if competition is not None else None,
            pricing=(pricing or {}).get(name),
        )  # fmt: skip
        rows.append(_row(name, sim.totals))
    calendar = Calendar.from_config(config.windows, config.broker.tz)
    windows = [
        (i.start.timestamp(), i.end.timestamp()) for i in calendar.intervals(start, end)
    ]
    best = solve(
        demand, renters, windows,
        max_commitment_s=policies[0][1].max_commitment.total_seconds(),
        machine=machine, price=price, start=start.timestamp(), end=end.timestamp(),
    )  # fmt: skip
    oracle = Row(
        policy="oracle",
        net=best.net,
        extra_net=best.extra_net,
        earnings=best.earnings,
        energy_cost=best.energy_cost,
        extra_energy_cost=best.extra_energy_cost,
        rented_gpu_hours=best.rented_gpu_hours,
        listings=len(best.rentals),
        renewals=0,
        rentals=len(best.rentals),
        renters_turned_away=0,
        requests=rows[0].requests if rows else len(demand),
        requests_held=0,
        requests_refused=0,
        visits_refused=0,
        wait_p50=0.0,
        wait_p95=0.0,
        wait_max=0.0,
        share_of_oracle=1.0 if best.net > 0 else None,
    )
    if progress is not None:
        progress(1.0)
    out = [
        Row(**{**r.__dict__, "share_of_oracle": _share(r.net, best.net)}) for r in rows
    ]
    return [*out, oracle]
