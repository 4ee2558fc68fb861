"""The report as a terminal table, CSV or JSON text. Formatting only: no figures made here."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from rich.text import Text

from broker.report.build import BUCKETS, Report, ReportRow

CSV_HEADER = [
    "period",
    "gpu",
    "currency",
    *(f"hours_{b}" for b in BUCKETS),
    "rented_gpu_hours",
    "earnings",
    "earnings_source",
    *(f"energy_kwh_{b}" for b in BUCKETS),
    "energy_cost",
    "net",
    "extra_energy_cost",
    "extra_net",
    "co2_kg",
    "held_requests",
    "rejected_requests",
]


def to_json_text(report: Report) -> str:
    """The JSON object, a row to a line: easy to read, to diff and to grep."""
    data = report.to_json()
    head = ", ".join(f"{json.dumps(key)}: {json.dumps(data[key])}" for key in list(data)[:4])
    rows = ",\n".join(f"  {json.dumps(row)}" for row in data["rows"])
    totals = json.dumps(data["totals"])
    prices = f',\n "prices": {json.dumps(data["prices"])}' if "prices" in data else ""
    return f'{{{head},\n "rows": [\n{rows}\n ],\n "totals": {totals}{prices}}}\n'


def to_csv_text(report: Report) -> str:
    """One header row, one row per period, then the totals as a row whose period is
    `total` (filter it out before summing a column)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in [*report.rows, report.totals]:
        data = row.to_json()
        writer.writerow(
            [
                data["period"],
                data["gpu"],
                report.currency,
                *(data["hours"][b] for b in BUCKETS),
                data["rented_gpu_hours"],
                data["earnings"],
                data["earnings_source"],
                *(data["energy_kwh"][b] for b in BUCKETS),
                data["energy_cost"],
                data["net"],
                data["extra_energy_cost"],
                data["extra_net"],
                data["co2_kg"],
                data["held_requests"],
                data["rejected_requests"],
            ]
        )
    return buffer.getvalue()


@dataclass(frozen=True)
class _Units:
    """Units and decimals the table picks so that the figures show: a short run's 0.02 h,
    0.004 kWh and 0.0012 EUR would all print as zeros in hours, kWh and cents."""

    hours: tuple[str, float, int]  # header, factor from hours, decimals
    energy: tuple[str, float, int]  # from kWh
    co2: tuple[str, float, int]  # from kg
    money_decimals: int

    @classmethod
    def pick(cls, rows: list[ReportRow]) -> _Units:
        hours = [v for r in rows for v in (*r.hours.values(), r.rented_gpu_hours)]
        energy = [v for r in rows for v in r.energy_kwh.values()]
        money = [
            v
            for r in rows
            for v in (r.energy_cost, r.earnings, r.net, r.extra_energy_cost, r.extra_net)
        ]
        co2 = [r.co2_kg for r in rows]
        return cls(
            hours=("min", 60.0, 1) if _top(hours) < 1 else ("h", 1.0, 2),
            energy=("Wh", 1000.0, 1) if _top(energy) < 1 else ("kWh", 1.0, 2),
            co2=("kg", 1.0, _decimals(co2)),
            money_decimals=_decimals(money),
        )


def _top(values: list[float]) -> float:
    return max((abs(v) for v in values), default=0.0)


def _decimals(values: list[float]) -> int:
    """Two decimals, or up to five so the smallest amount shows two significant digits."""
    small = min((abs(v) for v in values if abs(v) >= 1e-9), default=1.0)
    return max(2, min(5, 1 - math.floor(math.log10(small))))


def _fixed(value: float, decimals: int) -> str:
    return f"{round(value, decimals) + 0.0:.{decimals}f}"  # + 0.0: never "-0.00"


Column = tuple[str, str, Callable[[ReportRow], str]]  # two header lines, the cell


