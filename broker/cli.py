"""The `gpu-broker` command. The only place that reads the real clock and configures logging."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

from broker import __version__, runtime
from broker.cli_fleet import (
    check_shared_ledger,
    cmd_ledger_copy,
    cmd_status_fleet,
    report_for_host,
)
from broker.client import ServiceClient, show_status
from broker.clock import Clock, SystemClock
from broker.config import Config, find_config, load_config
from broker.errors import BrokerError, ConfigError, ProviderError, UsageError
from broker.ledger import ledger_exists, ledger_path
from broker.ledger.sqlite import SCHEMA_VERSION
from broker.preflight import (
    gpu_index_problems,
    listen_addresses,
    listen_problems,
    running_instance,
)
from broker.providers import create_provider
from broker.report import (
    BY_CHOICES,
    default_since,
    parse_when,
    resolve_when,
)
from broker.report.extent import read_extent
from broker.report.fleet import FleetReport, fleet_to_csv_text, fleet_to_text
from broker.report.render import to_csv_text, to_json_text, to_text
from broker.scheduling.tariffs import TariffSchedule
from broker.scheduling.windows import Calendar
from broker.simulation.command import run_simulate
from broker.sizing.command import run_sizing
from broker.sizing.command import share as sizing_share
from broker.units import describe_duration

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

def main(argv: Sequence[str] | None = None, clock: Clock | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=log_format(sys.stderr, os.environ),
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    # Piped output gets a wide console so a table row stays one line for grep and scripts.
    out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        path = find_config(args.config)
        config = load_config(path)
        return int(args.handler(args, config, path, clock or SystemClock(), out))
    except ConfigError as error:
        where = error.source or "configuration"
        count = len(error.problems)
        err.print(f"gpu-broker: {where}: {count} problem{'s' if count != 1 else ''}", markup=False)
        for problem in error.problems:
            err.print(f"  {problem}", markup=False)
        return EXIT_USAGE
    except UsageError as error:
        err.print(f"gpu-broker {args.command}: {error}", markup=False)
        return EXIT_USAGE
    except BrokerError as error:
        err.print(f"gpu-broker: {error}", markup=False)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def log_format(stream: TextIO, environ: Mapping[str, str]) -> str:
    """Timestamps for a person at a terminal; none under journald (JOURNAL_STREAM set),
    which stamps every line itself, or into a pipe whose reader does."""
    plain = "%(levelname)s %(name)s: %(message)s"
    if environ.get("JOURNAL_STREAM"):
        return plain
    isatty = getattr(stream, "isatty", None)
    return "%(asctime)s " + plain if isatty is not None and isatty() else plain


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-broker",
        description="Rent out idle local GPUs and reclaim them when local requests arrive.",
    )
    parser.add_argument("--version", action="version", version=f"gpu-broker {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $GPU_BROKER_CONFIG, then ./config.toml, "
        "then /etc/gpu-broker/config.toml)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    windows = sub.add_parser(
        "windows",
        parents=[common],
        help="show the upcoming availability windows and tariff periods in local time",
    )
    windows.add_argument(
        "--next", type=_positive_int, default=5, metavar="N", help="how many (default 5)"
    )
    windows.set_defaults(handler=cmd_windows)

    report = sub.add_parser(
        "report",
        parents=[common],
        help="earnings against energy cost, by day, week or month, from the ledger",
        description="Hours per state, rented GPU-hours, earnings, energy per state, energy "
        "cost, net, CO2 and held/rejected local requests per period, in the configured time "
        "zone. Dates are local; --until includes the day it names.",
    )
    report.add_argument(
        "--since",
        type=_when,
        metavar="D",
        help="first day (YYYY-MM-DD) or moment (ISO date-time); default: the last 7 days, "
        "8 weeks or 12 months, counting the current one",
    )
    report.add_argument(
        "--until", type=_when, metavar="D", help="last day, included, or moment; default: now"
    )
    report.add_argument("--by", choices=BY_CHOICES, default="day", help="period (default day)")
    report.add_argument(
        "--gpu", type=_gpu_index, metavar="N", help="one GPU by index (default: the machine)"
    )
    report.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="default table"
    )
    report.add_argument(
        "--host",
        metavar="NAME",
        help="one host of a shared ledger by name, or all (each host, then their sum); "
        "default: this host",
    )
    report.set_defaults(handler=cmd_report)

    simulate = sub.add_parser(
        "simulate",
        parents=[common],
        help="replay demand and a market through the policy, against an oracle",
        description="Replay local demand (the ledger's record or a CSV trace) and a market "
        "(the paper market's model or a CSV of renter arrivals) through the real pool "
        "machine in virtual time, for the configured policy and each --policy variant, "
        "next to an oracle that knows the future. See docs/simulate.md.",
    )
    simulate.add_argument(
        "--demand",
        default="ledger",
        metavar="ledger|FILE.csv",
        help="local requests: the ledger's record (default) or a CSV "
        "timestamp,duration_s[,service]",
    )
    simulate.add_argument(
        "--market",
        default="paper",
        metavar="paper|FILE.csv",
        help="renters: the paper market's model with its [provider] keys (default) or a CSV "
        "timestamp,gpus,hours,kind,max_price,min_offer_hours",
    )
    simulate.add_argument(
        "--since", type=_when, metavar="D", help="start (default: the trace's first request, "
        "or 28 days ago for the ledger)",
    )  # fmt: skip
    simulate.add_argument(
        "--until", type=_when, metavar="D", help="last day, included, or moment "
        "(default: the trace's end, or now)",
    )  # fmt: skip
    simulate.add_argument(
        "--policy",
        action="append",
        nargs="+",
        metavar="KEY=VALUE",
        help="a variant of [policy] replayed beside the configured one (repeat for more; "
        "several keys: idle_window=5m,local_hold=2m)",
    )
    simulate.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="default table"
    )
    simulate.set_defaults(handler=cmd_simulate)

    eco = sub.add_parser(
        "eco", parents=[common], help="idle draw, P-state, persistence, power limit, flags"
    )
    eco.add_argument("--json", action="store_true", help="print the JSON object")
    eco.add_argument(
        "--days", type=_positive_days, default=7.0,
        help="judge the idle samples the ledger holds for this many days (default 7)",
    )  # fmt: skip
    eco.set_defaults(handler=cmd_eco)

    sizing = sub.add_parser(
        "sizing",
        parents=[common],
        help="how many GPUs the measured demand needs; suggested windows",
        description="From the ledger: per service requests per hour of the week, busy GPUs, "
        "waits and model reloads; the GPUs the demand needs beside the rule of thumb for "
        "broker.team_size; and [[windows]] covering the hours the team never used. "
        "See docs/sizing.md.",
    )
    sizing.add_argument(
        "--since", type=_when, metavar="D", help="first day or moment (default: 28 days ago)"
    )
    sizing.add_argument(
        "--until", type=_when, metavar="D", help="last day, included, or moment; default: now"
    )
    sizing.add_argument("--json", action="store_true", help="print the JSON object")
    sizing.add_argument(
        "--max-use-share", type=sizing_share, default=0.0, metavar="S",
        help="suggest windows over hours used in at most this share of the weeks "
        "(default 0: hours never used)",
    )  # fmt: skip
    sizing.set_defaults(handler=cmd_sizing)

    check = sub.add_parser(
        "check", parents=[common], help="validate the config and what it points to"
    )
    check.set_defaults(handler=cmd_check)

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run the service in the foreground (SIGTERM/SIGINT: clean stop, SIGHUP: reload)",
    )
    run.set_defaults(handler=cmd_run)

    status = sub.add_parser(
        "status", parents=[common], help="ask the running service what it is doing"
    )
    status.add_argument("--json", action="store_true", help="print the JSON object")
    status.add_argument(
        "--fleet",
        action="store_true",
        help="every host's last known state, today's earnings and energy, from the ledger",
    )
    status.set_defaults(handler=cmd_status)

    ledger = sub.add_parser("ledger", help="work on the ledger itself")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    copy = ledger_sub.add_parser(
        "copy",
        parents=[common],
        help="copy this state_dir's SQLite ledger into a shared PostgreSQL database "
        "(idempotent; stop the broker first)",
    )
    copy.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host/db")
    copy.set_defaults(handler=cmd_ledger)

    for name, what in (
        ("reclaim", "withdraw the listing and take the GPUs back as soon as contracts allow"),
        ("pause", "stop listing (a live offer is withdrawn) until resume"),
        ("resume", "allow listing again after pause"),
    ):
        control = sub.add_parser(name, parents=[common], help=what)
        control.set_defaults(handler=cmd_control, route=name)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _when(text: str) -> object:
    try:
        return parse_when(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _gpu_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a GPU index like 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a GPU index of 0 or more, got {value}")
    return value


def local_time(t: datetime, tz: ZoneInfo) -> str:
    return t.astimezone(tz).strftime("%a %Y-%m-%d %H:%M %Z")


# -- windows ------------------------------------------------------------------------------


def cmd_windows(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    tz = config.broker.tz
    now = clock.now()
    out.print(f"Now: {local_time(now, tz)} ({config.broker.timezone})")
    if not config.windows:
        out.print("No [[windows]] configured: gpu-broker will never list this machine.")
    else:
        calendar = Calendar.from_config(config.windows, tz)
        table = Table(title="Availability windows", title_justify="left")
        table.add_column("opens")
        table.add_column("closes")
        table.add_column("length", justify="right")
        table.add_column("now")
        for interval in calendar.openings(now, args.next):
            is_now = now in interval
            closes = local_time(interval.end, tz)
            if interval.open_ended:
                closes = f"after {closes}"
            table.add_row(
                local_time(interval.start, tz),
                closes,
                ("> " if interval.open_ended else "") + describe_duration(interval.duration),
                "open now" if is_now else "",
            )
        out.print(table)

    energy = config.energy
    default = f"{energy.price_per_kwh:.4g} {energy.currency}/kWh"
    if not energy.tariff:
        out.print(f"Electricity: {default} at all times.")
        return EXIT_OK
    schedule = TariffSchedule.from_config(energy, tz)
    table = Table(title=f"Tariff periods (otherwise {default})", title_justify="left")
    table.add_column("from")
    table.add_column("until")
    table.add_column("price", justify="right")
    table.add_column("carbon", justify="right")
    for segment in schedule.upcoming(now, args.next):
        table.add_row(
            local_time(segment.interval.start, tz),
            local_time(segment.interval.end, tz),
            f"{segment.rate.price_per_kwh:.4g} {energy.currency}/kWh",
            f"{segment.rate.carbon_g_per_kwh:.4g} g/kWh",
        )
    out.print(table)
    return EXIT_OK


# -- report -------------------------------------------------------------------------------


def cmd_report(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    tz = config.broker.tz
    now = clock.now()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    ledger_file = ledger_path(config.broker)
    if not ledger_exists(config.broker):
        err.print(
            f"gpu-broker report: no ledger at {ledger_file}: nothing has been recorded yet "
            "(gpu-broker run writes it)",
            markup=False,
        )
        return EXIT_FAILURE
    # The extent is read from the embedded SQLite file; a shared PostgreSQL ledger is
    # reported from the start asked for (no padding check, no unseen-GPU check yet).
    extent = None
    if config.broker.database_url is None:
        try:
            extent = read_extent(ledger_file)
        except sqlite3.Error as error:
            err.print(f"gpu-broker report: cannot read the ledger {ledger_file}: {error}")
            return EXIT_FAILURE
    if extent is not None and args.gpu is not None and args.gpu not in extent.gpu_indices:
        seen = ", ".join(str(i) for i in sorted(extent.gpu_indices)) or "none yet"
        err.print(
            f"gpu-broker report: --gpu {args.gpu}: the ledger has never seen GPU {args.gpu} "
            f"(GPUs recorded: {seen})",
            markup=False,
        )
        return EXIT_USAGE
    since = resolve_when(args.since, tz) if args.since else default_since(now, args.by, tz)
    if not args.since and extent is not None and extent.first is not None:
        since = max(since, extent.first)  # no empty periods from before the ledger existed
    until = resolve_when(args.until, tz, end=True) if args.until else now
    if since >= min(until, now):
        limit = f"--until ({local_time(until, tz)})" if until < now else "now"
        err.print(
            f"gpu-broker report: --since ({local_time(since, tz)}) must be before {limit}",
            markup=False,
        )
        return EXIT_USAGE

    fleet = asyncio.run(
        report_for_host(
            config, args.host, since=since, until=until, now=now, by=args.by, gpu=args.gpu
        )
    )
    if isinstance(fleet, FleetReport):
        if args.format == "json":
            out.file.write(json.dumps(fleet.to_json()) + "\n")
        elif args.format == "csv":
            out.file.write(fleet_to_csv_text(fleet))
        else:
            out.print(fleet_to_text(fleet, out.width))
        return EXIT_OK
    report = fleet
    if args.format == "json":
        out.file.write(to_json_text(report))
    elif args.format == "csv":
        out.file.write(to_csv_text(report))
    else:
        out.print(to_text(report, out.width))
    return EXIT_OK


# -- simulate -----------------------------------------------------------------------------


def cmd_simulate(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    return run_simulate(args, config, clock.now(), out)


def cmd_sizing(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    return run_sizing(args, config, clock.now(), out)


# -- check --------------------------------------------------------------------------------


def cmd_eco(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    from broker.eco.now import eco_now
    from broker.eco.text import eco_text

    result = asyncio.run(eco_now(config, clock, days=args.days))
    if args.json:
        out.file.write(json.dumps(result, indent=2) + "\n")
    else:
        out.file.write(eco_text(result))
    return EXIT_OK


def _positive_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if not 0 < days <= 366:
        raise argparse.ArgumentTypeError(f"expected 0 < days <= 366, got {text}")
    return days


def cmd_check(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    problems: list[str] = []
    warnings: list[str] = []
    out.print(f"ok   config {path} is valid")

    tz = config.broker.tz
    if config.windows:
        calendar = Calendar.from_config(config.windows, tz)
        now = clock.now()
        current = calendar.current(now)
        if current and current.open_ended:
            out.print("ok   windows: open now, and always open")
        elif current:
            out.print(f"ok   windows: open now, until {local_time(current.end, tz)}")
        else:
            upcoming = calendar.openings(now, 1)
            when = local_time(upcoming[0].start, tz) if upcoming else "not within a month"
            out.print(f"ok   windows: closed now, next opens {when}")
    else:
        warnings.append("windows: none configured, so the machine is never listed")

    if config.broker.api_exposed:
        warnings.append(_exposure_warning(config))
    if config.eco.profile.enabled and config.gpus.backend != "fake" and os.geteuid() != 0:
        from broker.eco.profile import HOW_TO_GRANT

        warnings.append(f"eco.profile: enabled, but not running as root. {HOW_TO_GRANT}")
    try:
        token, why = config.broker.api_token_state()
        if token is None:
            warnings.append(
                f"{why} (POST /api/reclaim, /api/pause and /api/resume will refuse every "
                "request)"
            )
        else:
            out.print(f"ok   broker.api_token is set ({len(token)} characters)")
    except ConfigError as error:
        problems.extend(error.problems)

    provider = config.provider
    try:
        lines = provider.check()
    except ConfigError as error:
        problems.extend(error.problems)
    else:
        for line in lines:
            out.print(f"ok   provider.{provider.kind}: {line}", markup=False)
        if provider.probes_platform:
            problems.extend(_check_provider(config, clock, out))

    problems.extend(_check_ledger(config, out))
    gpu_problems, service_warnings = asyncio.run(_check_gpus_and_services(config, clock, out))
    problems.extend(gpu_problems)
    warnings.extend(service_warnings)
    problems.extend(_check_instance_and_ports(config, out))
    problems.extend(_check_notify(config, out))

    for warning in warnings:
        out.print(f"warn {warning}", markup=False)
    for problem in problems:
        out.print(f"FAIL {problem}", markup=False)
    return EXIT_USAGE if problems else EXIT_OK


def _exposure_warning(config: Config) -> str:
    return (
        f"broker.api_listen: {config.broker.api_listen} is reachable from other machines: "
        "every route (GET and /metrics too) requires the token, and only the Host names in "
        "broker.api_allowed_hosts (and loopback) are answered; 127.0.0.1 with an SSH tunnel "
        "is safer"
    )


def _check_provider(config: Config, clock: Clock, out: Console) -> list[str]:
    """Ask the marketplace itself whether it takes the key and knows the machine."""
    kind = config.provider.kind

    async def probe() -> list[str]:
        # Two tries, not the configured count: someone is waiting at the terminal.
        async with create_provider(config, clock, retry_attempts=2) as provider:
            if provider.capabilities.note:
                out.print(f"note provider.{kind}: {provider.capabilities.note}", markup=False)
            return await provider.probe()

    try:
        lines = asyncio.run(probe())
    except ProviderError as error:
        message = str(error)
        return [message if message.startswith("provider.") else f"provider.{kind}: {message}"]
    for line in lines:
        out.print(f"ok   provider.{kind}: {line}", markup=False)
    return []


async def _check_gpus_and_services(
    config: Config, clock: Clock, out: Console
) -> tuple[list[str], list[str]]:
    """Start the GPU backend the config names and probe each service once."""
    from broker.gpu import create_backend
    from broker.services import build_adapter

    problems: list[str] = []
    warnings: list[str] = []
    try:
        backend = await create_backend(config.gpus, clock)
    except BrokerError as error:
        problems.append(f"gpus.backend: {error}")
    else:
        try:
            devices = await backend.devices()
            names = ", ".join(f"{d.index}: {d.name}" for d in devices) or "none"
            out.print(f"ok   gpus ({backend.kind}): {names}", markup=False)
            problems.extend(gpu_index_problems(config, (d.index for d in devices)))
            if backend.kind == "fake" and config.gpus.backend != "fake":
                warnings.append("gpus: no NVIDIA driver answered; the service would run on "
                                "simulated GPUs")  # fmt: skip
        finally:
            await backend.close()
    for index, section in enumerate(config.services):
        adapter = build_adapter(section, clock)
        try:
            probe = await adapter.probe()
        finally:
            await adapter.aclose()
        if probe.reachable:
            out.print(f"ok   services[{index}] {section.name}: reachable at {section.upstream}",
                      markup=False)  # fmt: skip
        else:
            # Not fatal: a stopped service holds no GPU, and the broker waits for it.
            # aiohttp's "Cannot connect to host ... ssl:default [Connect call failed ...]"
            # means one thing to a user: nothing answers there.
            detail = probe.detail or "no answer"
            if "Cannot connect to host" in detail:
                detail = "nothing listens there"
            warnings.append(f"services[{index}].upstream: {section.name} is not reachable at "
                            f"{section.upstream} ({detail})")  # fmt: skip
    return problems, warnings


def _check_instance_and_ports(config: Config, out: Console) -> list[str]:
    """A running broker owns its ports, so they are probed only when none runs."""
    who = running_instance(config.broker.state_dir)
    if who is not None:
        out.print(
            f"note a gpu-broker ({who}) already runs on {config.broker.state_dir}: "
            "`gpu-broker status` asks it; a second `run` on this state_dir would refuse "
            "to start, so its listening addresses were not probed",
            markup=False,
        )
        return []
    addresses = listen_addresses(config)
    problems = listen_problems(addresses)
    if not problems:
        shown = ", ".join(listen for _, listen, _ in addresses)
        out.print(f"ok   listening addresses free: {shown}", markup=False)
    return problems


def _check_notify(config: Config, out: Console) -> list[str]:
    """Each [[notify]] URL can be read and is one apprise knows (nothing is sent)."""
    if not config.notify:
        return []
    from broker.notify import url_problem

    problems: list[str] = []
    for index, section in enumerate(config.notify):
        try:
            url = section.resolved_url()
        except ConfigError as error:
            problems.extend(p.replace("notify.url", f"notify[{index}].url") for p in error.problems)
            continue
        problem = url_problem(url)
        if problem:
            problems.append(f"notify[{index}].url: {problem}")
        else:
            scheme = url.split("://", 1)[0]
            out.print(f"ok   notify[{index}]: {scheme}:// channel, events "
                      f"{', '.join(section.events)}", markup=False)  # fmt: skip
    return problems


def _check_ledger(config: Config, out: Console) -> list[str]:
    if config.broker.database_url is not None:
        return check_shared_ledger(config, out)
    path = ledger_path(config.broker)
    if path.exists():
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            finally:
                conn.close()
        except sqlite3.Error as error:
            return [f"broker.state_dir: cannot read the ledger {path}: {error}"]
        if version > SCHEMA_VERSION:
            return [
                f"broker.state_dir: the ledger {path} is at schema version {version}, "
                f"newer than this gpu-broker ({SCHEMA_VERSION})"
            ]
        note = "" if version == SCHEMA_VERSION else f", will migrate to {SCHEMA_VERSION}"
        out.print(f"ok   ledger {path} (schema {version}{note})")
        return []
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"broker.state_dir: cannot create {path.parent}: {parent} is not writable"]
    out.print(f"ok   ledger will be created at {path}")
    return []


# -- run ----------------------------------------------------------------------------------


def cmd_run(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    from broker.daemon import Daemon

    try:
        config.broker.api_token_state()  # an unsafe token stops the start, naming its key
    except ConfigError as error:
        error.source = error.source or str(path)
        raise
    if config.broker.api_exposed:
        logging.getLogger("broker").warning("%s", _exposure_warning(config))
    stop_problems: list[str] = []

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        daemon = Daemon(config, clock)

        def reload() -> None:
            try:
                new = load_config(path)
            except ConfigError as error:
                logging.getLogger("broker").error(
                    "reload refused, keeping the running configuration: %s",
                    "; ".join(error.problems),
                )
                return
            daemon.reload(new)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        await daemon.start()
        try:
            await daemon.wait(stop)
        finally:
            logging.getLogger("broker").info("stopping")
            await daemon.aclose()
            stop_problems.extend(daemon.stop_problems)

    runtime.run(serve())  # uvloop when installed: the gates relay every request
    if stop_problems:
        # Exit 1 so systemd (and whoever reads its status) sees the stop was not clean.
        raise BrokerError("the stop could not finish: " + "; ".join(stop_problems))
    return EXIT_OK


# -- status, reclaim, pause, resume -------------------------------------------------------


def cmd_status(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    if args.fleet:
        return cmd_status_fleet(args, config, clock, out)
    status = asyncio.run(ServiceClient(config.broker, path).status())
    if args.json:
        out.print_json(data=status)
    else:
        show_status(status, config.broker.tz, out, window=window_line(config, clock.now()))
    return EXIT_OK


def window_line(config: Config, now: datetime) -> str:
    """When renting is allowed, from the config's calendar: open until when, or when the
    next window opens (what a user at a LOCAL pool wants to know)."""
    if not config.windows:
        return "no [[windows]] configured: this machine is never listed"
    tz = config.broker.tz
    calendar = Calendar.from_config(config.windows, tz)
    current = calendar.current(now)
    if current is not None:
        if current.open_ended:
            return "window: always open"
        left = describe_duration(current.end - now)
        return f"window: open until {local_time(current.end, tz)} ({left} left)"
    upcoming = calendar.openings(now, 1)
    if not upcoming:
        return "window: closed, none opens within a month"
    start = upcoming[0].start
    when = f"{local_time(start, tz)} (in {describe_duration(start - now)})"
    return f"window: closed, next opens {when}"


def cmd_ledger(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    return cmd_ledger_copy(args, config, clock, out)


def cmd_control(
    args: argparse.Namespace, config: Config, path: Path, clock: Clock, out: Console
) -> int:
    answer = asyncio.run(ServiceClient(config.broker, path).post(args.route))
    out.print(str(answer.get("message", "done")), markup=False)
    state = answer.get("state")
    if state:
        out.print(f"pool state: {state}", markup=False)
    return EXIT_OK
