"""A fake Vast.ai API (host side) on a real local port, behaving like the platform.

It speaks the wire protocol the official `vastai` client speaks and follows the platform's
contract rules (through `broker.providers.contracts`, which the paper market shares):
offers with end dates, rentals that keep the end date and price they started with,
unlisting that ends nothing, extension when the end date moves later, on-demand displacing
interruptible, earnings per day. Time is the injected clock's.

The host can rent its own offer (`search offers`, `create instance`, `show instance(s)`,
`destroy instance`): a free on-demand self-rental that displaces interruptible renters until
it is destroyed. Modelled inferences (FACTS.md): an unlisted machine has no offer to rent,
and the platform counts the self-rental like any on-demand contract (`D` GPUs).

Tests drive it: `add_rental`, `end_rental`, `set_online`, and faults (`fail`, `garbage`,
`answer`, `slow`, `drop_writes`, `rate_limit`). Every request is recorded in `requests`.

`FakeVast.realistic(clock)` behaves as the real platform does towards a client: every answer
takes `latency` (150 ms), and each endpoint answers 429 "Too Many Requests" (plain text) when
called again within `endpoint_spacing` (1.5 s on the fake's clock). `rental_visible_after`
delays a new rental in `GET /machines` as the real API lags a renter's container.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from aiohttp import web

from broker.clock import Clock, FakeClock
from broker.providers.base import RentalKind
from broker.providers.contracts import Contract, ContractBook, RentRefused

T = TypeVar("T")
DAY = 86400.0
EPOCH = date(1970, 1, 1)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str  # raw, as sent
    body: Any  # decoded JSON, or None when there was no body
    raw_body: bytes
    authorization: str | None
    content_type: str | None


@dataclass
class Fault:
    kind: str  # "status" | "garbage" | "json" | "slow"
    times: int
    status: int = 500
    body: str = ""
    seconds: float = 0.0
    path: str | None = None  # only requests whose path starts with this
    method: str | None = None  # only requests with this method

    def matches(self, request: web.Request) -> bool:
        return (
            self.times > 0
            and (self.path is None or request.path.startswith(self.path))
            and (self.method is None or request.method == self.method)
        )


@dataclass
class FakeMachine:
    id: int
    book: ContractBook
    gpu_name: str = "RTX 3090"
    online: bool = True
    price_disk: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


ASK_BASE = 70000  # a machine's ask (offer) id is ASK_BASE + its id
# The real API answers in 100-300 ms and rate-limits each endpoint to one call every
# second or few (FACTS.md); `FakeVast.realistic` uses these.
REALISTIC_LATENCY = 0.15
REALISTIC_SPACING = 1.5


@dataclass
class FakeInstance:
    """An instance the account rents: here only the host's self-rentals."""

    contract: Contract
    machine_id: int
    body: dict[str, Any]
    destroyed: bool = False


