"""The fleet report: one report per host of a shared ledger, and their sum.

Each host's report is `compute_report` over that host's rows, exactly what that host's own
`gpu-broker report` prints; the fleet's rows are the hosts' rows added period by period, so
`--host all` always equals the sum of the hosts' own reports. The periods, the time zone and
the tariff are those of the config that asks (a fleet owner's, or any one broker's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from rich.console import Group
from rich.text import Text

from broker.config import Config
from broker.ledger.base import EnergyTotal, Ledger, host_view
from broker.report.build import (
    BUCKETS,
    Report,
    ReportInputs,
    ReportPlan,
    ReportRow,
    compute_report,
    gpu_states,
    plan_report,
    pool_window,
    read_notes,
)
from broker.report.periods import By
from broker.report.prices import price_summary, read_prices
from broker.report.render import to_csv_text, to_text


@dataclass(frozen=True)
class FleetReport:
    hosts: dict[str, Report]  # by host name, sorted
    fleet: Report  # the hosts' reports added up

    def to_json(self) -> dict[str, Any]:
        return {
            "hosts": {name: report.to_json() for name, report in self.hosts.items()},
            "fleet": self.fleet.to_json(),
        }


def add_rows(rows: Sequence[ReportRow]) -> ReportRow:
    """Rows of one period (or the totals) from several hosts, added up. Earnings count as
    the providers' own only when every host's do."""
    first = rows[0]
    return replace(
        first,
        hours={b: sum(r.hours[b] for r in rows) for b in BUCKETS},
        rented_gpu_hours=sum(r.rented_gpu_hours for r in rows),
        earnings=sum(r.earnings for r in rows),
        earnings_source=(
            "provider" if all(r.earnings_source == "provider" for r in rows) else "estimate"
        ),
        energy_kwh={b: sum(r.energy_kwh[b] for r in rows) for b in BUCKETS},
        energy_cost=sum(r.energy_cost for r in rows),
        extra_energy_cost=sum(r.extra_energy_cost for r in rows),
        co2_kg=sum(r.co2_kg for r in rows),
        held_requests=sum(r.held_requests for r in rows),
        rejected_requests=sum(r.rejected_requests for r in rows),
    )


def add_reports(reports: Sequence[Report]) -> Report:
    first = reports[0]
    rows = [add_rows([r.rows[i] for r in reports]) for i in range(len(first.rows))]
    return replace(first, rows=rows, totals=add_rows([r.totals for r in reports]))


async def build_fleet_report(
    ledger: Ledger,
    hosts: Sequence[str],
    config: Config,
    *,
    since: datetime,
    until: datetime,
    now: datetime,
    by: By = "day",
    gpu: int | None = None,
    energy_from: Ledger | None = None,
) -> FleetReport:
    """Each of `hosts`' report and their sum. The periods and tariff slices are worked out
    once, and the energy and state intervals of every host read in one query each; the
    energy through `energy_from` when given (a second connection to the same store), at the
    same time as the rest."""
    names = sorted(set(hosts))
    if not names:
        raise ValueError("the ledger holds no host's records yet")
    plan = plan_report(config, since=since, until=until, now=now, by=by, gpu=gpu)
    inputs = await read_fleet_inputs(ledger, names, plan, energy_from)
    reports = {host: compute_report(plan, inputs[host], config) for host in names}
    fleet = add_reports(list(reports.values()))
    # The fleet's price line is summarised from every host's prices, not the first host's.
    prices = price_summary(
        [p for host in names for p in inputs[host].prices],
        earnings=fleet.totals.earnings,
        rented_gpu_hours=fleet.totals.rented_gpu_hours,
        usd_per_currency=config.provider.usd_per_currency,
    )
    return FleetReport(reports, replace(fleet, prices=prices))


async def read_fleet_inputs(
    ledger: Ledger, hosts: Sequence[str], plan: ReportPlan, energy_from: Ledger | None = None
) -> dict[str, ReportInputs]:
    """What `read_inputs` reads for each host, the large reads done for all hosts at once."""

    async def energy() -> tuple[dict[str, list[EnergyTotal]], dict[str, list[EnergyTotal]]]:
        source = energy_from or ledger
        spans = await source.energy_totals_by_host(hosts, plan.slices.cuts, plan.gpu)
        if plan.baseline_in_spans:
            return spans, spans
        window = [plan.baseline_start, plan.end]
        return spans, await source.energy_totals_by_host(hosts, window, plan.gpu)

    async def rest() -> dict[str, ReportInputs]:
        pool = await ledger.state_intervals_by_host(hosts, *pool_window(plan), scope="pool")
        gpus = await ledger.state_intervals_by_host(
            hosts, plan.day0, plan.day_end, scope="gpu", states=gpu_states(plan)
        )
        out: dict[str, ReportInputs] = {}
        for host in hosts:
            # Earnings, notes and prices are a few rows a day: read per host.
            async with host_view(ledger, host) as view:
                out[host] = ReportInputs(
                    energy=[],
                    baseline_energy=[],
                    pool=pool.get(host, []),
                    gpus=gpus.get(host, []),
                    earnings=await view.earnings(plan.first_day, plan.last_day),
                    notes=await read_notes(view, plan),
                    prices=await read_prices(view, plan.since, plan.end),
                )
        return out

    if energy_from is None or energy_from is ledger:
        (spans, baseline), inputs = await energy(), await rest()
    else:
        (spans, baseline), inputs = await asyncio.gather(energy(), rest())
    return {
        host: replace(
            inputs[host], energy=spans.get(host, []), baseline_energy=baseline.get(host, [])
        )
        for host in hosts
    }


def fleet_to_text(report: FleetReport, width: int = 160) -> Group:
    parts: list[Text] = []
    for name, one in [*report.hosts.items(), ("fleet (all hosts)", report.fleet)]:
        parts.append(Text(f"\nhost {name}" if name in report.hosts else f"\n{name}", "bold"))
        parts.append(to_text(one, width))
    return Group(*parts)


def fleet_to_csv_text(report: FleetReport) -> str:
    """The single-host CSV with a first column `host` ("all" for the fleet's rows)."""
    out: list[str] = []
    for name, one in [*report.hosts.items(), ("all", report.fleet)]:
        lines = to_csv_text(one).splitlines()
        if not out:
            out.append("host," + lines[0])
        out.extend(f"{name},{line}" for line in lines[1:])
    return "\n".join(out) + "\n"
