"""Clore.ai, host side: show or hide one server, read whether it is rented, count earnings.

The requests are those of Clore's official Python SDK (`clore-ai` 0.1.1, checked by a
conformance test): `https://api.clore.ai/v1/<endpoint>`, the key in a header named `auth`,
`GET server_config` carrying a JSON body, `POST set_server_settings`. Every answer is JSON
with an integer `code`, and an error comes as HTTP 200 too: code 5 (over one request a
second) and 1 (database) are retried, 3 is a refused key, anything but 0 is never success.

What a host cannot do on Clore (docs/clore.md): see or end the orders on its server. The
broker's promise therefore rests on `mrl`, the longest rental the server accepts: an order
ends at most `mrl` hours after it starts, so while rented the GPUs are taken to be held
until (first seen rented) + `mrl`, or `remaining_time` when Clore shows a sooner end. A
reclaim hides the server and waits. When Clore's shortest rental (`min_rental`, 6 h per its
FAQ) is longer than `policy.max_commitment`, the promise cannot be kept: the adapter says it
cannot list (the broker then only watches the server), and `check` fails; so too when
`policy.min_listed` is shorter (the scheduler would put up offers Clore cannot take).

Earnings: Clore has no earnings endpoint, only wallet balances. The rise of one wallet's
balance over a UTC day, converted at a configured rate, is recorded as an estimate.
"""

from __future__ import annotations

import builtins
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.clock import Clock
from broker.configtypes import Duration, PositiveDuration
from broker.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderStateMismatch,
    ProviderUnavailable,
)
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

HOUR = 3600.0
# Clore limits each key to one request a second, whatever the endpoint: one bucket.
BUCKET = "clore"
RATE_LIMIT = 1.0  # seconds; even an urgent call waits this long after the last one
# An offer end this close above a whole hour still counts as that hour: the scheduler's
# "now" and ours differ by the time it took to get here, not by a renter's minute.
HOUR_SLACK = 60.0
# `code` values (Clore's API docs): retried, refused key; the rest are refusals.
RETRIED_CODES = {1: "database error", 5: "over the limit of one request a second"}
CODES = {2: "invalid input data", 3: "invalid API token", 4: "invalid endpoint"}
VISIBLE = {"public": True, "hidden": False, "private": False}
# Snapshots of the wallet kept for earnings: the days the broker asks about, and some.
BALANCE_DAYS = 4


class CloreProvider(ProviderKey):
    """`[provider] kind = "clore"`."""

    kind: Literal["clore"]
    server_name: str = Field(min_length=1)
    api_key_env: str | None = "CLORE_API_KEY"
    api_key_file: Path | None = None
    base_url: str = "https://api.clore.ai/v1"
    # Prices as `set_server_settings` takes them: per day for the whole server, in the
    # currency the server is priced in (`currency`, a key of `pricing` in server_config).
    currency: str = Field(default="bitcoin", min_length=1)
    price_on_demand: float = Field(gt=0, description="per day, in `currency`")
    price_spot: float | None = Field(
        default=None, gt=0, description="spot floor per day; unset = price_on_demand"
    )
    # Clore's shortest rental (its FAQ: 6 h to 3000 h). Above policy.max_commitment the
    # broker cannot keep its promise and never lists.
    min_rental: PositiveDuration = timedelta(hours=6)
    # Earnings: the rise of this wallet's balance, times `earnings_rate` (units of
    # energy.currency for one unit of the wallet's coin). Unset = earnings not counted.
    earnings_wallet: str = Field(default="CLORE-Blockchain", min_length=1)
    earnings_rate: float | None = Field(default=None, gt=0)
    # The report converts energy.currency to USD with this (USD for one unit of it).
    usd_per_currency: float = Field(default=1.0, gt=0)
    # One request a second per key; a little more so the platform's clock agrees.
    request_spacing: Duration = timedelta(seconds=1.1)
    request_timeout: PositiveDuration = timedelta(seconds=30)
    retry_attempts: int = Field(default=5, ge=1)

    def create(self, clock: Clock, context: ProviderContext) -> CloreMarket:
        return CloreMarket(self, clock, context=context)

    def check(self) -> list[str]:
        lines = super().check()
        hours = self.min_rental.total_seconds() / HOUR
        lines.append(
            f"Clore's shortest rental is {hours:g} h (provider.min_rental): "
            "policy.max_commitment and policy.min_listed must be at least that"
        )
        return lines

    # No estimate_price_gpu: Clore prices a whole server per day in a coin, not USD per
    # GPU-hour; the report has no rate for it.


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class CloreServerConfig(_Wire):
    """`config` of `GET server_config` (the API docs and the SDK's `ServerConfig`)."""

    name: str | None = None
    id: int | None = None
    connected: bool | None = None
    online: bool | None = None
    visibility: str | None = None
    mrl: int | None = Field(default=None, ge=0)
    pricing: dict[str, float | None] | None = None
    spot_pricing: dict[str, float | None] | None = None
    rental_status: int | None = None
    # Undocumented unit; read as hours, which is the safe side (see `_locked_until`).
    remaining_time: float | None = Field(default=None, ge=0)
    gpu_array: list[Any] | None = None
    specs: dict[str, Any] | None = None


