"""simulate's rows as a terminal table, CSV or JSON. Formatting only."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import datetime, timedelta

from rich.table import Table

from broker.simulation.run import Row
from broker.units import format_duration

CSV_HEADER = [
    "policy", "currency", "net", "extra_net", "earnings", "energy_cost", "extra_energy_cost",
    "rented_gpu_hours", "listings", "renewals", "rentals", "renters_turned_away", "requests",
    "requests_held", "requests_refused", "visits_refused", "wait_p50_s", "wait_p95_s",
    "wait_max_s", "share_of_oracle",
]  # fmt: skip


def to_json_text(rows: Sequence[Row], currency: str, start: datetime, end: datetime) -> str:
    """One object: the span and currency, then a row per policy, a row to a line."""
    head = (
        f'{{"currency": {json.dumps(currency)}, "from": "{start.isoformat()}", '
        f'"to": "{end.isoformat()}",'
    )
    body = ",\n".join(f"  {json.dumps(r.as_json())}" for r in rows)
    return f'{head}\n "rows": [\n{body}\n ]}}\n'


def to_csv_text(rows: Sequence[Row], currency: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in rows:
        d = r.as_json()
        wait = d["wait_s"]
        assert isinstance(wait, dict)
        writer.writerow(
            [
                d["policy"], currency, d["net"], d["extra_net"], d["earnings"], d["energy_cost"],
                d["extra_energy_cost"], d["rented_gpu_hours"], d["listings"], d["renewals"],
                d["rentals"], d["renters_turned_away"], d["requests"], d["requests_held"],
                d["requests_refused"], d["visits_refused"], wait["p50"], wait["p95"],
                wait["max"],
                "" if d["share_of_oracle"] is None else d["share_of_oracle"],
            ]
        )  # fmt: skip
    return buffer.getvalue()


def _wait(seconds: float) -> str:
    if seconds <= 0:
        return "0"
    if seconds < 60:
        return f"{seconds:.0f}s"
    return format_duration(timedelta(seconds=round(seconds / 60) * 60))


def to_table(rows: Sequence[Row], currency: str, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("policy", "net", "extra net", "rented GPU-h", "listings", "held", "refused",
                 "visits refused", "wait p50", "p95", "max", "of oracle"):  # fmt: skip
        table.add_column(name, justify="left" if name == "policy" else "right")
    for r in rows:
        share = "" if r.share_of_oracle is None else f"{r.share_of_oracle:.0%}"
        table.add_row(
            r.policy,
            f"{r.net:.2f} {currency}",
            f"{r.extra_net:.2f}",
            f"{r.rented_gpu_hours:.1f}",
            str(r.listings),
            str(r.requests_held),
            str(r.requests_refused),
            str(r.visits_refused),
            _wait(r.wait_p50),
            _wait(r.wait_p95),
            _wait(r.wait_max),
            share,
        )
    return table
