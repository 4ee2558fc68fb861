"""The fleet's commands: `report --host`, `status --fleet` and `ledger copy`, read from the
ledger (the shared database when `broker.database_url` is set) rather than the service."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from broker.clock import Clock
from broker.config import BrokerSection, Config, check_database_url
from broker.errors import BrokerError
from broker.instance_lock import InstanceLock
from broker.ledger import Ledger, ledger_path, open_ledger
from broker.report import Report, build_report
from broker.report.fleet import FleetReport, build_fleet_report

# A host not heard from for this long is shown as silent in `status --fleet`.
SILENT_AFTER = timedelta(minutes=5)


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
        view = ledger if host in (None, ledger.host) else await ledger.for_host(host)
        try:
            return await build_report(
                view, config, since=since, until=until, now=now, by=by, gpu=gpu
            )
        finally:
            if view is not ledger:
                await view.close()
    finally:
        await ledger.close()


@dataclass(frozen=True)
class HostStatus:
    host: str
    state: str  # the pool's state in force, or the last one ("" if none)
    since: datetime | None
    gpus: int  # GPUs with a state in force
    last_seen: datetime | None  # the newest row the host wrote
    earned: float  # today, local time
    energy_cost: float
    net: float

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "state": self.state,
            "since": self.since.isoformat() if self.since else None,
            "gpus": self.gpus,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "earned_today": round(self.earned, 6),
            "energy_cost_today": round(self.energy_cost, 6),
            "net_today": round(self.net, 6),
        }


async def fleet_status(ledger: Ledger, config: Config, now: datetime) -> list[HostStatus]:
    """Every host's last known state, from the ledger alone (no host is asked)."""
    tz = config.broker.tz
    midnight = datetime.combine(now.astimezone(tz).date(), time(0), tzinfo=tz)
    hosts = await ledger.hosts()
    out: list[HostStatus] = []
    for host in hosts:
        view = ledger if host == ledger.host else await ledger.for_host(host)
        try:
            # a year back is as far as a silent host's last state is looked for
            far = now - timedelta(days=366)
            pool = await view.state_intervals(far, now + timedelta(seconds=1), scope="pool")
            gpus = await view.state_intervals(now, now + timedelta(seconds=1), scope="gpu")
            recent = await view.energy(now - timedelta(days=1), now + timedelta(seconds=1))
            last = pool[-1] if pool else None
            seen = [t for t in (
                last.end or last.start if last else None,
                recent[-1].end if recent else None,
            ) if t is not None]  # fmt: skip
            today = (
                await build_report(view, config, since=midnight, until=now, now=now)
                if now > midnight
                else None
            )
        finally:
            if view is not ledger:
                await view.close()
        out.append(
            HostStatus(
                host=host,
                state=last.state if last else "",
                since=last.start if last else None,
                gpus=sum(1 for g in gpus if g.end is None),
                last_seen=max(seen) if seen else None,
                earned=today.totals.earnings if today else 0.0,
                energy_cost=today.totals.energy_cost if today else 0.0,
                net=today.totals.net if today else 0.0,
            )
        )
    return out


def show_fleet(rows: list[HostStatus], config: Config, now: datetime, out: Console) -> None:
    tz = config.broker.tz
    currency = config.energy.currency
    table = Table(title=f"fleet ({len(rows)} hosts), today in {currency}")
    for column in ("host", "state", "since", "GPUs", "earned", "energy", "net", "last seen"):
        table.add_column(column, justify="right" if column in ("GPUs", "earned", "energy",
                                                                "net") else "left")  # fmt: skip
    for r in rows:
        silent = r.last_seen is None or now - r.last_seen > SILENT_AFTER
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
