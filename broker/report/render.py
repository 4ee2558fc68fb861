"""The report as a terminal table, CSV or JSON text. Formatting only: no figures made here."""

from __future__ import annotations

import csv
import io
import json
from zoneinfo import ZoneInfo

from rich import box
from rich.table import Table

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
    "co2_kg",
    "held_requests",
    "rejected_requests",
]


def to_json_text(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2) + "\n"


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
                data["co2_kg"],
                data["held_requests"],
                data["rejected_requests"],
            ]
        )
    return buffer.getvalue()


# Below this many columns the table is printed as two: hours, then energy and money.
WIDE = 132


def _hour_cells(row: ReportRow) -> list[str]:
    return [*(f"{row.hours[b]:.2f}" for b in BUCKETS), f"{row.rented_gpu_hours:.2f}"]


def _earned(row: ReportRow) -> str:
    mark = "~" if row.earnings_source == "estimate" and row.earnings else ""
    return f"{mark}{row.earnings:.2f}"


def _energy_cells(row: ReportRow) -> list[str]:
    return [f"{row.energy_kwh[b]:.2f}" for b in BUCKETS]


def to_tables(report: Report, width: int = WIDE) -> list[Table]:
    """The report as one table, or on a console narrower than `WIDE` as two: hours and
    requests, then energy and money."""
    tz = ZoneInfo(report.timezone)
    span = (
        f"{report.start.astimezone(tz):%Y-%m-%d %H:%M} to "
        f"{report.end.astimezone(tz):%Y-%m-%d %H:%M} {report.timezone}"
    )
    who = "all GPUs" if report.gpu is None else f"GPU {report.gpu}"
    title = f"Earnings and energy by {report.by}, {who}, {span} ({report.currency})"
    note = (
        "h: hours in each state; kWh: energy drawn in each state; cost and CO2: of the "
        "energy drawn while listed or rented; ~: estimated earnings"
    )
    cur = report.currency
    hours = [*(f"{b}\nh" for b in BUCKETS), "rented\nGPU-h"]
    energy = [f"{b}\nkWh" for b in BUCKETS]
    rows = [*report.rows, report.totals]
    if width >= WIDE:
        headers = [
            *hours, f"earned\n{cur}", *energy, f"cost\n{cur}", f"net\n{cur}", "CO2\nkg",
            "held", "rejected",
        ]  # fmt: skip
        cells = [
            [
                *_hour_cells(r), _earned(r), *_energy_cells(r), f"{r.energy_cost:.2f}",
                f"{r.net:.2f}", f"{r.co2_kg:.2f}", str(r.held_requests),
                str(r.rejected_requests),
            ]
            for r in rows
        ]  # fmt: skip
        return [_table(title, note, report.by, headers, cells, rows)]
    first = [
        [*_hour_cells(r), str(r.held_requests), str(r.rejected_requests)] for r in rows
    ]
    second = [
        [*_energy_cells(r), f"{r.energy_cost:.2f}", _earned(r), f"{r.net:.2f}", f"{r.co2_kg:.2f}"]
        for r in rows
    ]
    return [
        _table(title, None, report.by, [*hours, "held", "rejected"], first, rows),
        _table(
            None, note, report.by,
            [*energy, f"cost\n{cur}", f"earned\n{cur}", f"net\n{cur}", "CO2\nkg"],
            second, rows,
        ),
    ]  # fmt: skip


def _table(
    title: str | None,
    caption: str | None,
    by: str,
    headers: list[str],
    cells: list[list[str]],
    rows: list[ReportRow],
) -> Table:
    table = Table(
        title=title, title_justify="left", caption=caption, caption_justify="left",
        box=box.SIMPLE_HEAD, pad_edge=False,
    )  # fmt: skip
    table.add_column(by, no_wrap=True, min_width=10)
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for i, (row, values) in enumerate(zip(rows, cells, strict=True)):
        last = i == len(rows) - 1
        table.add_row(
            row.period, *values, end_section=i == len(rows) - 2, style="bold" if last else None
        )
    return table
