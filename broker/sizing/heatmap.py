"""The dashboard's week heat map of local use (GET /api/local-use): for each hour of the
week, the share of its occurrences in the span with a local request running or waiting,
and the mean number of requests that arrived in it."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from broker.ledger.base import Ledger
from broker.sizing.usage import arrivals_per_hour, runs_of, use_share
from broker.sizing.week import WEEKDAYS, grid, hour_counts


async def local_use_week(
    ledger: Ledger, tz: ZoneInfo, start: datetime, end: datetime
) -> dict[str, Any]:
    runs = runs_of(await ledger.demand(start, end))
    weeks = hour_counts(start, end, tz)
    requests = arrivals_per_hour(runs, weeks, tz)
    return {
        "from": start.astimezone(tz).isoformat(),
        "to": end.astimezone(tz).isoformat(),
        "timezone": tz.key,
        "weekdays": list(WEEKDAYS),
        "used": grid([round(v, 3) for v in use_share(runs, weeks, tz)]),
        "requests": grid([round(v, 2) for v in requests]),
        "total_requests": len(runs),
    }
