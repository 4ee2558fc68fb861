"""The fleet report: one report per host of a shared ledger, and their sum.

Each host's report is `build_report` over that host's rows, exactly what that host's own
`gpu-broker report` prints; the fleet's rows are the hosts' rows added period by period, so
`--host all` always equals the sum of the hosts' own reports. The periods, the time zone and
the tariff are those of the config that asks (a fleet owner's, or any one broker's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from rich.console import Group
from rich.text import Text

from broker.config import Config
from broker.ledger.base import Ledger
from broker.report.build import BUCKETS, Report, ReportRow, build_report
from broker.report.periods import By
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
) -> FleetReport:
    """Each of `hosts`' report, read through `ledger.for_host`, and their sum."""
    reports: dict[str, Report] = {}
    for host in sorted(set(hosts)):
        view = ledger if host == ledger.host else await ledger.for_host(host)
        try:
            reports[host] = await build_report(
                view, config, since=since, until=until, now=now, by=by, gpu=gpu
            )
        finally:
            if view is not ledger:
                await view.close()
    if not reports:
        raise ValueError("the ledger holds no host's records yet")
    return FleetReport(reports, add_reports(list(reports.values())))


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
