"""`gpu-broker simulate`: read the inputs, replay every policy, print the rows."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from broker.config import Config, PolicySection
from broker.errors import ConfigError
from broker.ledger import ledger_exists, ledger_path, open_ledger
from broker.pricing.settings import PricingSection
from broker.providers.paper import PaperProvider
from broker.report import resolve_when
from broker.scheduling.loop import RHYTHM_HISTORY
from broker.simulation.competition import competition_for
from broker.simulation.inputs import (
    InputError,
    PaperModel,
    Renter,
    Request,
    demand_from_records,
    read_demand,
    read_market,
)
from broker.simulation.market_variants import configured_pricing, pricing_variant, split
from broker.simulation.render import to_csv_text, to_json_text, to_table
from broker.simulation.run import simulate
from broker.simulation.variants import label, variant

DEFAULT_SPAN = timedelta(days=28)


def policies(config: Config, items: list[list[str]] | None) -> list[tuple[str, PolicySection]]:
    """The configured policy, then one variant per --policy (KEY=VALUE, comma-separated
    or several words after one --policy)."""
    out = [("configured", config.policy)]
    for group in items or []:
        assignments = [a for word in group for a in word.split(",") if a.strip()]
        policy_part, _ = split(assignments)
        out.append((label(assignments), variant(config.policy, policy_part)))
    return out


def pricings(config: Config, items: list[list[str]] | None) -> dict[str, PricingSection | None]:
    """Per row, the market ask's settings (`pricing.KEY=VALUE`); None: the fixed price."""
    base = configured_pricing(config)
    out = {"configured": base}
    for group in items or []:
        assignments = [a for word in group for a in word.split(",") if a.strip()]
        _, part = split(assignments)
        out[label(assignments)] = pricing_variant(base, part) if part else base
    return out


def _paper_model(config: Config) -> PaperModel:
    section = config.provider if isinstance(config.provider, PaperProvider) else None
    paper = section or PaperProvider(kind="paper")
    return PaperModel(
        arrivals_per_hour=paper.arrivals_per_hour,
        market_price_gpu=paper.market_price_gpu,
        price_elasticity=paper.price_elasticity,
        full_demand_after_h=paper.full_demand_after.total_seconds() / 3600,
        interruptible_share=paper.interruptible_share,
        mean_rental_h=paper.mean_rental.total_seconds() / 3600,
        seed=paper.seed,
    )


async def _ledger_demand(config: Config, start: datetime, end: datetime) -> list[Request]:
    ledger = await open_ledger(config.broker)
    try:
        return demand_from_records(await ledger.demand(start, end))
    finally:
        await ledger.close()


def _span(
    args: argparse.Namespace, config: Config, now: datetime, demand: list[Request] | None
) -> tuple[datetime, datetime]:
    tz = config.broker.tz
    if args.since is not None:
        start = resolve_when(args.since, tz)
    elif demand:
        start = datetime.fromtimestamp(demand[0].at // 3600 * 3600, tz)
    else:
        start = now - DEFAULT_SPAN
    if args.until is not None:
        end = resolve_when(args.until, tz, end=True)
    elif demand:
        last = max(r.at + r.duration_s for r in demand)
        end = datetime.fromtimestamp((last // 3600 + 1) * 3600, tz)
    else:
        end = now
    if end <= start:
        raise InputError("--since must be before --until")
    return start, end


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[float], None] | None]:
    """A bar on stderr for long replays, only when stderr is a terminal."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("replaying"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("replay", total=1.0)
        yield lambda done: bar.update(task, completed=done)


def run_simulate(args: argparse.Namespace, config: Config, now: datetime, out: Console) -> int:
    chosen = policies(config, args.policy)
    priced = pricings(config, args.policy)
    if args.demand == "ledger":
        if not ledger_exists(config.broker):
            raise InputError(
                f"no ledger at {ledger_path(config.broker)}: give --demand FILE.csv, or run "
                "the service first so it records the team's requests"
            )
        start, end = _span(args, config, now, None)
        # the weeks before too: the rhythm learns from them, as the service does at start
        demand = asyncio.run(_ledger_demand(config, start - RHYTHM_HISTORY, end))
    else:
        demand = read_demand(Path(args.demand))
        start, end = _span(args, config, now, demand)
    renters: list[Renter]
    if args.market == "paper":
        gpus = max(len(config.gpus.fake), 1)
        renters = _paper_model(config).renters(start.timestamp(), end.timestamp(), gpus)
    else:
        renters = read_market(Path(args.market))
    long = (end - start) > timedelta(days=7) or len(chosen) > 2
    with progress_bar(long and sys.stderr.isatty()) as report:
        rivals = competition_for(config, any(p is not None for p in priced.values()))
        rows = simulate(
            config, chosen, demand, renters, start, end, progress=report,
            pricing=priced, competition=rivals,
        )  # fmt: skip
    currency = config.energy.currency
    if args.format == "json":
        out.file.write(to_json_text(rows, currency, start, end))
    elif args.format == "csv":
        out.file.write(to_csv_text(rows, currency))
    else:
        tz = config.broker.tz
        span = f"{start.astimezone(tz):%Y-%m-%d %H:%M} to {end.astimezone(tz):%Y-%m-%d %H:%M}"
        count = sum(1 for r in demand if start.timestamp() <= r.at < end.timestamp())
        title = f"Simulated {span} ({count} local requests, {len(renters)} renters looking)"
        out.print(to_table(rows, currency, title))
    return 0


__all__ = ["ConfigError", "InputError", "run_simulate"]
