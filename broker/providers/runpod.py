"""RunPod, observe only.

RunPod publishes no host API and no mutation to list, unlist or price a machine (FACTS.md),
so gpu-broker reads what its GraphQL endpoint shows (listed or not, pods running, earnings)
and leaves listing to the RunPod dashboard. Pods carry no end date: while any runs, the
broker holds local requests rather than disturb a renter.
"""

from __future__ import annotations

import builtins
import logging
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.clock import Clock
from broker.configtypes import Duration, PositiveDuration
from broker.errors import ProviderAuthError, ProviderError, ProviderRejected
from broker.ledger.base import EarningsRecord
from broker.providers.base import (
    Capabilities,
    ListResult,
    Occupancy,
    Offer,
    Provider,
    ProviderStatus,
    Rentals,
)
from broker.providers.sections import ProviderContext, ProviderKey

if TYPE_CHECKING:
    # Imported where used: `broker.config` imports this module for its section, and
    # must not pull in aiohttp for it.
    from broker.providers.http import JsonApi

log = logging.getLogger(__name__)

NOTE = (
    "RunPod is observe only: listing and unlisting are done in RunPod's dashboard, and "
    "gpu-broker will hold local requests while pods run"
)

QUERY = (
    "query { myself { machines { id listed gpuTotal gpuReserved hostPricePerGpu "
    "hostMinBidPerGpu pods { id desiredStatus costPerHr gpuCount } machineBalance { "
    "hostTotalEarnings hostGpuEarnings hostDiskEarnings } } machineEarnings { machineId "
    "date hostTotalEarnings } } }"
)


class RunpodProvider(ProviderKey):
    """`[provider] kind = "runpod"`."""

    kind: Literal["runpod"]
    machine_id: str | None = None
    api_key_env: str | None = "RUNPOD_API_KEY"
    api_key_file: Path | None = None
    base_url: str = "https://api.runpod.io"
    # RunPod reports earnings in USD: USD for one unit of energy.currency (for the report).
    usd_per_currency: float = Field(default=1.0, gt=0)
    request_spacing: Duration = timedelta(seconds=2)
    request_timeout: PositiveDuration = timedelta(seconds=30)
    retry_attempts: int = Field(default=5, ge=1)

    def create(self, clock: Clock, context: ProviderContext) -> RunpodMarket:
        return RunpodMarket(self, clock, retry_attempts=context.retry_attempts)

    # No estimate_price_gpu: the price is set in RunPod's dashboard; the broker does not
    # know it.


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class RunpodPod(_Wire):
    id: str
    desired_status: str | None = Field(default=None, alias="desiredStatus")
    cost_per_hr: float | None = Field(default=None, alias="costPerHr")
    gpu_count: int | None = Field(default=None, alias="gpuCount")


class RunpodMachine(_Wire):
    id: str
    listed: bool | None = None
    gpu_total: int | None = Field(default=None, alias="gpuTotal")
    gpu_reserved: int | None = Field(default=None, alias="gpuReserved")
    host_price_per_gpu: float | None = Field(default=None, alias="hostPricePerGpu")
    host_min_bid_per_gpu: float | None = Field(default=None, alias="hostMinBidPerGpu")
    pods: list[RunpodPod] = []


class RunpodEarning(_Wire):
    machine_id: str = Field(alias="machineId")
    date: str
    host_total_earnings: float | None = Field(default=None, alias="hostTotalEarnings")


class RunpodMyself(_Wire):
    machines: list[RunpodMachine] = []
    machine_earnings: list[RunpodEarning] = Field(default=[], alias="machineEarnings")


