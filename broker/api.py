"""The HTTP API on `broker.api_listen` (SPEC section 7).

`GET /api/status` is open (it is on loopback by default and holds no secret); the POST
routes change what the broker does and need `Authorization: Bearer <token>`, the token
named by `api_token_env` / `api_token_file`. Without a configured token they refuse
everything: an open control route on a shared server would let anyone take the GPUs.
"""

from __future__ import annotations

import errno
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from broker.config import BrokerSection
from broker.errors import BrokerError, ConfigError
from broker.units import parse_hostport

if TYPE_CHECKING:
    from broker.daemon import Daemon

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiServer:
    def __init__(self, daemon: Daemon, broker: BrokerSection) -> None:
        self._daemon = daemon
        self._token: str | None = None
        self._token_problem = ""
        self.configure(broker)
        self._listen = parse_hostport(broker.api_listen)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = web.Application()
        self.app.router.add_get("/api/status", self._status)
        self.app.router.add_post("/api/reclaim", self._guarded(self._reclaim))
        self.app.router.add_post("/api/pause", self._guarded(self._pause))
        self.app.router.add_post("/api/resume", self._guarded(self._resume))

    def configure(self, broker: BrokerSection) -> None:
        try:
            self._token = broker.api_token()
            self._token_problem = "" if self._token else (
                "no API token is configured (broker.api_token_env or broker.api_token_file)"
            )
        except ConfigError as err:
            self._token = None
            self._token_problem = "; ".join(err.problems)
            log.warning("POST routes refuse every request: %s", self._token_problem)

    @property
    def url(self) -> str:
        host = self._listen[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port or self._listen[1]}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = self._listen
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            await self._runner.cleanup()
            self._runner = None
            why = "the address is in use" if err.errno == errno.EADDRINUSE else err.strerror
            raise BrokerError(f"broker.api_listen: cannot listen on {host}:{port}: {why}") from None
        server = site._server  # aiohttp keeps the asyncio server here; it has the real port
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- routes -------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._daemon.status())

    def _guarded(self, handler: Handler) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            expected = self._token
            if expected is None:
                return _unauthorized(self._token_problem)
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), expected.encode()
            ):
                return _unauthorized("a valid 'Authorization: Bearer <token>' header is required")
            return await handler(request)

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


def _unauthorized(message: str) -> web.Response:
    return web.json_response(
        {"error": message},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="gpu-broker"'},
    )
