"""A fake Clore.ai API (host side) on a real local port.

It speaks the wire format of Clore's API docs and official SDK (`clore-ai` 0.1.1): routes
under `/v1/`, the key in a header named `auth`, every answer JSON with an integer `code` and
HTTP 200 even for errors (3 bad key, 5 over one request a second, 2 bad input, 6 see
`error`), `GET server_config` carrying a JSON body `{"server_name": N}`.

It is stateful as the platform is understood (docs/clore.md says what is inferred):
`set_server_settings` shows or hides a server and sets its `mrl`, the longest order it
accepts; a renter's order (`rent`) starts only while the server is shown and free, holds the
whole server for the hours it chose (at most `mrl`), and ends by itself then or when the
renter stops it (`end_order`). Hiding the server ends nothing. While an order runs, the
host's wallet (`settle_wallet`) grows by its price less the host fee.

Time is the injected clock's. Tests drive it: `rent`, `end_order`, `set_online`, faults
(`fail`, `garbage`, `answer`, `code`, `slow`). Every request is recorded in `requests`.
`FakeClore.realistic(clock)` answers in `latency` (150 ms) of real time, like the real API.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from broker.clock import Clock

KEY = "clore-test-key"
REALISTIC_LATENCY = 0.15
HOST_FEE = {"on-demand": 0.05, "spot": 0.0125}  # Clore's documented host fees
RENTAL_STATUS = {"on-demand": 1, "spot": 2}  # values inferred; 0 = not rented


class Refused(Exception):
    """A renter could not rent (hidden, already rented, longer than mrl)."""


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    body: Any
    raw_body: bytes
    auth: str | None
    content_type: str | None


@dataclass
class Fault:
    kind: str  # "status" | "garbage" | "json" | "slow"
    times: int
    status: int = 500
    body: str = ""
    seconds: float = 0.0
    path: str | None = None

    def matches(self, request: web.Request) -> bool:
        return self.times > 0 and (self.path is None or request.path == self.path)


@dataclass
class Order:
    id: int
    kind: str
    start: datetime
    end: datetime  # start + the hours the renter took (at most the server's mrl)
    price_per_day: float
    ended_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.ended_at is None


@dataclass
class FakeServer:
    name: str
    id: int
    gpus: int
    visibility: str = "hidden"
    mrl: int = 72
    on_demand: float = 0.0
    spot: float = 0.0
    online: bool = True
    orders: list[Order] = field(default_factory=list)

    def running(self) -> Order | None:
        return next((o for o in self.orders if o.active), None)


class FakeClore:
    def __init__(
        self,
        clock: Clock,
        *,
        servers: dict[str, int] | None = None,
        api_keys: set[str] | None = None,
        latency: float = 0.0,
        rate_limit: float = 1.0,
        min_rental: int = 6,
        currency: str = "bitcoin",
        settle_wallet: str = "CLORE-Blockchain",
        coins_per_price_unit: float = 1.0,
        show_remaining_time: bool = True,
    ) -> None:
        self.clock = clock
        self.latency = latency
        # Seconds (on the fake's clock) one key must leave between two requests; a request
        # sooner is answered {"code": 5}. 0 = no limit.
        self.rate_limit = rate_limit
        self.min_rental = min_rental  # hours: an mrl below it is refused (code 2)
        self.currency = currency
        self.settle_wallet = settle_wallet
        self.coins_per_price_unit = coins_per_price_unit
        self.show_remaining_time = show_remaining_time
        self.api_keys = api_keys if api_keys is not None else {KEY}
        self.servers = {
            name: FakeServer(name, 100 + i, gpus)
            for i, (name, gpus) in enumerate((servers or {"rig": 4}).items())
        }
        self.wallets: dict[str, float] = {"bitcoin": 0.0, "CLORE-Blockchain": 0.0}
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.rate_limited = 0
        self._last_call: dict[str, float] = {}
        self._settled: datetime | None = None
        self._ids = itertools.count(5000)
        self._runner: web.AppRunner | None = None
        self.url = ""

    @classmethod
    def realistic(cls, clock: Clock, **kwargs: Any) -> FakeClore:
        kwargs.setdefault("latency", REALISTIC_LATENCY)
        return cls(clock, **kwargs)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(
            [
                web.get("/v1/wallets", self._wallets),
                web.get("/v1/my_servers", self._my_servers),
                web.get("/v1/server_config", self._server_config),
                web.post("/v1/set_server_settings", self._set_server_settings),
            ]
        )
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/v1"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- controls for tests -----------------------------------------------------------

    def server(self, name: str = "rig") -> FakeServer:
        return self.servers[name]

    def rent(
        self, hours: int | None = None, kind: str = "on-demand", *, name: str = "rig"
    ) -> Order:
        """A renter orders the server for `hours` (default: its mrl)."""
        self.advance()
        server = self.server(name)
        hours = server.mrl if hours is None else hours
        if server.visibility != "public":
            raise Refused("the server is hidden")
        if server.running() is not None:
            raise Refused("the server is rented")
        if not 1 <= hours <= server.mrl:
            raise Refused(f"{hours} h is over the server's mrl of {server.mrl} h")
        now = self.clock.now()
        price = server.on_demand if kind == "on-demand" else server.spot
        order = Order(next(self._ids), kind, now, now + timedelta(hours=hours), price)
        server.orders.append(order)
        return order

    def end_order(self, order: Order) -> None:
        """The renter stops its order early."""
        self.advance()
        if order.active:
            order.ended_at = self.clock.now()

    def set_online(self, online: bool, *, name: str = "rig") -> None:
        self.server(name).online = online

    def fail(self, status: int, times: int = 1, path: str | None = None) -> None:
        body = "Too Many Requests" if status == 429 else "<html>error</html>"
        self.faults.append(Fault("status", times, status=status, body=body, path=path))

    def garbage(self, times: int = 1, path: str | None = None) -> None:
        body = "<html><body>502 Bad Gateway</body></html>"
        self.faults.append(Fault("garbage", times, body=body, path=path))

    def answer(self, data: Any, times: int = 1, path: str | None = None) -> None:
        self.faults.append(Fault("json", times, body=json.dumps(data), path=path))

    def code(self, code: int, times: int = 1, path: str | None = None, error: str = "") -> None:
        """Answer HTTP 200 `{"code": code}` (with `error` for code 6), as Clore does."""
        data: dict[str, Any] = {"code": code} | ({"error": error} if error else {})
        self.answer(data, times, path)

    def slow(self, seconds: float, times: int = 1, path: str | None = None) -> None:
        self.faults.append(Fault("slow", times, seconds=seconds, path=path))

    def calls(self, path: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if path is None or r.path == path]

    # -- the platform's bookkeeping ---------------------------------------------------

    def advance(self) -> None:
        """Bring orders and wallets to the clock's now."""
        now = self.clock.now()
        since = self._settled or now
        for server in self.servers.values():
            for order in server.orders:
                stop = min(order.end, order.ended_at or order.end, now)
                start = max(order.start, since)
                if stop > start:
                    days = (stop - start).total_seconds() / 86400
                    net = order.price_per_day * days * (1 - HOST_FEE[order.kind])
                    self.wallets[self.settle_wallet] = (
                        self.wallets.get(self.settle_wallet, 0.0)
                        + net * self.coins_per_price_unit
                    )
                if order.active and order.end <= now:
                    order.ended_at = order.end
        self._settled = now

    # -- plumbing ---------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        raw = await request.read()
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                request.query_string,
                body,
                raw,
                request.headers.get("auth"),
                request.headers.get("Content-Type"),
            )
        )
        for fault in self.faults:
            if fault.matches(request):
                fault.times -= 1
                if fault.kind == "status":
                    return web.Response(status=fault.status, text=fault.body)
                if fault.kind == "garbage":
                    return web.Response(text=fault.body, content_type="text/html")
                if fault.kind == "json":
                    return web.Response(text=fault.body, content_type="application/json")
                await asyncio.sleep(fault.seconds)
                break
        key = request.headers.get("auth", "")
        if key not in self.api_keys:
            return web.json_response({"code": 3})
        if self._too_soon(key):
            self.rate_limited += 1
            return web.json_response({"code": 5})
        self.advance()
        return await handler(request)

    def _too_soon(self, key: str) -> bool:
        """One request a second per key. Only answered requests count, so a client
        that backs off gets through (how Clore counts refused ones is not known)."""
        if self.rate_limit <= 0:
            return False
        now = self.clock.monotonic()
        last = self._last_call.get(key)
        if last is not None and now - last < self.rate_limit:
            return True
        self._last_call[key] = now
        return False

    @staticmethod
    def _ok(data: dict[str, Any]) -> web.Response:
        return web.json_response(data | {"code": 0})

    @staticmethod
    async def _body(request: web.Request) -> Any:
        raw = await request.read()  # aiohttp keeps it: the middleware's read, again
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    async def _named(self, request: web.Request, key: str) -> FakeServer | web.Response:
        body = await self._body(request)
        name = body.get(key) if isinstance(body, dict) else None
        if not isinstance(name, str):
            return web.json_response({"code": 2})
        if name not in self.servers:
            return web.json_response({"code": 6, "error": "invalid_server"})
        return self.servers[name]

    def _pricing(self, server: FakeServer) -> dict[str, Any]:
        return {
            "pricing": {self.currency: server.on_demand},
            "spot_pricing": {self.currency: server.spot},
        }

    # -- routes -----------------------------------------------------------------------

    async def _wallets(self, request: web.Request) -> web.Response:
        rows = [
            {"name": name, "deposit": f"addr-{name}", "balance": round(balance, 8),
             "withdrawal_fee": 0.0001}
            for name, balance in self.wallets.items()
        ]  # fmt: skip
        return self._ok({"wallets": rows})

    async def _my_servers(self, request: web.Request) -> web.Response:
        rows = [
            {
                "name": s.name, "id": s.id, "connected": True, "visibility": s.visibility,
                "online": s.online, "min_spot_pricing": {self.currency: s.spot},
                "gpu_array": ["RTX 3090"] * s.gpus,
                "specs": {"gpu": f"{s.gpus}x NVIDIA GeForce RTX 3090"},
            } | self._pricing(s)
            for s in self.servers.values()
        ]  # fmt: skip
        return self._ok({"servers": rows, "limit": 10})

    async def _server_config(self, request: web.Request) -> web.Response:
        server = await self._named(request, "server_name")
        if isinstance(server, web.Response):
            return server
        order = server.running()
        config: dict[str, Any] = {
            "name": server.name, "id": server.id, "connected": True,
            "visibility": server.visibility, "mrl": server.mrl, "online": server.online,
            "initialized": True,
            "rental_status": RENTAL_STATUS[order.kind] if order else 0,
            "gpu_array": ["RTX 3090"] * server.gpus,
            "specs": {"gpu": f"{server.gpus}x NVIDIA GeForce RTX 3090"},
            "background_job": None,
        } | self._pricing(server)  # fmt: skip
        if self.show_remaining_time:
            left = (order.end - self.clock.now()).total_seconds() / 3600 if order else 0.0
            config["remaining_time"] = left
        return self._ok({"config": config, "creation_completed": True})

    async def _set_server_settings(self, request: web.Request) -> web.Response:
        server = await self._named(request, "name")
        if isinstance(server, web.Response):
            return server
        body = await self._body(request)
        availability = body.get("availability")
        mrl = body.get("mrl")
        on_demand = body.get("on_demand")
        spot = body.get("spot")
        numbers = (on_demand, spot)
        if (
            not isinstance(availability, bool)
            or not isinstance(mrl, int)
            or isinstance(mrl, bool)
            or not self.min_rental <= mrl <= 3000
            or not all(isinstance(n, int | float) and n > 0 for n in numbers)
        ):
            return web.json_response({"code": 2})
        server.visibility = "public" if availability else "hidden"
        server.mrl = mrl
        server.on_demand = float(on_demand)
        server.spot = float(spot)
        return self._ok({})


async def started(fake: FakeClore) -> FakeClore:
    await fake.start()
    return fake


__all__ = ["KEY", "FakeClore", "Order", "Recorded", "Refused", "started"]
