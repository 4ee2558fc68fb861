"""The report as a terminal table, CSV or JSON text. Formatting only: no figures made here."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
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
    return f'{{{head},\n "rows": [\n{rows}\n ],\n "totals": {totals}}}\n'


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


def _earned(row: ReportRow) -> str:
    mark = "~" if row.earnings_source == "estimate" and row.earnings else ""
    return f"{mark}{row.earnings:.2f}"


Column = tuple[str, str, Callable[[ReportRow], str]]  # two header lines, the cell


def _columns(report: Report) -> tuple[list[Column], list[Column]]:
    """The hours-and-requests columns and the energy-and-money columns."""
    cur = report.currency
    hours: list[Column] = [
        *((b, "h", lambda r, b=b: f"{r.hours[b]:.2f}") for b in BUCKETS),
        ("rented", "GPU-h", lambda r: f"{r.rented_gpu_hours:.2f}"),
    ]
    requests: list[Column] = [
        ("", "held", lambda r: str(r.held_requests)),
        ("", "rejected", lambda r: str(r.rejected_requests)),
    ]
    energy: list[Column] = [
        *((b, "kWh", lambda r, b=b: f"{r.energy_kwh[b]:.2f}") for b in BUCKETS),
    ]
    money: list[Column] = [
        ("cost", cur, lambda r: f"{r.energy_cost:.2f}"),
        ("earned", cur, _earned),
        ("net", cur, lambda r: f"{round(r.net, 2) + 0.0:.2f}"),  # + 0.0: never "-0.00"
        ("extra", "cost", lambda r: f"{r.extra_energy_cost:.2f}"),
        ("extra", "net", lambda r: f"{round(r.extra_net, 2) + 0.0:.2f}"),
        ("CO2", "kg", lambda r: f"{r.co2_kg:.2f}"),
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
    first, second = _columns(report)
    hours, requests = first[:-2], first[-2:]
    tables = [_lay_out(report.by, [*hours, *second, *requests], rows)]
    if len(tables[0][0]) > width:
        tables = [_lay_out(report.by, first, rows), _lay_out(report.by, second, rows)]
    text = Text(f"Earnings and energy by {report.by}, {who}, {span} ({report.currency})\n")
    for lines in tables:
        text.append("\n")
        text.append("\n".join(lines[:-1]) + "\n")
        text.append(lines[-1] + "\n", style="bold")
    text.append(
        "\nh: hours in each state; kWh: energy drawn in each state; cost and CO2: of the "
        "energy drawn while listed or rented; extra: only what renting drew above the "
        "idle server's own draw; ~: estimated earnings",
        style="dim",
    )
    return text