class CloreServer(_Wire):
    """One of `GET my_servers`' servers."""

    name: str | None = None
    id: int | None = None
    online: bool | None = None
    visibility: str | None = None


class CloreWallet(_Wire):
    name: str
    balance: float | None = None


@dataclass(frozen=True)
class Balance:
    at: datetime
    amount: float


def check_answer(platform: str, key_source: str) -> Callable[[Any, str], None]:
    """The `code` of every Clore answer, read inside the retry loop."""

    def check(answer: Any, what: str) -> None:
        code = answer.get("code") if isinstance(answer, dict) else None
        if not isinstance(code, int) or isinstance(code, bool):
            raise ProviderError(f"{platform}: {what} answered no code: {answer!r:.200}")
        if code == 0:
            return
        error = answer.get("error") or answer.get("message")
        detail = f": {error}" if isinstance(error, str) and error else ""
        if code in RETRIED_CODES:
            raise ProviderUnavailable(f"{platform}: {what}: code {code}, {RETRIED_CODES[code]}")
        if code == 3:
            raise ProviderAuthError(
                f"{platform} refused the API key from {key_source} (code 3, invalid API token)"
            )
        meaning = CODES.get(code, "error")
        raise ProviderRejected(f"{platform} rejected {what}: code {code}, {meaning}{detail}")

    return check