class FakeVast:
    def __init__(
        self,
        clock: Clock,
        *,
        machines: dict[int, int] | None = None,
        api_keys: set[str] | None = None,
        latency: float = 0.0,
        endpoint_spacing: float = 0.0,
        rental_visible_after: float = 0.0,
    ) -> None:
        self.clock = clock
        # Real seconds every answer takes (the network and the platform): the real API
        # answers in 100-300 ms, never at once.
        self.latency = latency
        # Seconds (on the fake's clock) each endpoint (method and route) wants between two
        # calls; a call sooner is answered 429. 0 = no limit.
        self.endpoint_spacing = endpoint_spacing
        # Seconds (on the fake's clock) between a rental starting and `GET /machines`
        # showing it: a renter's container may load the GPUs before the API shows the
        # rental. Earnings and the contract rules count it from its start.
        self.rental_visible_after = rental_visible_after
        self.api_keys = api_keys if api_keys is not None else {"test-key"}
        self.machines = {
            mid: FakeMachine(mid, ContractBook(num_gpus=n))
            for mid, n in (machines or {4242: 4}).items()
        }
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.dropped_writes = 0
        self.instances: dict[int, FakeInstance] = {}
        # The market (FACTS.md, "Vast.ai market prices"): other hosts' offers as `POST
        # /bundles/` rows (`add_peer`), a renter pays `platform_share` x the host's price,
        # and the metrics endpoint answers `metrics` rows (`gpu_name`, `price_median`...).
        self.peers: list[dict[str, Any]] = []
        self.platform_share = 1.25
        self.metrics: list[dict[str, Any]] = []
        self._rate_limits: dict[str, float] = {}
        self._last_call: dict[str, float] = {}
        self.rate_limited = 0  # requests answered 429 by a rate limit (not by `fail`)
        self._runner: web.AppRunner | None = None
        self.url = ""

    @classmethod
    def realistic(cls, clock: Clock, **kwargs: Any) -> FakeVast:
        """A fake with the real platform's latency and per-endpoint rate limits (each
        can be overridden by keyword)."""
        kwargs.setdefault("latency", REALISTIC_LATENCY)
        kwargs.setdefault("endpoint_spacing", REALISTIC_SPACING)
        return cls(clock, **kwargs)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(
            [
                web.get("/api/v0/users/current", self._user),
                web.get("/api/v0/users/current/", self._user),
                web.put("/api/v0/machines/create_asks/", self._create_asks),
                web.delete("/api/v0/machines/{id}/asks/", self._unlist),
                web.get("/api/v0/machines", self._machines),
                web.get("/api/v0/machines/{id}", self._machine),
                web.get("/api/v0/users/me/machine-earnings", self._earnings),
                web.post("/api/v0/bundles/", self._search_offers),
                web.get("/api/v0/metrics/gpu/current/", self._metrics),
                web.put("/api/v0/asks/{id}/", self._create_instance),
                web.get("/api/v0/instances/{id}/", self._show_instance),
                web.delete("/api/v0/instances/{id}/", self._destroy_instance),
                web.get("/api/v1/instances/", self._show_instances),
            ]
        )
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- controls for tests -----------------------------------------------------------

    def machine(self, machine_id: int = 4242) -> FakeMachine:
        return self.machines[machine_id]

    def add_rental(
        self,
        kind: RentalKind | str,
        gpus: int = 1,
        *,
        machine_id: int = 4242,
        bid: float | None = None,
        leaves_at: datetime | None = None,
    ) -> Contract:
        """A renter rents the live offer (raises `RentRefused` as the platform would)."""
        return self.machine(machine_id).book.rent(
            self.clock.now(), RentalKind(kind), gpus, bid=bid, leaves_at=leaves_at
        )

    def end_rental(self, contract_id: int, *, machine_id: int = 4242) -> None:
        self.machine(machine_id).book.end(self.clock.now(), contract_id)

    def set_online(self, online: bool, *, machine_id: int = 4242) -> None:
        self.machine(machine_id).online = online

    def fail(
        self,
        status: int,
        times: int = 1,
        body: str = "",
        path: str | None = None,
        method: str | None = None,
    ) -> None:
        """The next `times` requests (to `path...` by `method`, when given) answer `status`
        (429 comes as plain text, no Retry-After, as Vast sends it)."""
        if not body:
            body = (
                "Too Many Requests"
                if status == 429
                else json.dumps({"success": False, "error": "server_error", "msg": "oops"})
            )
        self.faults.append(
            Fault("status", times, status=status, body=body, path=path, method=method)
        )

    def garbage(self, times: int = 1, path: str | None = None, method: str | None = None) -> None:
        """Answer 200 with an HTML page, as a proxy in front of the API sometimes does."""
        body = "<html><body>502 Bad Gateway</body></html>"
        self.faults.append(Fault("garbage", times, body=body, path=path, method=method))

    def answer(
        self, data: Any, times: int = 1, path: str | None = None, method: str | None = None
    ) -> None:
        """Answer 200 with this JSON instead (a shape the client may not expect)."""
        body = json.dumps(data)
        self.faults.append(Fault("json", times, body=body, path=path, method=method))

    def slow(
        self, seconds: float, times: int = 1, path: str | None = None, method: str | None = None
    ) -> None:
        """Wait `seconds` of real time before answering (for client timeouts). Only the
        stalled request waits: the server goes on answering others meanwhile."""
        self.faults.append(Fault("slow", times, seconds=seconds, path=path, method=method))

    def drop_writes(self, times: int = 1) -> None:
        """Answer the next writes `success` without doing them."""
        self.dropped_writes += times

    def rate_limit(self, endpoint_prefix: str, seconds: float) -> None:
        """429 when a path starting with the prefix is called again (same method) within
        `seconds` of the last call it answered (on the fake's clock)."""
        self._rate_limits[endpoint_prefix] = seconds

    def calls(self, *, method: str | None = None, path: str | None = None) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and (path is None or r.path == path)
        ]

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
                request.headers.get("Authorization"),
                request.headers.get("Content-Type"),
            )
        )
        for fault in self.faults:
            if fault.matches(request):
                fault.times -= 1
                if fault.kind == "status":
                    ctype = "text/plain" if fault.status == 429 else "application/json"
                    return web.Response(status=fault.status, text=fault.body, content_type=ctype)
                if fault.kind == "garbage":
                    return web.Response(text=fault.body, content_type="text/html")
                if fault.kind == "json":
                    return web.Response(text=fault.body, content_type="application/json")
                await asyncio.sleep(fault.seconds)
                break
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.api_keys:
            return web.json_response(
                {"success": False, "error": "auth_error", "msg": "Invalid user key"}, status=401
            )
        if self._too_soon(request):
            self.rate_limited += 1
            return web.Response(status=429, text="Too Many Requests")
        for machine in self.machines.values():
            machine.book.advance(self.clock.now())
        return await handler(request)

    def _too_soon(self, request: web.Request) -> bool:
        """Per-endpoint rate limits. Whether the real platform counts a refused call
        towards the next is not known; here only answered calls do, so a client that
        backs off gets through."""
        now = self.clock.monotonic()
        limits = [
            (f"{request.method} {prefix}", spacing)
            for prefix, spacing in self._rate_limits.items()
            if request.path.startswith(prefix)
        ]
        if self.endpoint_spacing > 0:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else request.path
            limits.append((f"{request.method} {route}", self.endpoint_spacing))
        for key, spacing in limits:
            last = self._last_call.get(key)
            if last is not None and now - last < spacing:
                return True
        for key, _ in limits:
            self._last_call[key] = now
        return False

    @staticmethod
    def _error(status: int, msg: str, error: str = "invalid_args") -> web.Response:
        return web.json_response({"success": False, "error": error, "msg": msg}, status=status)

    def _owned(self, request: web.Request) -> FakeMachine | None:
        try:
            return self.machines.get(int(request.match_info["id"]))
        except ValueError:
            return None

    # -- routes -----------------------------------------------------------------------

    async def _user(self, request: web.Request) -> web.Response:
        return web.json_response({"id": 1, "username": "host", "host_agreement_accepted": True})

    async def _create_asks(self, request: web.Request) -> web.Response:
        body = await request.json()
        machine = self.machines.get(body.get("machine"))
        if machine is None:
            return self._error(404, f"machine {body.get('machine')} not found")
        if body.get("min_chunk") is None:
            return self._error(400, "min_chunk: must be an integer, got null")
        book = machine.book
        price = body.get("price_gpu")
        if price is None:
            price = book.offer.price_gpu or None
        if price is None:
            return self._error(400, "price_gpu is required for a first listing")
        end = body.get("end_date")
        end_date = datetime.fromtimestamp(end, UTC) if end is not None else None
        if end_date is not None and end_date <= self.clock.now():
            return self._error(400, "end_date is in the past")
        if self.dropped_writes:
            self.dropped_writes -= 1
            return web.json_response({"success": True, "extended": 0})
        extended = book.list_offer(
            self.clock.now(), float(price), end_date, body.get("price_min_bid"),
            int(body["min_chunk"]),
        )  # fmt: skip
        if body.get("price_disk") is not None:
            machine.price_disk = float(body["price_disk"])
        return web.json_response({"success": True, "extended": extended})

    async def _unlist(self, request: web.Request) -> web.Response:
        machine = self._owned(request)
        if machine is None:
            return self._error(404, "machine not found")
        if self.dropped_writes:
            self.dropped_writes -= 1
        else:
            machine.book.unlist(self.clock.now())
        return web.json_response({"success": True, "machine_id": machine.id, "user_id": 1})

    async def _machines(self, request: web.Request) -> web.Response:
        return web.json_response({"machines": [self.render(m) for m in self.machines.values()]})

    async def _machine(self, request: web.Request) -> web.Response:
        machine = self._owned(request)
        return web.json_response([self.render(machine)] if machine else [])

    async def _earnings(self, request: web.Request) -> web.Response:
        try:
            sday = float(json.loads(request.query["sday"]))
            eday = float(json.loads(request.query["eday"]))
            machid = json.loads(request.query.get("machid", "null"))
        except (KeyError, ValueError):
            return self._error(400, "sday and eday are required")
        first, last = math.floor(sday), math.floor(eday)
        per_day: dict[int, float] = {}
        per_machine = []
        for machine in self.machines.values():
            if machid is not None and machine.id != machid:
                continue
            total = 0.0
            for day, amount in machine.book.earnings_by_day.items():
                number = (day - EPOCH).days
                if first <= number <= last:
                    per_day[number] = per_day.get(number, 0.0) + amount
                    total += amount
            per_machine.append(
                {"machine_id": machine.id, "gpu_earn": total, "sto_earn": 0.0,
                 "bwu_earn": 0.0, "bwd_earn": 0.0}
            )  # fmt: skip
        rows = [
            {"day": d, "gpu_earn": round(v, 6), "sto_earn": 0.0, "bwu_earn": 0.0, "bwd_earn": 0.0}
            for d, v in sorted(per_day.items())
        ]
        total = sum(per_day.values())
        return web.json_response(
            {
                "summary": {"total_gpu": total, "total_stor": 0.0, "total_bwu": 0.0,
                            "total_bwd": 0.0},
                "current": {"balance": total, "service_fee": 0.0, "total": total},
                "per_machine": per_machine,
                "per_day": rows,
            }
        )  # fmt: skip

    # -- self-rental ---------------------------------------------------------------------

    def self_rentals(self, machine_id: int = 4242) -> list[FakeInstance]:
        """The self-rentals not yet destroyed."""
        return [
            i for i in self.instances.values() if i.machine_id == machine_id and not i.destroyed
        ]

    def offer_row(self, machine: FakeMachine) -> dict[str, Any]:
        book = machine.book
        firm = {i for c in book.active() if c.kind != RentalKind.INTERRUPTIBLE
                for i in c.gpu_indices}  # fmt: skip
        return {
            "id": ASK_BASE + machine.id,
            "ask_contract_id": ASK_BASE + machine.id,
            "machine_id": machine.id,
            "num_gpus": book.num_gpus,
            "gpu_name": machine.gpu_name,
            "dph_base": book.offer.price_gpu * book.num_gpus * self.platform_share,
            "dph_total": book.offer.price_gpu * book.num_gpus * self.platform_share + 0.01,
            "min_bid": book.offer.min_bid,
            "end_date": book.offer.end_date.timestamp() if book.offer.end_date else None,
            # On-demand renters may take GPUs that only interruptible renters hold.
            "rentable": book.offer.listed and len(firm) < book.num_gpus,
            "verified": machine.extra.get("verification", "verified") == "verified",
            "external": False,
        }

    async def _search_offers(self, request: web.Request) -> web.Response:
        query = await request.json()
        if not isinstance(query, dict):
            return self._error(400, "the query must be a JSON object")
        rows = []
        candidates = [
            self.offer_row(m) for m in self.machines.values() if m.book.offer.listed
        ]  # unlisted: no ask exists (inference)
        for row in [*candidates, *self.peers]:
            keep = True
            for key, condition in query.items():
                if key in ("order", "type", "limit", "allocated_storage"):
                    continue
                if isinstance(condition, dict) and "eq" in condition:
                    want = condition["eq"]
                    got = row.get(key)
                    # The CLI sends ids as strings; the server compares them as numbers.
                    if isinstance(got, int) and not isinstance(got, bool):
                        keep &= str(got) == str(want)
                    else:
                        keep &= got == want
            if keep:
                rows.append(row)
        for key, direction in reversed(query.get("order") or []):
            rows.sort(key=lambda r: _order_key(r.get(key)), reverse=direction == "desc")
        limit = query.get("limit")
        if isinstance(limit, int):
            rows = rows[:limit]
        # The CLI refuses any Content-Type but exactly this one (no charset).
        return web.Response(
            body=json.dumps({"offers": rows}).encode(), headers={"Content-Type": "application/json"}
        )

    def add_peer(
        self,
        machine_id: int,
        price_gpu: float,
        *,
        num_gpus: int = 4,
        gpu_name: str = "RTX 3090",
        verified: bool = True,
        rentable: bool = True,
    ) -> dict[str, Any]:
        """Another host's offer, `price_gpu` in renter terms (USD per GPU-hour)."""
        row = {
            "id": 90000 + len(self.peers),
            "machine_id": machine_id,
            "num_gpus": num_gpus,
            "gpu_name": gpu_name,
            "dph_base": price_gpu * num_gpus,
            "dph_total": price_gpu * num_gpus + 0.01,
            "min_bid": price_gpu * 0.5,
            "rentable": rentable,
            "rented": False,
            "verified": verified,
            "verification": "verified" if verified else "unverified",
            "external": False,
            "reliability2": 0.99,
            "geolocation": "DE",
        }
        self.peers.append(row)
        return row

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True, "gpus": self.metrics})

    async def _create_instance(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            ask = int(request.match_info["id"])
        except ValueError:
            return self._error(404, "no such ask")
        machine = self.machines.get(ask - ASK_BASE)
        if machine is None or not machine.book.offer.listed:
            return self._error(404, f"ask {ask} not found", "no_such_ask")
        if body.get("client_id") != "me" or not body.get("image"):
            return self._error(400, "client_id and image are required")
        if body.get("price") is not None:
            return self._error(400, "the fake models only on-demand self-rental")
        if self.dropped_writes:
            self.dropped_writes -= 1
            return web.json_response({"success": True, "new_contract": 999999})
        try:
            contract = machine.book.rent(
                self.clock.now(), RentalKind.ON_DEMAND, machine.book.num_gpus, self_rental=True
            )
        except RentRefused as refused:
            return self._error(400, str(refused), "no_such_ask")
        self.instances[contract.id] = FakeInstance(contract, machine.id, body)
        return web.json_response({"success": True, "new_contract": contract.id})

    def instance_row(self, instance: FakeInstance) -> dict[str, Any]:
        contract = instance.contract
        return {
            "id": contract.id,
            "machine_id": instance.machine_id,
            "label": instance.body.get("label"),
            "num_gpus": contract.gpus,
            "image_uuid": instance.body.get("image"),
            "actual_status": "running",
            "intended_status": "running",
            "is_bid": False,
            "dph_total": 0.0,
            "start_date": contract.start.timestamp(),
            "extra_env": [],
        }

    def _instance(self, request: web.Request) -> FakeInstance | None:
        try:
            found = self.instances.get(int(request.match_info["id"]))
        except ValueError:
            return None
        return found if found is not None and not found.destroyed else None

    async def _show_instance(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        return web.json_response({"instances": self.instance_row(instance) if instance else None})

    async def _destroy_instance(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        if instance is None:
            return self._error(404, "no such instance", "no_such_instance")
        if self.dropped_writes:
            self.dropped_writes -= 1
        else:
            self.machine(instance.machine_id).book.end(self.clock.now(), instance.contract.id)
            instance.destroyed = True
        return web.json_response({"success": True})

    async def _show_instances(self, request: web.Request) -> web.Response:
        try:
            filters = json.loads(request.query.get("select_filters", "{}"))
        except ValueError:
            return self._error(400, "select_filters is not JSON")
        labels = (filters.get("label") or {}).get("in")
        rows = [
            self.instance_row(i)
            for i in sorted(self.instances.values(), key=lambda i: i.contract.id)
            if not i.destroyed and (labels is None or i.body.get("label") in labels)
        ]
        return web.json_response(
            {"instances": rows, "next_token": None, "total_instances": len(rows)}
        )

    def render(self, machine: FakeMachine) -> dict[str, Any]:
        """The machine as Vast shows it, including fields gpu-broker does not read."""
        book = machine.book
        now = self.clock.now()
        book.advance(now)
        offer = book.offer
        # Rentals too new for the API to show (rental_visible_after): left out, their
        # GPUs shown as before they came.
        hidden = {
            c.id
            for c in book.active()
            if not c.self_rental and (now - c.start).total_seconds() < self.rental_visible_after
        }
        running = [c for c in book.running() if c.id not in hidden]
        active = [c for c in book.active() if c.id not in hidden]
        firm = [c for c in running if c.kind != RentalKind.INTERRUPTIBLE]
        ends = [c.end for c in active if not c.self_rental]
        locked = max(ends) if ends else None
        tokens = book.occupancy_tokens()
        for contract in book.running():
            if contract.id in hidden:
                for index in contract.gpu_indices:
                    tokens[index] = "x"
        today = now.date()
        return {
            "id": machine.id,
            "machine_id": machine.id,
            "hostname": f"fake-{machine.id}",
            "num_gpus": book.num_gpus,
            "gpu_name": machine.gpu_name,
            "listed": offer.listed,
            "listed_gpu_cost": offer.price_gpu or None,
            "min_bid_price": offer.min_bid,
            "listed_min_gpu_count": offer.min_chunk,
            "listed_storage_cost": machine.price_disk,
            "end_date": offer.end_date.timestamp() if offer.end_date else None,
            "client_end_date": locked.timestamp() if locked else None,
            "gpu_occupancy": " ".join(tokens),
            "current_rentals_running": len(running),
            "current_rentals_running_on_demand": len(firm),
            "current_rentals_on_demand": sum(
                c.kind != RentalKind.INTERRUPTIBLE for c in active
            ),
            "current_rentals_resident": len(active),
            "reliability2": 0.995,
            "timeout": 0 if machine.online else 3600,
            "earn_hour": sum(c.price_gpu * c.gpus for c in running),
            "earn_day": book.earnings_by_day.get(today, 0.0),
            "error_description": None,
            "disk_space": 900,
            "verification": "verified",
            **machine.extra,
        }


def _order_key(value: object) -> tuple[int, float]:
    """Numbers in order, NaN and missing last (as a database would sort them)."""
    if isinstance(value, int | float) and math.isfinite(value):
        return (0, float(value))
    return (1, 0.0)


async def drive(clock: FakeClock, awaitable: Awaitable[T], *, limit: float = 86400.0) -> T:
    """Await `awaitable` while moving `clock` to each deadline its sleepers set (retry
    backoff, rate-limit spacing), so virtual waits pass at once and real I/O still runs."""
    task = asyncio.ensure_future(awaitable)
    spent = 0.0
    while not task.done():
        deadline = clock.next_deadline()
        if deadline is None:
            await asyncio.sleep(0.001)  # real I/O in flight
            continue
        step = max(0.0, deadline - clock.monotonic())
        spent += step
        if spent > limit:
            task.cancel()
            raise AssertionError(f"still waiting after {limit}s of virtual time")
        await clock.advance(step)
    return task.result()


def day_number(day: date) -> int:
    return (day - EPOCH).days


__all__ = [
    "ASK_BASE", "Contract", "FakeVast", "Recorded", "RentRefused", "ServerThread", "day_number",
    "drive",
]  # fmt: skip


class ServerThread:
    """Runs a fake server on its own event loop in a thread, for code under test that
    calls `asyncio.run` itself (the CLI)."""

    def __init__(self, start: Callable[[], Awaitable[Any]], close: Callable[[], Awaitable[Any]]):
        self._start, self._close = start, close
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fake-server", daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
