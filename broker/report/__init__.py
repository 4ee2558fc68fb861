"""The earnings report (SPEC section 6): `build_report` computes, `render` formats.

The dashboard calls `build_report(ledger, config, since=..., until=..., now=..., by="day")`
and serves `report.to_json()`; `gpu-broker report` prints the same as a table, CSV or JSON.
"""

from broker.report.build import (
    BUCKET_OF_STATE,
    BUCKETS,
    Bucket,
    Report,
    ReportError,
    ReportRow,
    build_report,
)
from broker.report.periods import (
    BY_CHOICES,
    By,
    Period,
    When,
    default_since,
    parse_when,
    periods,
    resolve_when,
)

__all__ = [
    "BUCKETS",
    "BUCKET_OF_STATE",
    "BY_CHOICES",
    "Bucket",
    "By",
    "Period",
    "Report",
    "ReportError",
    "ReportRow",
    "When",
    "build_report",
    "default_since",
    "parse_when",
    "periods",
    "resolve_when",
]