class CloreMarket(Provider):
    kind = "clore"

    def __init__(
        self,
        config: CloreProvider,
        clock: Clock,
        *,
        context: ProviderContext | None = None,
        api_key: str | None = None,
    ) -> None:
        context = context or ProviderContext()
        self.config = config
        self.machine_id = config.server_name
        self._clock = clock
        self._context = context
        self._min_hours = math.ceil(config.min_rental.total_seconds() / HOUR)
        self.note = self._refusal(context)
        self.listable = not self.note
        from broker.providers.http import provider_api

        self._api: JsonApi = provider_api(
            "Clore.ai", config, clock, api_key, context.retry_attempts,
            auth_header="auth", auth_scheme="", spacing_floor=RATE_LIMIT,
            check_answer=check_answer("Clore.ai", config.key_source()),
        )  # fmt: skip
        # The end the last successful `list` was asked for (Clore keeps no offer end).
        self.listed_until: datetime | None = None
        self.last_mrl: int | None = None
        # While rented: when we first saw it so, and the longest `mrl` any order that is
        # running could have started under; an order ends by the one plus the other.
        self._rented_since: datetime | None = None
        self._mrl_high: int | None = None
        self._balances: list[Balance] = []

    def _refusal(self, context: ProviderContext) -> str:
        """Why the policy's promise cannot be kept on Clore ("" when it can): an order
        may run `min_rental`, so neither the commitment nor the shortest offer the
        scheduler puts up may be shorter."""
        shortest = self.config.min_rental

        def hours(value: timedelta) -> str:
            return f"{value.total_seconds() / HOUR:g} h"

        short = [
            f"policy.{key} ({hours(value)})"
            for key, value in (
                ("max_commitment", context.max_commitment),
                ("min_listed", context.min_listed),
            )
            if value is not None and value < shortest
        ]
        if not short:
            return ""
        return (
            f"{' and '.join(short)} {'is' if len(short) == 1 else 'are'} shorter than "
            f"Clore's shortest rental ({hours(shortest)}, provider.min_rental): an order "
            "could hold the GPUs longer than promised, or Clore would refuse the listing, so "
            "gpu-broker will not list on Clore.ai and only watches the server; set them to "
            f"at least {shortest.total_seconds() / HOUR:g}h"
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            can_list=self.listable,
            granularity="machine",
            can_displace_interruptible=False,  # no host call touches a renter's order
            earnings_source="estimate",
            note=self.note,
        )

    async def start(self) -> None:
        if not self.listable:
            log.warning("clore: %s", self.note)
        await self._api.start()

    async def close(self) -> None:
        await self._api.close()

    def set_deadline(self, deadline: float | None) -> None:
        self._api.deadline = deadline

    async def _call(
        self, method: str, endpoint: str, body: object = None, *, urgent: bool = False
    ) -> dict[str, Any]:
        answer = await self._api.request(
            method, f"/{endpoint}", body=body, endpoint=BUCKET, urgent=urgent
        )
        assert isinstance(answer, dict)  # check_answer let only a dict with code 0 through
        return answer

    # -- offers ----------------------------------------------------------------------

    def make_offer(
        self,
        end_date: datetime | None,
        *,
        load_watts_per_gpu: float | None = None,
        price_per_kwh: float | None = None,
        ask: float | None = None,
    ) -> Offer:
        if not self.listable:
            raise ProviderRejected(self.note)
        # Offer prices are USD per GPU-hour for Vast; Clore's are set in the section, per
        # day, in a coin. The offer carries the end; the price here is only for the log.
        return Offer(price_gpu=self.config.price_on_demand, end_date=end_date)

    def mrl_for(self, end_date: datetime | None) -> int:
        """Whole hours from now to `end_date` (a minute's slack), at most Clore's 3000."""
        if end_date is None:
            return 3000
        left = (end_date - self._clock.now()).total_seconds()
        return min(3000, max(0, math.floor((left + HOUR_SLACK) / HOUR)))

    def settings_body(self, *, availability: bool, mrl: int) -> dict[str, Any]:
        """`set_server_settings` as the SDK builds it with every argument given."""
        spot = self.config.price_spot or self.config.price_on_demand
        return {
            "name": self.config.server_name,
            "availability": availability,
            "mrl": mrl,
            "on_demand": self.config.price_on_demand,
            "spot": spot,
        }

    async def list(self, offer: Offer) -> ListResult:
        if not self.listable:
            raise ProviderRejected(self.note)
        mrl = self.mrl_for(offer.end_date)
        if mrl < self._min_hours:
            why = (
                f"Clore.ai: {mrl} h until the offer's end is under Clore's shortest rental "
                f"({self._min_hours} h, provider.min_rental)"
            )
            if self.listed_until is None:
                raise ProviderRejected(f"{why}: not listed")
            # A renewal near the window's end: the listing up now lets an order start
            # with the old, longer mrl and run past the end. Hidden, it cannot.
            await self.unlist()
            raise ProviderRejected(f"{why}: hidden instead")
        await self._call(
            "POST", "set_server_settings", self.settings_body(availability=True, mrl=mrl)
        )

        def differences(server: CloreServerConfig) -> builtins.list[str]:
            found = [] if _visible(server) is True else [f"visibility is {server.visibility!r}"]
            if server.mrl is not None and server.mrl != mrl:
                found.append(f"mrl is {server.mrl}, not {mrl}")
            price = (server.pricing or {}).get(self.config.currency)
            if price is not None and abs(price - self.config.price_on_demand) > 1e-9 * max(
                1.0, price
            ):
                found.append(f"price is {price} {self.config.currency}/day, not "
                             f"{self.config.price_on_demand}")  # fmt: skip
            return found

        await self._confirm(differences, "listing")
        self.listed_until = offer.end_date
        self.last_mrl = mrl
        self._mrl_high = max(self._mrl_high or 0, mrl)
        log.info(
            "clore: server %s rentable for orders of at most %d h (until %s), %s %s/day",
            self.machine_id, mrl, offer.end_date, self.config.price_on_demand,
            self.config.currency,
        )  # fmt: skip
        return ListResult(extended=0)  # Clore moves no running order's end

    async def unlist(self, *, urgent: bool = False) -> ProviderStatus | None:
        if not self.listable:
            raise ProviderRejected(self.note)
        mrl = self.last_mrl or self._mrl_high or self._min_hours
        await self._call(
            "POST", "set_server_settings", self.settings_body(availability=False, mrl=mrl),
            urgent=urgent,
        )  # fmt: skip

        def differences(server: CloreServerConfig) -> builtins.list[str]:
            return [] if _visible(server) is False else [f"visibility is {server.visibility!r}"]

        server = await self._confirm(differences, "hiding", urgent=urgent)
        self.listed_until = None
        log.info("clore: server %s hidden; running orders go on to their end", self.machine_id)
        return self.status_from(server)

    async def _confirm(
        self,
        differences: Callable[[CloreServerConfig], builtins.list[str]],
        what: str,
        *,
        urgent: bool = False,
    ) -> CloreServerConfig:
        """Read the server back (twice at most: Clore may lag a moment): a write answered
        code 0 is no proof it took."""
        problems: builtins.list[str] = []
        for _ in range(2):
            server = await self.server_config(urgent=urgent)
            problems = differences(server)
            if not problems:
                return server
        raise ProviderStateMismatch(
            f"Clore.ai answered the {what} of server {self.machine_id} as done, but it "
            "shows " + "; ".join(problems)
        )

    # -- reading ---------------------------------------------------------------------

    async def server_config(self, *, urgent: bool = False) -> CloreServerConfig:
        answer = await self._call(
            "GET", "server_config", {"server_name": self.config.server_name}, urgent=urgent
        )
        try:
            server = CloreServerConfig.model_validate(answer.get("config"))
        except ValidationError as error:
            raise ProviderError(f"Clore.ai: server_config not understood: {error}") from None
        if server.name is not None and server.name != self.config.server_name:
            raise ProviderError(
                f"Clore.ai answered server_config for {server.name!r}, not "
                f"{self.config.server_name!r}"
            )
        return server

    async def status(self, *, urgent: bool = False) -> ProviderStatus:
        return self.status_from(await self.server_config(urgent=urgent))

    def status_from(self, server: CloreServerConfig) -> ProviderStatus:
        listed = _visible(server)
        if server.rental_status is None:
            raise ProviderError(
                f"Clore.ai: server_config of {self.machine_id} does not say whether it is rented"
            )
        rented = server.rental_status != 0 or bool(server.remaining_time)
        now = self._clock.now()
        if rented:
            if self._rented_since is None:
                self._rented_since = now
            self._mrl_high = max(self._mrl_high or 0, server.mrl or 0) or None
            locked_until = self._locked_until(server, now)
        else:
            self._rented_since = None
            self._mrl_high = server.mrl
            locked_until = None
        gpus = self._gpu_count(server)
        each: Occupancy = "rented" if rented else "free"
        price = (server.pricing or {}).get(self.config.currency)
        return ProviderStatus(
            machine_id=self.machine_id,
            observed_at=now,
            listed=listed,
            offer_end=self.listed_until if listed else None,
            # Clore does not say whether an order is on-demand or spot (inferred: kinds
            # unknown); one order rents the whole server.
            rentals=Rentals(unknown_kind=1 if rented else 0),
            gpu_occupancy=(each,) * gpus,
            locked_until=locked_until,
            online=server.online,
            note=self.note,
            raw=server.model_dump() | ({"price_per_day": price} if price is not None else {}),
        )

    def _locked_until(self, server: CloreServerConfig, now: datetime) -> datetime | None:
        """The latest an order running now can end. It started before we saw it rented,
        under an `mrl` no longer than the longest seen since the server was last free:
        (first seen rented) + that mrl bounds it. `remaining_time`, in a unit Clore does
        not document, is read as hours and only ever shortens that bound: were it seconds
        or minutes, the hours reading is longer still, never shorter than the truth."""
        assert self._rented_since is not None
        bound: datetime | None = None
        if self._mrl_high:
            bound = self._rented_since + timedelta(hours=self._mrl_high)
        if server.remaining_time is not None:
            left = now + timedelta(hours=server.remaining_time)
            bound = left if bound is None else min(bound, left)
        if bound is None:
            return None  # neither is shown: the end is unknown, and the GPUs held
        # Whole seconds, rounded up: two reads a moment apart give the same end.
        return (bound + timedelta(microseconds=999_999)).replace(microsecond=0)

    def _gpu_count(self, server: CloreServerConfig) -> int:
        if server.gpu_array:
            return len(server.gpu_array)
        described = str((server.specs or {}).get("gpu") or "")
        head = described.split("x", 1)[0].strip()
        if head.isdigit() and int(head) > 0:
            return int(head)
        return max(1, self._context.gpu_count)

    async def servers(self) -> builtins.list[CloreServer]:
        answer = await self._call("GET", "my_servers")
        rows = answer.get("servers")
        if not isinstance(rows, list):
            raise ProviderError(f"Clore.ai: unexpected answer to my_servers: {answer!r:.200}")
        try:
            return [CloreServer.model_validate(row) for row in rows]
        except ValidationError as error:
            raise ProviderError(f"Clore.ai: a server record is not understood: {error}") from None

    async def wallets(self) -> builtins.list[CloreWallet]:
        answer = await self._call("GET", "wallets")
        rows = answer.get("wallets")
        if not isinstance(rows, list):
            raise ProviderError(f"Clore.ai: unexpected answer to wallets: {answer!r:.200}")
        try:
            return [CloreWallet.model_validate(row) for row in rows]
        except ValidationError as error:
            raise ProviderError(f"Clore.ai: a wallet is not understood: {error}") from None

    # -- earnings --------------------------------------------------------------------

    async def earnings(self, first_day: date, last_day: date) -> builtins.list[EarningsRecord]:
        """Per UTC day, the rise of `earnings_wallet`'s balance, times `earnings_rate`.
        Each reading is kept (a few days); the rise between two readings is shared among
        the days between them in proportion to time. An estimate: a deposit counts as
        earnings, a fall (a withdrawal) counts as nothing, and time before the first
        reading (a restart) is not seen at all."""
        rate = self.config.earnings_rate
        if rate is None:
            return []
        wallet = next(
            (w for w in await self.wallets() if w.name == self.config.earnings_wallet), None
        )
        if wallet is None or wallet.balance is None:
            raise ProviderRejected(
                f"provider.earnings_wallet: Clore.ai shows no balance for "
                f"{self.config.earnings_wallet!r}"
            )
        now = self._clock.now()
        self._balances.append(Balance(now, wallet.balance))
        oldest = now - timedelta(days=BALANCE_DAYS)
        self._balances = [b for b in self._balances if b.at >= oldest]
        rises = self._rises_by_day()
        return [
            EarningsRecord(
                provider="clore",
                machine_id=self.machine_id,
                day=day,
                amount=round(rise * rate, 6),
                currency=self._context.energy_currency,
                source="estimate",
                updated=now,
                detail={
                    "derived_from": "wallet balance change",
                    "wallet": self.config.earnings_wallet,
                    "coin": round(rise, 9),
                    "rate": rate,
                },
            )
            for day, rise in sorted(rises.items())
            if first_day <= day <= last_day
        ]

    def _rises_by_day(self) -> dict[date, float]:
        rises: dict[date, float] = {b.at.date(): 0.0 for b in self._balances}
        for before, after in zip(self._balances, self._balances[1:], strict=False):
            rise = after.amount - before.amount
            span = (after.at - before.at).total_seconds()
            if rise < 0:
                log.info("clore: %s's balance fell by %g (a withdrawal?): not counted",
                         self.config.earnings_wallet, -rise)  # fmt: skip
                continue
            if span <= 0:
                continue
            moment = before.at
            while moment < after.at:
                midnight = datetime.combine(
                    moment.date() + timedelta(days=1), datetime.min.time(), moment.tzinfo
                )
                stop = min(after.at, midnight)
                share = rise * (stop - moment).total_seconds() / span
                rises[moment.date()] = rises.get(moment.date(), 0.0) + share
                moment = stop
        return rises

    # -- check -----------------------------------------------------------------------

    async def probe(self) -> builtins.list[str]:
        servers = await self.servers()
        names = [s.name for s in servers if s.name]
        if self.config.server_name not in names:
            raise ProviderRejected(
                f"provider.server_name: server {self.config.server_name!r} is not among this "
                f"account's servers (found: {', '.join(map(repr, names)) or 'none'})"
            )
        status = await self.status()
        server = status.raw
        visible = {True: "rentable", False: "hidden", None: "visibility unknown"}[status.listed]
        online = {True: "online", False: "OFFLINE", None: "online state unknown"}[status.online]
        rented = "rented" if status.rented else "not rented"
        if status.locked_until:
            rented += f" until {status.locked_until.isoformat()} at the latest"
        lines = [
            "API key accepted",
            f"server {self.machine_id}: {len(status.gpu_occupancy)} GPU(s), {online}, "
            f"{visible}, mrl {server.get('mrl')} h, {rented}",
        ]
        if not self.listable:
            raise ProviderRejected(f"{lines[1]}; but {self.note}")
        return lines


def _visible(server: CloreServerConfig) -> bool:
    if server.visibility not in VISIBLE:
        raise ProviderError(f"Clore.ai: visibility {server.visibility!r} is not understood")
    return VISIBLE[server.visibility]