class RunpodMarket(Provider):
    kind = "runpod"

    def __init__(
        self,
        config: RunpodProvider,
        clock: Clock,
        *,
        api_key: str | None = None,
        retry_attempts: int | None = None,
    ) -> None:
        self.config = config
        self.machine_id = config.machine_id or ""
        self._clock = clock
        from broker.providers.http import provider_api

        self._api: JsonApi = provider_api("RunPod", config, clock, api_key, retry_attempts)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            can_list=False,
            granularity="machine",
            can_displace_interruptible=False,
            earnings_source="provider",
            note=NOTE,
        )

    async def start(self) -> None:
        await self._api.start()

    async def close(self) -> None:
        await self._api.close()

    def set_deadline(self, deadline: float | None) -> None:
        self._api.deadline = deadline

    def make_offer(
        self,
        end_date: Any,
        *,
        load_watts_per_gpu: float | None = None,
        price_per_kwh: float | None = None,
        ask: float | None = None,
    ) -> Offer:
        raise ProviderRejected(NOTE)

    async def list(self, offer: Offer) -> ListResult:
        raise ProviderRejected(NOTE)

    async def unlist(self, *, urgent: bool = False) -> ProviderStatus | None:
        raise ProviderRejected(NOTE)

    async def myself(self, *, urgent: bool = False) -> RunpodMyself:
        answer = await self._api.request(
            "POST", "/graphql", body={"query": QUERY}, urgent=urgent
        )
        if not isinstance(answer, dict):
            raise ProviderError(f"RunPod: unexpected answer: {answer!r:.200}")
        errors = answer.get("errors")
        if errors:
            listed = errors if isinstance(errors, list) else [errors]
            message = "; ".join(
                str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in listed
            )
            if any(w in message.lower() for w in ("unauthori", "api key", "forbidden")):
                raise ProviderAuthError(
                    f"RunPod refused the API key from {self.config.key_source()} ({message})"
                )
            raise ProviderRejected(f"RunPod: {message}")
        data = answer.get("data")
        if data is not None and not isinstance(data, dict):
            raise ProviderError(f"RunPod: unexpected answer: {answer!r:.200}")
        myself = (data or {}).get("myself")
        if myself is None:
            raise ProviderAuthError(
                f"RunPod answered no account for the API key from {self.config.key_source()}"
            )
        try:
            return RunpodMyself.model_validate(myself)
        except ValidationError as error:
            raise ProviderError(f"RunPod: answer not understood: {error}") from None

    def _pick(self, myself: RunpodMyself) -> RunpodMachine:
        machines = myself.machines
        if self.config.machine_id:
            for machine in machines:
                if machine.id == self.config.machine_id:
                    return machine
        elif len(machines) == 1:
            self.machine_id = machines[0].id
            return machines[0]
        ids = ", ".join(m.id for m in machines) or "none"
        wanted = self.config.machine_id or "(not set, and the account has several)"
        raise ProviderRejected(
            f"provider.machine_id: machine {wanted} is not among this account's machines "
            f"(found: {ids})"
        )

    async def status(self, *, urgent: bool = False) -> ProviderStatus:
        machine = self._pick(await self.myself(urgent=urgent))
        running = [p for p in machine.pods if (p.desired_status or "").upper() == "RUNNING"]
        total = machine.gpu_total or 0
        reserved = machine.gpu_reserved
        each: Occupancy
        if reserved == 0 and not running:
            each = "free"
        elif reserved is not None and reserved >= total:
            each = "rented"
        else:
            each = "unknown"  # some GPUs are rented, and RunPod does not say which
        occupancy = (each,) * total
        return ProviderStatus(
            machine_id=machine.id,
            observed_at=self._clock.now(),
            listed=machine.listed,
            offer_end=None,
            # Pods have no contract end and RunPod does not tell spot from on-demand here.
            rentals=Rentals(unknown_kind=len(running)),
            gpu_occupancy=occupancy,
            locked_until=None,
            online=None,
            price_gpu=machine.host_price_per_gpu,
            min_bid=machine.host_min_bid_per_gpu,
            note=NOTE,
            raw=machine.model_dump(),
        )

    async def earnings(self, first_day: date, last_day: date) -> builtins.list[EarningsRecord]:
        myself = await self.myself()
        machine = self._pick(myself)
        now = self._clock.now()
        out: dict[date, EarningsRecord] = {}
        for row in myself.machine_earnings:
            if row.machine_id != machine.id or row.host_total_earnings is None:
                continue
            try:
                day = date.fromisoformat(row.date[:10])
            except ValueError:
                log.warning("runpod: earnings row with an unreadable date %r", row.date)
                continue
            if first_day <= day <= last_day:
                out[day] = EarningsRecord(
                    provider="runpod",
                    machine_id=machine.id,
                    day=day,
                    amount=row.host_total_earnings,
                    currency="USD",
                    source="provider",
                    updated=now,
                )
        return [out[d] for d in sorted(out)]

    async def probe(self) -> builtins.list[str]:
        status = await self.status()
        listed = {True: "listed", False: "not listed", None: "listing unknown"}[status.listed]
        return [
            "API key accepted",
            f"machine {status.machine_id}: {len(status.gpu_occupancy)} GPUs, {listed}, "
            f"{status.rentals.total} pod(s) running",
        ]
