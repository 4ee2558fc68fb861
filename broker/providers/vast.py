"""Vast.ai, host side: list, unlist, watch and count earnings for one machine.

The requests are the official client's (`vastai` on PyPI, checked by a conformance test):
the same paths with their trailing slashes, JSON-encoded query values, and every
`create_asks` key with the unset ones as null. Each write is read back, because a write
answered `success` is not proof the machine is listed (or unlisted) the way we asked.

Displacing interruptible renters (`reclaim = "displace-interruptible"`) is a self-rental:
the host rents its own offer on-demand, which FACTS.md says is free and blocks renters, and
infers displaces interruptible ones (who resume when it ends). The requests are the CLI's
`search offers -n 'machine_id=N' -o num_gpus- --storage D`, `create instance ASK --image I
--disk D --label gpu-broker-displace --entrypoint sleep --args infinity`, `show instance ID`,
`show instances --label gpu-broker-displace` and `destroy instance ID`. The label is how a
restarted broker finds a self-rental a previous run left behind.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.clock import Clock
from broker.configtypes import Duration, PositiveDuration
from broker.errors import (
    ProviderError,
    ProviderNotFound,
    ProviderRejected,
    ProviderStateMismatch,
)
from broker.ledger.base import EarningsRecord
from broker.pricing.settings import PricingSection, market_or_price
from broker.providers.base import (
    Capabilities,
    ListResult,
    Occupancy,
    Offer,
    Provider,
    ProviderStatus,
    Rentals,
    auto_min_bid,
    utc_day_bounds,
)
from broker.providers.sections import ProviderContext, ProviderKey

if TYPE_CHECKING:
    # Imported where used: `broker.config` imports this module for its section, and
    # must not pull in aiohttp for it.
    from broker.providers.docker import DockerRenters
    from broker.providers.http import JsonApi

log = logging.getLogger(__name__)

DAY = 86400.0
# Set on every self-rental we create; only instances with it on our machine are ended.
SELF_RENTAL_LABEL = "gpu-broker-displace"
# busybox `sleep` takes "infinity": the container must keep running, or the instance stops
# and (inference) stops holding the GPUs.
SELF_RENTAL_ENTRYPOINT = "sleep"
SELF_RENTAL_ARGS = ["infinity"]
INSTANCES_PAGE = 25  # what the CLI asks for per page
# The two endpoints that show our machine (rate-limit buckets).
MACHINE = "GET /api/v0/machines/{id}"
MACHINES = "GET /api/v0/machines"
_OCCUPANCY: dict[str, Occupancy] = {
    "x": "free", "D": "on-demand", "I": "interruptible", "R": "reserved"
}  # fmt: skip


class VastProvider(ProviderKey):
    """`[provider] kind = "vast"`."""

    kind: Literal["vast"]
    machine_id: int = Field(gt=0)
    api_key_env: str | None = "VAST_API_KEY"
    api_key_file: Path | None = None
    base_url: str = "https://console.vast.ai"
    # USD per GPU-hour, on-demand; or "market": the ask follows comparable offers
    # ([provider.pricing], broker/pricing/).
    price_gpu: float | Literal["market"]
    pricing: PricingSection = PricingSection()
    min_bid: float | Literal["auto"] = "auto"
    price_disk: float = Field(default=0.10, ge=0, description="USD per GB-month")
    min_chunk: int = Field(default=1, ge=1)
    # min_bid = "auto": the floor is the GPUs' power under load x the tariff x (1 + margin),
    # near what Vast advises (the cost of power under load), so a bid never runs at a loss.
    min_bid_margin: float = Field(default=0.25, ge=0)
    # Vast prices are USD while energy.currency may not be: USD for one unit of it.
    usd_per_currency: float = Field(default=1.0, gt=0)
    # Vast rate-limits each endpoint to one call every few seconds.
    request_spacing: Duration = timedelta(seconds=2)
    request_timeout: PositiveDuration = timedelta(seconds=30)
    retry_attempts: int = Field(default=5, ge=1)
    # Renter containers (C.<contract>) show which GPUs a renter holds; unreadable = unknown.
    # "" turns the reading off (TOML has no null).
    docker_socket: Path | None = Path("/var/run/docker.sock")
    # reclaim = "displace-interruptible": the broker rents its own offer on-demand (free for
    # the host) to push interruptible renters off. The instance only has to exist and hold
    # the GPUs, so the image is tiny, it sleeps, and its disk is the least we may ask for.
    displace_image: str = Field(default="alpine:latest", min_length=1)
    displace_disk: float = Field(default=1.0, gt=0, description="GB")

    @field_validator("docker_socket", mode="before")
    @classmethod
    def _no_socket(cls, value: object) -> object:
        return None if value == "" else value

    _price_gpu = field_validator("price_gpu", mode="before")(market_or_price)

    @property
    def market_priced(self) -> bool:
        return self.price_gpu == "market"

    @field_validator("min_bid")
    @classmethod
    def _min_bid(cls, value: float | str) -> float | str:
        if isinstance(value, float | int) and value < 0:
            raise ValueError('expected "auto" or a price of at least 0')
        return value

    def create(self, clock: Clock, context: ProviderContext) -> VastMarket:
        from broker.providers.docker import DockerRenters

        docker = DockerRenters(self.docker_socket) if self.docker_socket else None
        return VastMarket(
            self,
            clock,
            docker=docker,
            energy_currency=context.energy_currency,
            retry_attempts=context.retry_attempts,
        )

    def estimate_price_gpu(self) -> float | None:
        # Priced by the market: the ledger's listings say what was asked, not the config.
        return None if self.price_gpu == "market" else self.price_gpu


class VastMachine(BaseModel):
    """A machine as `GET /machines` shows it. No schema is published, so every field is
    optional and unknown ones are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: int | None = None
    machine_id: int | None = None
    hostname: str | None = None
    listed: bool | None = None
    num_gpus: int | None = None
    gpu_name: str | None = None
    listed_gpu_cost: float | None = None
    min_bid_price: float | None = None
    listed_min_gpu_count: int | None = None
    end_date: float | None = None
    client_end_date: float | None = None
    gpu_occupancy: str | None = None
    current_rentals_running: int | None = None
    current_rentals_running_on_demand: int | None = None
    current_rentals_on_demand: int | None = None
    current_rentals_resident: int | None = None
    reliability2: float | None = None
    timeout: float | None = None
    earn_hour: float | None = None
    earn_day: float | None = None
    error_description: str | None = None

    @property
    def ident(self) -> int | None:
        return self.id if self.id is not None else self.machine_id


