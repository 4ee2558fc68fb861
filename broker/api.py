"""The HTTP API on `broker.api_listen` (SPEC section 7).

`GET /api/status` is open on loopback (it holds no secret); the POST routes change what
the broker does and need `Authorization: Bearer <token>`, the token named by
`api_token_env` / `api_token_file`. Without a configured token they refuse everything: an
open control route on a shared server would let anyone take the GPUs. An API listening
beyond loopback needs the token on every route, GET and /metrics included.

Every route first checks `Host` (loopback, the listen address or `api_allowed_hosts`,
else 403), so a web page that rebinds its own name to 127.0.0.1 cannot read or drive it.
The listener closes connections that send no complete request within
`KEEPALIVE_TIMEOUT_S` or stay idle that long, and holds at most `MAX_CONNECTIONS`.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, time, timedelta
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.config import HOST_NAME, BrokerSection
from broker.connlimit import CappedSite, ConnectionLimit
from broker.eco.view import eco_view
from broker.errors import BrokerError, ConfigError, LedgerError
from broker.hosts import HostCheck
from broker.ledger.base import StateInterval, host_view
from broker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from broker.report import ReportError, build_report
from broker.report.fleet import build_fleet_report
from broker.report.fleet_status import fleet_status
from broker.scheduling.status import POOL
from broker.sizing.heatmap import local_use_week
from broker.units import parse_hostport

if TYPE_CHECKING:
    from broker.scheduling.status import StatusSource

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Idle keep-alive, and the time a connection has to send a complete request head (aiohttp
# arms the same timer when a connection opens): a slow or silent client is closed by then.
KEEPALIVE_TIMEOUT_S = 15.0
MAX_CONNECTIONS = 256
# Why a 401: the client tells "the service has no token" from "another token" by these,
# without the answer saying anything about the token itself.
NO_TOKEN, WRONG_TOKEN, MISSING_TOKEN = "no_token", "wrong_token", "missing_token"


class ApiServer:
    def __init__(
        self,
        daemon: StatusSource,
        broker: BrokerSection,
        *,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._daemon = daemon
        self._token: str | None = None
        self._token_problem = ""
        self._listen = parse_hostport(broker.api_listen)
        self._exposed = broker.api_exposed
        self._hosts = HostCheck(self._listen[0])
        self.configure(broker)
        self._keepalive_timeout = keepalive_timeout
        self.limit = ConnectionLimit("API", max_connections)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = web.Application(middlewares=[self._gatekeeper])
        self.app.router.add_get("/", self._dashboard)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/api/status", self._status)
        self.app.router.add_get("/api/timeline", self._timeline)
        self.app.router.add_get("/api/report", self._report)
        self.app.router.add_get("/api/local-use", self._local_use)
        self.app.router.add_get("/api/eco", self._eco)
        self.app.router.add_get("/api/fleet", self._fleet)
        self.app.router.add_post("/api/reclaim", self._guarded(self._reclaim))
        self.app.router.add_post("/api/pause", self._guarded(self._pause))
        self.app.router.add_post("/api/resume", self._guarded(self._resume))

    def configure(self, broker: BrokerSection) -> None:
        self._hosts = HostCheck(self._listen[0], broker.api_allowed_hosts)
        try:
            self._token, self._token_problem = broker.api_token_state()
        except ConfigError as err:
            self._token = None
            self._token_problem = "; ".join(err.problems)
        if self._token is None:
            log.warning(
                "%s refuse every request: %s",
                "all routes" if self._exposed else "POST routes", self._token_problem,
            )  # fmt: skip

    @web.middleware
    async def _gatekeeper(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._hosts.allows(request.headers.get("Host")):
            return web.json_response(
                {"error": "this Host is not one the API answers to (broker.api_allowed_hosts)"},
                status=403,
            )
        if self._exposed:
            refusal = self._refusal(request)
            if refusal is not None:
                return refusal
        return await handler(request)

    def _refusal(self, request: web.Request) -> web.Response | None:
        """401 unless the request carries the configured token."""
        expected = self._token
        if expected is None:
            return _unauthorized(self._token_problem, NO_TOKEN)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given or not hmac.compare_digest(
            given.encode(), expected.encode()
        ):
            why = WRONG_TOKEN if given else MISSING_TOKEN
            return _unauthorized("a valid 'Authorization: Bearer <token>' header is required", why)
        return None

    @property
    def url(self) -> str:
        host = self._listen[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port or self._listen[1]}"

    async def start(self) -> None:
        if self._exposed:
            log.warning(
                "the API listens on %s, beyond this machine: every route needs the token, "
                "and anyone who can reach it can try; prefer 127.0.0.1 and an SSH tunnel",
                self.url,
            )
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self._keepalive_timeout,
        )
        await self._runner.setup()
        host, port = self._listen
        site = CappedSite(self._runner, host, port, self.limit)
        try:
            await site.start()
        except OSError as err:
            await self._runner.cleanup()
            self._runner = None
            why = "the address is in use" if err.errno == errno.EADDRINUSE else err.strerror
            raise BrokerError(f"broker.api_listen: cannot listen on {host}:{port}: {why}") from None
        sockets = site.server.sockets if site.server is not None else []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- routes -------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._daemon.status())

    async def _metrics(self, request: web.Request) -> web.Response:
        metrics = self._daemon.metrics
        if metrics is None:
            return web.json_response({"error": "the broker is not started"}, status=503)
        return web.Response(
            body=await metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    async def _dashboard(self, request: web.Request) -> web.Response:
        page, csp = dashboard_page()
        return web.Response(
            text=page,
            content_type="text/html",
            charset="utf-8",
            headers={
                # The page's own inline script and style only (by hash), data from this
                # origin only: nothing else can run in it or be loaded by it.
                "Content-Security-Policy": csp,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    async def _timeline(self, request: web.Request) -> web.Response:
        """Pool and per-GPU state intervals over the last `hours`, clipped to the range."""
        hours = _int_query(request, "hours", default=24, low=1, high=24 * 62)
        ledger = self._daemon.ledger
        if ledger is None:
            return web.json_response({"error": "the broker is not started"}, status=503)
        now = self._daemon.clock.now()
        start = now - timedelta(hours=hours)
        tz = self._daemon.config.broker.tz
        # Asked a moment past now: a state entered this very instant is the current one.
        until = now + timedelta(seconds=1)
        pool = await ledger.state_intervals(start, until, scope="pool", subject=POOL)
        if pool and pool[0].start > start:
            # The range follows the data: no blank bar for the hours before the ledger began.
            start = pool[0].start
        per_gpu = await ledger.state_intervals(start, until, scope="gpu")
        devices = self._daemon.scheduler.sampler.devices
        by_uuid: dict[str, list[dict[str, Any]]] = {d.uuid: [] for d in devices}
        for interval in per_gpu:
            by_uuid.setdefault(interval.subject, []).append(_clipped(interval, start, now, tz))
        index_of = {d.uuid: d.index for d in devices}
        name_of = {d.uuid: d.name for d in devices}
        gpus = [
            {
                "index": index_of.get(uuid),  # None: a GPU seen before, not present now
                "uuid": uuid,
                "name": name_of.get(uuid),
                "intervals": intervals,
            }
            for uuid, intervals in by_uuid.items()
        ]
        gpus.sort(key=lambda g: (g["index"] is None, g["index"] or 0, g["uuid"]))
        return web.json_response(
            {
                "from": start.astimezone(tz).isoformat(),
                "to": now.astimezone(tz).isoformat(),
                "timezone": self._daemon.config.broker.timezone,
                "pool": {
                    "name": POOL,
                    "intervals": [_clipped(i, start, now, tz) for i in pool],
                },
                "gpus": gpus,
            }
        )

    async def _eco(self, request: web.Request) -> web.Response:
        """Each card's idle draw and eco flags over the last `days` (default 7)."""
        days = _int_query(request, "days", default=7, low=1, high=366)
        return web.json_response(await eco_view(self._daemon, days))

    async def _report(self, request: web.Request) -> web.Response:
        """The report by day over the last `days` local days, today included."""
        days = _int_query(request, "days", default=14, low=1, high=366)
        ledger = self._daemon.ledger
        if ledger is None:
            return web.json_response({"error": "the broker is not started"}, status=503)
        config = self._daemon.config
        now = self._daemon.clock.now()
        first = now.astimezone(config.broker.tz).date() - timedelta(days=days - 1)
        since = datetime.combine(first, time(0), tzinfo=config.broker.tz)
        # ?host=NAME reads another host of a shared ledger, ?host=all each host and their
        # sum (the fleet report's JSON); default this host, as before.
        host = request.query.get("host") or ledger.host
        if host != "all" and not HOST_NAME.fullmatch(host):
            return web.json_response({"error": "host: expected a host name or all"}, status=400)
        if config.broker.database_url is None:
            # A ledger of its own: no empty days from before it began. A shared one keeps the
            # days asked for, so each host's report lines up with the fleet's.
            began = await ledger.state_intervals(since, now, scope="pool", subject=POOL)
            if began and began[0].start > since:
                since = began[0].start
        try:
            if host == "all":
                fleet = await build_fleet_report(
                    ledger, await ledger.hosts() or [ledger.host], config,
                    since=since, until=now, now=now,
                )  # fmt: skip
                return web.json_response(fleet.to_json())
            async with host_view(ledger, host) as view:
                report = await build_report(view, config, since=since, until=now, now=now)
        except ReportError as err:
            return web.json_response({"error": str(err)}, status=500)
        return web.json_response(report.to_json())

    async def _local_use(self, request: web.Request) -> web.Response:
        """The week heat map of local use over the last `days` (docs/api.md)."""
        days = _int_query(request, "days", default=28, low=1, high=366)
        ledger = self._daemon.ledger
        if ledger is None:
            return web.json_response({"error": "the broker is not started"}, status=503)
        now = self._daemon.clock.now()
        tz = self._daemon.config.broker.tz
        return web.json_response(
            await local_use_week(ledger, tz, now - timedelta(days=days), now)
        )

    async def _fleet(self, request: web.Request) -> web.Response:
        """Every host's last known state and today's figures, when the ledger is shared
        (`shared` false and no hosts otherwise): the dashboard's fleet table."""
        ledger = self._daemon.ledger
        if ledger is None:
            return web.json_response({"error": "the broker is not started"}, status=503)
        config = self._daemon.config
        if config.broker.database_url is None:
            return web.json_response({"shared": False, "hosts": []})
        now = self._daemon.clock.now()
        try:
            hosts = await fleet_status(ledger, config, now)
        except ReportError as err:
            return web.json_response({"error": str(err)}, status=500)
        except LedgerError as err:  # the shared database is away
            return web.json_response({"error": str(err)}, status=503)
        return web.json_response(
            {
                "shared": True,
                "currency": config.energy.currency,
                "this_host": ledger.host,
                "hosts": [h.to_json(now) for h in hosts],
            }
        )

    def _guarded(self, handler: Handler) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            refusal = self._refusal(request)
            return refusal if refusal is not None else await handler(request)

        return check

    async def _reclaim(self, request: web.Request) -> web.Response:
        scheduler = self._daemon.scheduler
        await scheduler.reclaim()
        return self._ack("reclaim requested")

    async def _pause(self, request: web.Request) -> web.Response:
        await self._daemon.scheduler.pause()
        return self._ack("paused: the machine will not be listed until resume")

    async def _resume(self, request: web.Request) -> web.Response:
        await self._daemon.scheduler.resume()
        return self._ack("resumed")

    def _ack(self, message: str) -> web.Response:
        scheduler = self._daemon.scheduler
        locked = scheduler.locked_until()
        return web.json_response(
            {
                "ok": True,
                "message": message,
                "state": scheduler.state.value,
                "locked_until": locked.isoformat() if locked else None,
            }
        )


def _int_query(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise web.HTTPBadRequest(
            text=f'{{"error": "{name} must be a whole number from {low} to {high}"}}',
            content_type="application/json",
        )
    return value


def _clipped(
    interval: StateInterval, start: datetime, now: datetime, tz: Any
) -> dict[str, Any]:
    # An open interval (end None) runs until now; the page needs both ends inside its range.
    end = interval.end if interval.end is not None else now
    return {
        "state": interval.state,
        "start": max(interval.start, start).astimezone(tz).isoformat(),
        "end": min(end, now).astimezone(tz).isoformat(),
        "open": interval.end is None,
        "reason": interval.reason,
    }


@cache
def dashboard_page() -> tuple[str, str]:
    """The page (broker/dashboard.html) and a Content-Security-Policy allowing exactly its
    inline script and style by their SHA-256."""
    page = resources.files("broker").joinpath("dashboard.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in found
        )

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, csp


def _unauthorized(message: str, reason: str) -> web.Response:
    return web.json_response(
        {"error": message, "reason": reason},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="gpu-broker"'},
    )
