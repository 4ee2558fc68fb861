"""`gpu-broker sizing`: read the ledger, compute, print a table or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime

from rich.console import Console

from broker.config import Config
from broker.errors import BrokerError, UsageError
from broker.ledger import ledger_exists, ledger_path, open_ledger
from broker.report import resolve_when
from broker.sizing.build import DEFAULT_SPAN, Sizing, read_sizing, to_json
from broker.sizing.render import to_renderable


class SizingUsageError(UsageError):
    """Bad arguments (exit 2)."""


async def _read(
    config: Config, start: datetime, end: datetime, share: float, from_record: bool
) -> Sizing:
    ledger = await open_ledger(config.broker)
    try:
        sizing, _ = await read_sizing(
            ledger, config, start, end, share, from_record=from_record
        )
        return sizing
    finally:
        await ledger.close()


def run_sizing(args: argparse.Namespace, config: Config, now: datetime, out: Console) -> int:
    """Exit 0 with the figures; SizingUsageError for bad usage; BrokerError (exit 1) when
    there is no ledger to read."""
    tz = config.broker.tz
    if not ledger_exists(config.broker):
        raise BrokerError(
            f"no ledger at {ledger_path(config.broker)}: nothing has been recorded yet "
            "(gpu-broker run writes it)"
        )
    end = resolve_when(args.until, tz, end=True) if args.until is not None else now
    start = resolve_when(args.since, tz) if args.since is not None else end - DEFAULT_SPAN
    if end <= start:
        raise SizingUsageError("--since must be before --until")
    # Without --since, a ledger younger than the default span is read from its beginning.
    from_record = args.since is None
    sizing = asyncio.run(_read(config, start, end, args.max_use_share, from_record))
    if args.json:
        out.file.write(json.dumps(to_json(sizing), indent=2) + "\n")
    else:
        out.print(to_renderable(sizing))
    return 0


def share(text: str) -> float:
    """--max-use-share: a share of the weeks, 0 <= x < 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0.25, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 0 and below 1, got {text}")
    return value
