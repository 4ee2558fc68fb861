"""The command line's side of the HTTP API: `status`, `reclaim`, `pause`, `resume`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from rich.console import Console
from rich.table import Table

from broker.api import NO_TOKEN, WRONG_TOKEN
from broker.config import BrokerSection
from broker.errors import BrokerError
from broker.units import parse_hostport

_TIMEOUT = aiohttp.ClientTimeout(total=10)


class ServiceClient:
    def __init__(self, broker: BrokerSection, config_path: Path | None = None) -> None:
        self._broker = broker
        self._config_path = config_path
        host, port = parse_hostport(broker.api_listen)
        # A service listening on every address is reached on loopback.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        shown = f"[{host}]" if ":" in host else host
        self.base = f"http://{shown}:{port}"

    async def status(self) -> dict[str, Any]:
        # Beyond loopback the API wants the token on every route; on loopback none is needed.
        headers: dict[str, str] = {}
        if self._broker.api_exposed:
            token = self._broker.api_token()
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
        return await self._call("GET", "/api/status", headers)

    async def post(self, route: str) -> dict[str, Any]:
        token = self._broker.api_token()  # raises ConfigError naming the key when unset
        if token is None:
            raise BrokerError(
                "no API token: set broker.api_token_env (and that variable) or "
                "broker.api_token_file, the same as the running service uses"
            )
        return await self._call("POST", f"/api/{route}", {"Authorization": f"Bearer {token}"})

    async def _call(self, method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
        url = self.base + path
        try:
            async with (
                aiohttp.ClientSession(timeout=_TIMEOUT) as session,
                session.request(method, url, headers=headers) as response,
            ):
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                if not isinstance(body, dict):
                    raise BrokerError(f"{url}: HTTP {response.status}, not a gpu-broker answer")
                if response.status == 401:
                    raise BrokerError(self._unauthorized(body))
                if response.status >= 400:
                    raise BrokerError(f"{url}: {body.get('error', f'HTTP {response.status}')}")
                return body
        except aiohttp.ClientConnectionError:
            # aiohttp's own text ("Cannot connect to host ... ssl:default [Connect call
            # failed ...]") says nothing a user can act on: say how to start it instead.
            config = f" -c {self._config_path}" if self._config_path else ""
            raise BrokerError(
                f"gpu-broker is not running at {self.base} (broker.api_listen). Start it with "
                f"`gpu-broker run{config}`, or `sudo systemctl start gpu-broker` where it is "
                "installed as a service"
            ) from None
        except TimeoutError:
            raise BrokerError(f"gpu-broker at {self.base} did not answer in time") from None


    def _unauthorized(self, body: dict[str, Any]) -> str:
        """What is wrong with the token, from the 401's `reason` (never the token itself)."""
        source = (
            f"the file {self._broker.api_token_file}"
            if self._broker.api_token_file is not None
            else f"the environment variable {self._broker.api_token_env}"
        )
        reason = body.get("reason")
        if reason == NO_TOKEN:
            return (
                f"the running gpu-broker at {self.base} has no API token, so it refuses every "
                f"control request ({body.get('error')}). Set {source} for the service too "
                "and restart it (or send it SIGHUP after setting a token file)"
            )
        if reason == WRONG_TOKEN:
            return (
                f"the running gpu-broker at {self.base} has another API token than the one "
                f"in {source}: give this command the same token the service was started with"
            )
        return f"{self.base}: {body.get('error', 'HTTP 401')}"


def _when(value: object, tz: ZoneInfo) -> str:
    if not isinstance(value, str):
        return "-"
    return datetime.fromisoformat(value).astimezone(tz).strftime("%a %Y-%m-%d %H:%M:%S %Z")


def _num(value: object, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "?"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:.{digits}f}{unit}"
    return str(value)


def show_status(
    status: dict[str, Any], tz: ZoneInfo, out: Console, window: str | None = None
) -> None:
    for pool in status.get("pools", []):
        out.print(
            f"Pool {pool['name']}: [bold]{pool['state']}[/bold] since {_when(pool['since'], tz)}"
        )
        out.print(f"  {pool.get('reason', '')}", markup=False)
        if window:
            out.print(f"  {window}", markup=False)
        if pool.get("listed_until"):
            out.print(f"  offer ends {_when(pool['listed_until'], tz)}")
        if pool.get("locked_until"):
            out.print(f"  rented until {_when(pool['locked_until'], tz)}")
        if pool.get("paused"):
            out.print("  paused: run `gpu-broker resume` to allow listing again")

    gpus = Table(title="GPUs", title_justify="left")
    for column in ("#", "name", "util", "memory", "power", "energy", "idle"):
        gpus.add_column(column, justify="right" if column not in ("name", "idle") else "left")
    for gpu in status.get("gpus", []):
        idle = "lost" if gpu.get("lost") else ("yes" if gpu.get("idle") else gpu.get("idle_reason"))
        gpus.add_row(
            str(gpu["index"]),
            gpu["name"],
            _num(gpu["utilization_pct"], " %"),
            _num(gpu["memory_used_mb"], " MB"),
            _num(gpu["power_w"], " W", 1),
            _num(gpu["energy_wh"], " Wh", 1),
            str(idle or "no"),
        )
    out.print(gpus)

    services = Table(title="Services", title_justify="left")
    for column in ("name", "kind", "reachable", "gate", "in flight", "held", "last request"):
        services.add_column(column)
    for service in status.get("services", []):
        services.add_row(
            service["name"],
            service["kind"],
            _num(service["reachable"]),
            f"{service.get('gate') or '-'} ({service.get('gate_mode') or 'no gate'})",
            _num(service["in_flight"]),
            _num(service["held"]),
            _when(service["last_request_at"], tz),
        )
    out.print(services)

    provider = status.get("provider", {})
    listed = provider.get("listed")
    out.print(
        f"Provider {provider.get('kind')}: "
        + ("unreachable" if listed is None else ("listed" if listed else "not listed"))
        + f", {_num(provider.get('rentals_running'))} rental(s) running",
        markup=False,
    )
    if provider.get("note"):
        out.print(f"  {provider['note']}", markup=False)
    pricing = provider.get("pricing")
    if isinstance(pricing, dict):
        out.print(f"  {pricing_line(pricing, tz)}", markup=False)


def pricing_line(pricing: dict[str, Any], tz: ZoneInfo) -> str:
    """price_gpu = "market": the ask beside the market, in one line."""

    def usd(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, int | float) else "-"

    rank, peers = pricing.get("rank"), pricing.get("peers")
    place = f", rank {rank} of {peers + 1}" if rank is not None and peers is not None else ""
    line = (
        f"ask {usd(pricing.get('ask'))} USD/GPU-h (floor {usd(pricing.get('floor'))}), "
        f"market median {usd(pricing.get('market_median'))}{place}, "
        f"{_num(peers)} peers, searched {_when(pricing.get('searched_at'), tz)}: "
        f"{pricing.get('reason')}"
    )
    if pricing.get("read_error"):
        line += f" (last read failed: {pricing['read_error']})"
    return line
