"""The fleet's commands: `report --host`, `status --fleet` and `ledger copy`, read from the
ledger (the shared database when `broker.database_url` is set) rather than the service."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from broker.clock import Clock
from broker.config import BrokerSection, Config, check_database_url
from broker.errors import BrokerError
from broker.instance_lock import InstanceLock
from broker.ledger import ledger_path, open_ledger
from broker.ledger.base import host_view
from broker.report import Report, build_report
from broker.report.fleet import FleetReport, build_fleet_report
from broker.report.fleet_status import HostStatus, fleet_status


async def report_for_host(
    config: Config, host: str | None, *, since: datetime, until: datetime, now: datetime,
    by: Any, gpu: int | None,
) -> Report | FleetReport:  # fmt: skip
    """`gpu-broker report --host`: this host (None), one host by name, or `all`."""
    ledger = await open_ledger(config.broker)
    try:
        if host == "all":
            hosts = await ledger.hosts() or [ledger.host]
            # The energy sums are read on a second connection beside the rest (a year of a
            # fleet: a second of the server's time).
            energy_from = await open_ledger(config.broker)
            try:
                return await build_fleet_report(
                    ledger, hosts, config, since=since, until=until, now=now, by=by, gpu=gpu,
                    energy_from=energy_from,
                )  # fmt: skip
            finally:
                await energy_from.close()
        async with host_view(ledger, host) as view:
            return await build_report(
                view, config, since=since, until=until, now=now, by=by, gpu=gpu
            )
    finally:
        await ledger.close()


def show_fleet(rows: list[HostStatus], config: Config, now: datetime, out: Console) -> None:
    tz = config.broker.tz
    currency = config.energy.currency
    table = Table(title=f"fleet ({len(rows)} hosts), today in {currency}")
    for column in ("host", "state", "since", "GPUs", "earned", "energy", "net", "last seen"):
        table.add_column(column, justify="right" if column in ("GPUs", "earned", "energy",
                                                                "net") else "left")  # fmt: skip
    for r in rows:
        silent = r.silent(now)
        seen = r.last_seen.astimezone(tz).strftime("%Y-%m-%d %H:%M") if r.last_seen else "never"
        table.add_row(
            r.host,
            r.state or "-",
            r.since.astimezone(tz).strftime("%Y-%m-%d %H:%M") if r.since else "-",
            str(r.gpus),
            f"{r.earned:.2f}",
            f"{r.energy_cost:.2f}",
            f"{r.net:.2f}",
            seen + (" (silent)" if silent else ""),
        )
    out.print(table)


def cmd_status_fleet(args: argparse.Namespace, config: Config, clock: Clock, out: Console) -> int:
    now = clock.now()

    async def read() -> list[HostStatus]:
        ledger = await open_ledger(config.broker)
        try:
            return await fleet_status(ledger, config, now)
        finally:
            await ledger.close()

    rows = asyncio.run(read())
    if args.json:
        out.file.write(json.dumps([r.to_json() for r in rows], indent=1) + "\n")
    else:
        show_fleet(rows, config, now, out)
    return 0


def cmd_ledger_copy(args: argparse.Namespace, config: Config, clock: Clock, out: Console) -> int:
    """Copy this state_dir's SQLite ledger into the PostgreSQL database `--to` names."""
    from broker.ledger.copy import copy_ledger  # psycopg only when it is used
    from broker.ledger.postgres import PostgresLedger

    try:
        url = check_database_url(args.to)
    except ValueError as err:
        raise BrokerError(f"--to: {err}") from None
    source = ledger_path(config.broker)
    if not source.exists():
        raise BrokerError(f"no ledger at {source}: nothing to copy")
    # The broker must not write while its history is copied (see broker.ledger.copy).
    lock = InstanceLock.acquire(config.broker.state_dir)
    password = BrokerSection.database_password(config.broker)

    def progress(table: str, done: int, total: int) -> None:
        out.print(f"{table}: {done}/{total} rows", markup=False)

    async def run() -> dict[str, tuple[int, int]]:
        target = await PostgresLedger.open(url, config.broker.host, password=password)
        try:
            result = await copy_ledger(source, target, progress)
        finally:
            await target.close()
        return {t: (result.copied[t], result.skipped[t]) for t in result.copied}

    try:
        summary = asyncio.run(run())
    finally:
        lock.release()
    added = sum(c for c, _ in summary.values())
    already = sum(s for _, s in summary.values())
    out.print(f"copied {added} rows ({already} were there already) from {source}", markup=False)
    return 0


def check_shared_ledger(config: Config, out: Console) -> list[str]:
    """`gpu-broker check` with database_url: reach the database and read its schema
    version, changing nothing (a start migrates it), and name this broker's host."""
    from broker.ledger.postgres import SCHEMA_VERSION, probe, redact

    url = config.broker.database_url
    assert url is not None
    try:
        version, hosts = asyncio.run(probe(url, config.broker.database_password()))
    except BrokerError as err:
        return [f"broker.database_url: {err}"]
    if version > SCHEMA_VERSION:
        return [
            f"broker.database_url: the ledger is at schema version {version}, newer than "
            f"this gpu-broker ({SCHEMA_VERSION})"
        ]
    note = "" if version == SCHEMA_VERSION else f", will migrate to {SCHEMA_VERSION}"
    others = [h for h in hosts if h != config.broker.host]
    out.print(
        f"ok   ledger {redact(url)} (schema {version}{note}); this host writes as "
        f"{config.broker.host!r}; {len(others)} other host(s) in it",
        markup=False,
    )
    return []