class VastInstance(BaseModel):
    """An instance (a contract we rent) as `show instance(s)` returns it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: int | None = None
    machine_id: int | None = None
    label: str | None = None
    num_gpus: int | None = None
    actual_status: str | None = None
    intended_status: str | None = None


class VastOffer(BaseModel):
    """An offer from `search offers`; `id` is the ask id that `create instance` takes."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: int
    machine_id: int | None = None
    num_gpus: int | None = None


class VastDay(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    day: float | str
    gpu_earn: float | None = None
    sto_earn: float | None = None
    bwu_earn: float | None = None
    bwd_earn: float | None = None


class VastEarnings(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    per_day: list[VastDay] = []


def _when(value: float | None) -> datetime | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        # Not a time at all: unknown would be a guess (say, that no contract holds the
        # GPUs), so the answer is refused as not understood.
        raise ProviderError(f"Vast.ai: {value!r} is not a time") from None


def _day(value: float | str) -> date:
    """Vast counts days since the epoch; accept an ISO date too."""
    try:
        if isinstance(value, str):
            try:
                return date.fromisoformat(value[:10])
            except ValueError:
                value = float(value)
        return date(1970, 1, 1) + timedelta(days=math.floor(value))
    except (OverflowError, ValueError):
        raise ProviderError(f"Vast.ai: earnings for a day {value!r} that is not a day") from None


class VastMarket(Provider):
    kind = "vast"

    def __init__(
        self,
        config: VastProvider,
        clock: Clock,
        *,
        api_key: str | None = None,
        docker: DockerRenters | None = None,
        energy_currency: str = "USD",
        retry_attempts: int | None = None,
    ) -> None:
        self.config = config
        self.machine_id = str(config.machine_id)
        self._clock = clock
        self._docker = docker
        self._energy_currency = energy_currency
        from broker.providers.http import provider_api

        self._api: JsonApi = provider_api("Vast.ai", config, clock, api_key, retry_attempts)
        self._api_key = api_key
        # Our self-rental's instance (= contract) id while one exists. Lost on a restart;
        # `end_displacement` then finds it again by its label.
        self.self_rental: int | None = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            can_list=True,
            granularity="machine",
            # By a self-rental: an on-demand instance on our own offer (see the docstring).
            can_displace_interruptible=True,
            earnings_source="provider",
        )

    def market_api(self) -> JsonApi:
        """A client of its own for the market reads (broker/pricing/market.py): a search
        that hangs or is rate-limited then never waits in front of a reclaim's call. One
        try per read: the next refresh is the retry."""
        from broker.providers.http import provider_api

        return provider_api("Vast.ai", self.config, self._clock, self._api_key, 1)

    async def start(self) -> None:
        await self._api.start()

    async def close(self) -> None:
        await self._api.close()

    def set_deadline(self, deadline: float | None) -> None:
        self._api.deadline = deadline

    # -- offers ----------------------------------------------------------------------

    def make_offer(
        self,
        end_date: datetime | None,
        *,
        load_watts_per_gpu: float | None = None,
        price_per_kwh: float | None = None,
        ask: float | None = None,
    ) -> Offer:
        config = self.config
        if config.price_gpu != "market":
            price = config.price_gpu
        elif ask is not None:
            price = ask
        else:
            raise ProviderRejected('price_gpu = "market" and no market ask yet: not listed')
        min_bid: float | None
        if config.min_bid != "auto":
            min_bid = float(config.min_bid)
        elif load_watts_per_gpu is not None and price_per_kwh is not None:
            min_bid = auto_min_bid(
                load_watts_per_gpu, price_per_kwh, config.min_bid_margin, config.usd_per_currency
            )
        else:
            # Without a measurement a floor could be below the power bill; the on-demand
            # price is the safe side (interruptible renters then pay what others pay).
            log.warning("min_bid = auto without a load power measurement: using price_gpu")
            min_bid = price
        return Offer(
            price_gpu=price,
            end_date=end_date,
            # A floor above the on-demand price would only turn bids away.
            min_bid=min(min_bid, price),
            min_chunk=config.min_chunk,
            price_disk=config.price_disk,
        )

    def create_asks_body(self, offer: Offer) -> dict[str, Any]:
        """The official client's body: every key, unset ones null (min_chunk never null:
        the server refuses it)."""
        return {
            "machine": self.config.machine_id,
            "price_gpu": offer.price_gpu,
            "price_disk": offer.price_disk,
            "price_inetu": None,
            "price_inetd": None,
            "price_min_bid": offer.min_bid,
            "min_chunk": offer.min_chunk,
            "end_date": offer.end_date.timestamp() if offer.end_date else None,
            "credit_discount_max": None,
            "duration": None,
            "vol_size": None,
            "vol_price": None,
        }

    async def list(self, offer: Offer) -> ListResult:
        answer = await self._api.request(
            "PUT", "/api/v0/machines/create_asks/", body=self.create_asks_body(offer)
        )
        self._check_success(answer, "list")
        extended = int(answer.get("extended") or 0) if isinstance(answer, dict) else 0
        await self._confirm(lambda m: self._offer_differences(m, offer), "list")
        log.info(
            "vast: machine %s listed at %.3f USD/GPU-h until %s (%d contracts extended)",
            self.machine_id, offer.price_gpu, offer.end_date, extended,
        )  # fmt: skip
        return ListResult(extended=extended)

    async def unlist(self, *, urgent: bool = False) -> ProviderStatus | None:
        answer = await self._api.request(
            "DELETE", f"/api/v0/machines/{self.config.machine_id}/asks/", body={},
            urgent=urgent,
        )  # fmt: skip
        self._check_success(answer, "unlist")

        def differences(machine: VastMachine) -> builtins.list[str]:
            return [] if machine.listed is False else [f"listed is {machine.listed}, not False"]

        machine = await self._confirm(differences, "unlist", urgent=urgent)
        log.info("vast: machine %s unlisted", self.machine_id)
        return await self._status_of(machine)

    @staticmethod
    def _check_success(answer: Any, what: str) -> None:
        if isinstance(answer, dict) and answer.get("success") is False:
            message = answer.get("msg") or answer.get("error") or "no reason given"
            raise ProviderRejected(f"Vast.ai refused to {what} the machine: {message}")

    def _offer_differences(self, machine: VastMachine, offer: Offer) -> builtins.list[str]:
        found: builtins.list[str] = []
        if machine.listed is not True:
            found.append(f"listed is {machine.listed}, not True")

        def differs(name: str, got: float | None, want: float | None, tol: float) -> None:
            # A field the platform leaves out cannot be confirmed, nor contradicted.
            if got is not None and want is not None and abs(got - want) > tol:
                found.append(f"{name} is {got}, not {want}")

        differs("listed_gpu_cost", machine.listed_gpu_cost, offer.price_gpu, 0.0005)
        differs("min_bid_price", machine.min_bid_price, offer.min_bid, 0.0005)
        differs(
            "end_date",
            machine.end_date,
            offer.end_date.timestamp() if offer.end_date else None,
            1.0,
        )
        if machine.listed_min_gpu_count is not None:
            differs("listed_min_gpu_count", machine.listed_min_gpu_count, offer.min_chunk, 0)
        return found

    async def _confirm(
        self,
        differences: Callable[[VastMachine], builtins.list[str]],
        what: str,
        *,
        urgent: bool = False,
    ) -> VastMachine:
        """Read the machine back; a second look first, as the platform may lag a moment."""
        problems: builtins.list[str] = []
        for _ in range(2):
            machine = await self.machine(urgent=urgent)
            problems = differences(machine)
            if not problems:
                return machine
        raise ProviderStateMismatch(
            f"Vast.ai answered the {what} of machine {self.machine_id} as done, but it shows "
            + "; ".join(problems)
        )

    # -- reading ---------------------------------------------------------------------

    async def machines(self, *, urgent: bool = False) -> builtins.list[VastMachine]:
        answer = await self._api.request(
            "GET", "/api/v0/machines", query=[("owner", "me")], endpoint=MACHINES,
            urgent=urgent,
        )  # fmt: skip
        rows = answer.get("machines") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise ProviderError(f"Vast.ai: unexpected answer to GET /machines: {answer!r:.200}")
        return [self._machine(row) for row in rows]

    async def machine(self, *, urgent: bool = False) -> VastMachine:
        """Our machine. Two endpoints show it: the background poll reads the machine's own,
        and an urgent read takes whichever was called least recently, so one right after
        a poll (an unlist's read-back) does not meet that endpoint's rate limit."""
        urgent = urgent or self._api.deadline is not None  # a stop is waiting too
        if urgent and self._least_recent(MACHINE, MACHINES) == MACHINES:
            for machine in await self.machines(urgent=True):
                if machine.ident == self.config.machine_id:
                    return machine
            raise ProviderRejected(
                f"Vast.ai: machine {self.machine_id} is not among this account's machines"
            )
        answer = await self._api.request(
            "GET",
            f"/api/v0/machines/{self.config.machine_id}",
            query=[("owner", "me")],
            endpoint=MACHINE,
            urgent=urgent,
        )
        # A bare one-element list; tolerate the `{"machines": [...]}` shape as well.
        rows = answer.get("machines") if isinstance(answer, dict) else answer
        if not isinstance(rows, list):
            raise ProviderError(f"Vast.ai: unexpected answer for the machine: {answer!r:.200}")
        for row in rows:
            machine = self._machine(row)
            if machine.ident in (None, self.config.machine_id):
                return machine
        raise ProviderRejected(
            f"Vast.ai: machine {self.machine_id} is not among this account's machines"
        )

    def _least_recent(self, *endpoints: str) -> str:
        def last(endpoint: str) -> float:
            called = self._api.last_call(endpoint)
            return -math.inf if called is None else called

        return min(endpoints, key=last)

    @staticmethod
    def _machine(row: Any) -> VastMachine:
        try:
            return VastMachine.model_validate(row)
        except ValidationError as error:
            raise ProviderError(f"Vast.ai: a machine record is not understood: {error}") from None

    async def status(self, *, urgent: bool = False) -> ProviderStatus:
        return await self._status_of(await self.machine(urgent=urgent))

    async def _status_of(self, machine: VastMachine) -> ProviderStatus:
        ours = () if self.self_rental is None else (self.self_rental,)
        renter_gpus = await self._docker.snapshot(exclude=ours) if self._docker else None
        return self.status_from(machine, renter_gpus=renter_gpus)

    def status_from(self, machine: VastMachine, **extra: Any) -> ProviderStatus:
        occupancy = self._occupancy(machine)
        rentals = self._rentals(machine, occupancy)
        raw = machine.model_dump()
        if self.self_rental is not None:
            # Our own self-rental is no renter: counted as one, the scheduler would wait for
            # it to leave. It holds every GPU on-demand (nothing firm was there when it
            # was made, and nothing firm can come while it runs), so every on-demand GPU
            # and one on-demand contract are ours.
            occupancy = tuple("free" if o == "on-demand" else o for o in occupancy)
            if rentals.on_demand:
                rentals = replace(rentals, on_demand=rentals.on_demand - 1)
            raw["gpu_broker_self_rental"] = self.self_rental
        rented = rentals.total > 0 or any(o not in ("free", "unknown") for o in occupancy)
        return ProviderStatus(
            machine_id=self.machine_id,
            observed_at=self._clock.now(),
            listed=machine.listed,
            offer_end=_when(machine.end_date) if machine.listed else None,
            rentals=rentals,
            gpu_occupancy=occupancy,
            locked_until=_when(machine.client_end_date) if rented else None,
            online=None if machine.timeout is None else machine.timeout <= 0,
            price_gpu=machine.listed_gpu_cost,
            min_bid=machine.min_bid_price,
            raw=raw,
            **extra,
        )

    @staticmethod
    def _occupancy(machine: VastMachine) -> tuple[Occupancy, ...]:
        count = machine.num_gpus or 0
        if machine.gpu_occupancy:
            tokens = machine.gpu_occupancy.split()
            return tuple(_OCCUPANCY.get(t, "unknown") for t in tokens)
        free = machine.current_rentals_running == 0
        return tuple("free" if free else "unknown" for _ in range(count))

    @staticmethod
    def _rentals(machine: VastMachine, occupancy: tuple[Occupancy, ...]) -> Rentals:
        running = machine.current_rentals_running
        firm = machine.current_rentals_running_on_demand
        if running is None:
            busy = sum(o not in ("free", "unknown") for o in occupancy)
            return Rentals(unknown_kind=1 if busy else 0)
        firm = min(firm if firm is not None else 0, running)
        interruptible = running - firm
        # Vast counts reserved contracts among the on-demand ones; the GPU tokens tell
        # whether any are reserved. With both kinds present the split is a lower bound.
        reserved_gpus = occupancy.count("reserved")
        on_demand_gpus = occupancy.count("on-demand")
        if not reserved_gpus:
            reserved = 0
        elif not on_demand_gpus:
            reserved = firm
        else:
            reserved = min(reserved_gpus, max(firm - 1, 0))
        return Rentals(
            on_demand=firm - reserved, interruptible=interruptible, reserved=reserved
        )

    # -- displacing interruptible renters ------------------------------------------------

    async def displace_interruptible(self) -> None:
        """Rent our own offer on-demand for every GPU: interruptible renters pause until
        `end_displacement()`. Refused while on-demand or reserved renters hold GPUs (nothing
        displaces them). Returns once the instance reads back as ours."""
        status = await self.status()
        firm = status.rentals
        if firm.on_demand or firm.reserved or firm.unknown_kind:
            raise ProviderRejected(
                f"vast: machine {self.machine_id} has on-demand or reserved renters; "
                "they cannot be displaced"
            )
        if self.self_rental is not None and await self.instance(self.self_rental) is not None:
            return  # already displacing
        leftover = await self.self_rentals()
        if leftover:
            self.self_rental = leftover[0].id  # a previous try (or run) made it: keep it
            return
        ask = await self.own_offer()
        try:
            answer = await self.create_instance(ask.id)
        except ProviderError:
            # A create cut off (timeout, 5xx) may still have happened: look before failing.
            found = await self.self_rentals()
            if not found:
                raise
            answer = {"success": True, "new_contract": found[0].id}
        if not isinstance(answer, dict) or answer.get("success") is False:
            message = answer.get("msg") if isinstance(answer, dict) else answer
            raise ProviderRejected(f"Vast.ai refused the self-rental of ask {ask.id}: {message}")
        contract = answer.get("new_contract")
        made = await self.instance(contract) if isinstance(contract, int) else None
        if made is None:
            found = await self.self_rentals()
            made = found[0] if found else None
        if made is None or made.id is None:
            raise ProviderStateMismatch(
                f"Vast.ai answered the self-rental of ask {ask.id} as done ({answer!r:.120}), "
                "but no such instance exists: not displaced"
            )
        self.self_rental = made.id
        log.info(
            "vast: self-rental %s on machine %s (ask %s, %s GPUs) displaces interruptible "
            "renters", made.id, self.machine_id, ask.id, ask.num_gpus,
        )  # fmt: skip

    async def end_displacement(self) -> None:
        """Destroy our self-rental (and any other we left behind, found by its label) so the
        paused renters resume. Idempotent: an instance already gone is fine."""
        ids = {i.id for i in await self.self_rentals() if i.id is not None}
        if self.self_rental is not None:
            ids.add(self.self_rental)
        for ident in sorted(ids):
            with contextlib.suppress(ProviderNotFound):  # 404: already gone
                await self.destroy_instance(ident)
        for ident in sorted(ids):
            for look in range(2):  # a second look: the platform may lag a moment
                if await self.instance(ident) is None:
                    break
                if look:
                    raise ProviderStateMismatch(
                        f"Vast.ai answered the destroy of self-rental {ident} as done, but "
                        "it still exists"
                    )
        if ids:
            log.info("vast: self-rental(s) %s ended; interruptible renters may resume",
                     ", ".join(map(str, sorted(ids))))  # fmt: skip
        self.self_rental = None

    async def create_instance(self, ask_id: int) -> Any:
        """`create instance ASK ...` with `create_instance_body()`; the raw answer."""
        return await self._api.request(
            "PUT", f"/api/v0/asks/{ask_id}/", body=self.create_instance_body(),
            endpoint="PUT /api/v0/asks/{id}/",
        )  # fmt: skip

    async def destroy_instance(self, ident: int) -> Any:
        """`destroy instance ID`; a 404 raises ProviderNotFound."""
        return await self._api.request(
            "DELETE", f"/api/v0/instances/{ident}/", body={},
            endpoint="DELETE /api/v0/instances/{id}/",
        )  # fmt: skip

    def create_instance_body(self) -> dict[str, Any]:
        """The CLI's body for `create instance ASK --image I --disk D --label L
        --entrypoint sleep --args infinity`: on-demand (price null), args runtype."""
        return {
            "client_id": "me",
            "image": self.config.displace_image,
            "env": {},
            "price": None,
            "disk": float(self.config.displace_disk),
            "label": SELF_RENTAL_LABEL,
            "extra": None,
            "onstart": SELF_RENTAL_ENTRYPOINT,
            "image_login": None,
            "python_utf8": False,
            "lang_utf8": False,
            "use_jupyter_lab": False,
            "jupyter_dir": None,
            "force": False,
            "cancel_unavail": False,
            "template_hash_id": None,
            "user": None,
            "runtype": "args",
            "args": SELF_RENTAL_ARGS,
        }

    async def own_offer(self) -> VastOffer:
        """Our machine's on-demand offer with the most GPUs: `search offers -n
        'machine_id=N' -o num_gpus- --storage D`. `-n` drops the default filters
        (verified, rentable, not external) that could hide our own machine's offer."""
        answer = await self._api.request(
            "POST",
            "/api/v0/bundles/",
            body={
                # The CLI sends the id as a string; so do we.
                "machine_id": {"eq": str(self.config.machine_id)},
                "order": [["num_gpus", "desc"]],
                "type": "on-demand",
                "allocated_storage": float(self.config.displace_disk),
            },
        )
        rows = answer.get("offers") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise ProviderError(f"Vast.ai: unexpected answer to a search: {answer!r:.200}")
        offers: builtins.list[VastOffer] = []
        for row in rows:
            try:
                offer = VastOffer.model_validate(row)
            except ValidationError as error:
                raise ProviderError(f"Vast.ai: an offer is not understood: {error}") from None
            if offer.machine_id == self.config.machine_id:
                offers.append(offer)
        if not offers:
            raise ProviderRejected(
                f"Vast.ai shows no offer of machine {self.machine_id} to rent (is it listed?)"
            )
        return max(offers, key=lambda o: o.num_gpus or 0)

    async def instance(self, ident: int) -> VastInstance | None:
        """`show instance ID`; None once it no longer exists."""
        try:
            answer = await self._api.request(
                "GET", f"/api/v0/instances/{ident}/", query=[("owner", "me")],
                endpoint="GET /api/v0/instances/{id}/",
            )  # fmt: skip
        except ProviderNotFound:
            return None
        row = answer.get("instances") if isinstance(answer, dict) else None
        if row is None:
            return None
        found = self._instance(row)
        return found if found.id is not None else None

    async def self_rentals(self) -> builtins.list[VastInstance]:
        """Our self-rentals on this machine: `show instances --label gpu-broker-displace`,
        every page, keeping only this machine's."""
        params: builtins.list[tuple[str, object]] = [
            ("select_filters", {"label": {"in": [SELF_RENTAL_LABEL]}}),
            ("order_by", [{"col": "id", "dir": "asc"}]),
            ("limit", INSTANCES_PAGE),
        ]
        found: builtins.list[VastInstance] = []
        for _ in range(100):  # pages; a bound so a looping token cannot hang us
            answer = await self._api.request("GET", "/api/v1/instances/", query=params)
            rows = answer.get("instances") if isinstance(answer, dict) else None
            if not isinstance(rows, list):
                raise ProviderError(
                    f"Vast.ai: unexpected answer to GET /instances: {answer!r:.200}"
                )
            for row in rows:
                instance = self._instance(row)
                mine = instance.machine_id == self.config.machine_id
                if mine and instance.label == SELF_RENTAL_LABEL and instance.id is not None:
                    found.append(instance)
            token = answer.get("next_token")
            if not token:
                break
            params = [*params[:3], ("after_token", token)]
        return found

    @staticmethod
    def _instance(row: Any) -> VastInstance:
        try:
            return VastInstance.model_validate(row)
        except ValidationError as error:
            raise ProviderError(f"Vast.ai: an instance is not understood: {error}") from None

    # -- earnings --------------------------------------------------------------------

    async def machine_earnings(
        self, start: datetime, end: datetime, machine_id: int | None = -1
    ) -> VastEarnings:
        """`vastai show earnings --start_date S --end_date E [--machine_id M]`."""
        machid = self.config.machine_id if machine_id == -1 else machine_id
        answer = await self._api.request(
            "GET",
            "/api/v0/users/me/machine-earnings",
            query=[
                ("owner", "me"),
                ("sday", start.timestamp() / DAY),
                ("eday", end.timestamp() / DAY),
                ("machid", machid),
            ],
        )
        try:
            return VastEarnings.model_validate(answer)
        except ValidationError as error:
            raise ProviderError(f"Vast.ai: earnings not understood: {error}") from None

    async def earnings(self, first_day: date, last_day: date) -> builtins.list[EarningsRecord]:
        start, end = utc_day_bounds(first_day, last_day)
        answer = await self.machine_earnings(start, end)
        now = self._clock.now()
        records: dict[date, EarningsRecord] = {}
        for row in answer.per_day:
            day = _day(row.day)
            if not first_day <= day <= last_day:
                continue
            detail = {
                "gpu_earn": row.gpu_earn or 0.0,
                "sto_earn": row.sto_earn or 0.0,
                "bwu_earn": row.bwu_earn or 0.0,
                "bwd_earn": row.bwd_earn or 0.0,
            }
            records[day] = EarningsRecord(
                provider="vast",
                machine_id=self.machine_id,
                day=day,
                amount=round(sum(detail.values()), 6),
                currency="USD",
                source="provider",
                updated=now,
                detail=detail,
            )
        return [records[d] for d in sorted(records)]

    # -- check -----------------------------------------------------------------------

    async def probe(self) -> builtins.list[str]:
        machines = await self.machines()
        mine = next((m for m in machines if m.ident == self.config.machine_id), None)
        if mine is None:
            ids = ", ".join(str(m.ident) for m in machines) or "none"
            raise ProviderRejected(
                f"provider.machine_id: machine {self.machine_id} is not among this account's "
                f"machines (found: {ids})"
            )
        status = self.status_from(mine)
        gpus = f"{mine.num_gpus or '?'}x {mine.gpu_name or 'GPU'}"
        if status.listed:
            until = status.offer_end.isoformat() if status.offer_end else "no end date"
            listing = f"listed at {status.price_gpu} USD/GPU-h until {until}"
        else:
            listing = "not listed"
        online = {True: "online", False: "OFFLINE", None: "online state unknown"}[status.online]
        rentals = f"{status.rentals.total} rental(s) running"
        if status.locked_until:
            rentals += f", locked until {status.locked_until.isoformat()}"
        return [
            "API key accepted",
            f"machine {self.machine_id}: {gpus}, {online}, {listing}, {rentals}",
        ]