def _columns(report: Report, units: _Units) -> tuple[list[Column], list[Column]]:
    """The hours-and-requests columns and the energy-and-money columns."""
    cur = report.currency
    h_unit, h_factor, h_dec = units.hours
    e_unit, e_factor, e_dec = units.energy
    c_unit, c_factor, c_dec = units.co2
    m_dec = units.money_decimals

    def earned(row: ReportRow) -> str:
        mark = "~" if row.earnings_source == "estimate" and row.earnings else ""
        return f"{mark}{_fixed(row.earnings, m_dec)}"

    hours: list[Column] = [
        *((b, h_unit, lambda r, b=b: _fixed(r.hours[b] * h_factor, h_dec)) for b in BUCKETS),
        ("rented", f"GPU-{h_unit}", lambda r: _fixed(r.rented_gpu_hours * h_factor, h_dec)),
    ]
    requests: list[Column] = [
        ("", "held", lambda r: str(r.held_requests)),
        ("", "rejected", lambda r: str(r.rejected_requests)),
    ]
    energy: list[Column] = [
        *((b, e_unit, lambda r, b=b: _fixed(r.energy_kwh[b] * e_factor, e_dec)) for b in BUCKETS),
    ]
    money: list[Column] = [
        ("cost", cur, lambda r: _fixed(r.energy_cost, m_dec)),
        ("earned", cur, earned),
        ("net", cur, lambda r: _fixed(r.net, m_dec)),
        ("extra", "cost", lambda r: _fixed(r.extra_energy_cost, m_dec)),
        ("extra", "net", lambda r: _fixed(r.extra_net, m_dec)),
        ("CO2", c_unit, lambda r: _fixed(r.co2_kg * c_factor, c_dec)),
    ]
    return [*hours, *requests], [*energy, *money]


def _lay_out(by: str, columns: list[Column], rows: list[ReportRow]) -> list[str]:
    """Header (two lines), a rule, the periods, a rule, the totals: right-aligned columns."""
    table = [
        ["", by, *(r.period for r in rows)],
        *([top, bottom, *(cell(r) for r in rows)] for top, bottom, cell in columns),
    ]
    widths = [max(len(text) for text in column) for column in table]
    lines = []
    for i in range(len(rows) + 2):
        first = table[0][i].ljust(widths[0])
        rest = (column[i].rjust(width) for column, width in zip(table[1:], widths[1:], strict=True))
        lines.append("  ".join([first, *rest]))
    rule = "─" * len(lines[0])
    return [*lines[:2], rule, *lines[2:-1], rule, lines[-1]]


def to_text(report: Report, width: int = 160) -> Text:
    """The report as a table: one, or on a console too narrow for it two (hours and
    requests, then energy and money), each with its totals line in bold.

    Laid out here rather than with rich's Table, which takes over a second for a year of
    days; rich only prints it.
    """
    tz = ZoneInfo(report.timezone)
    span = (
        f"{report.start.astimezone(tz):%Y-%m-%d %H:%M} to "
        f"{report.end.astimezone(tz):%Y-%m-%d %H:%M} {report.timezone}"
    )
    who = "all GPUs" if report.gpu is None else f"GPU {report.gpu}"
    rows = [*report.rows, report.totals]
    units = _Units.pick(rows)
    first, second = _columns(report, units)
    hours, requests = first[:-2], first[-2:]
    tables = [_lay_out(report.by, [*hours, *second, *requests], rows)]
    if len(tables[0][0]) > width:
        tables = [_lay_out(report.by, first, rows), _lay_out(report.by, second, rows)]
    text = Text(f"Earnings and energy by {report.by}, {who}, {span} ({report.currency})\n")
    for lines in tables:
        text.append("\n")
        text.append("\n".join(lines[:-1]) + "\n")
        text.append(lines[-1] + "\n", style="bold")
    if report.prices is not None:
        text.append(f"\nPrices: {report.prices.line()}\n")
    text.append(
        f"\n{units.hours[0]}: time in each state; {units.energy[0]}: energy drawn in each "
        "state; cost and CO2: of the energy drawn while listed or rented; extra: only what "
        "renting drew above the idle server's own draw; ~: estimated earnings",
        style="dim",
    )
    return text
