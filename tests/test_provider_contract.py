"""The provider contract: the same tests over every marketplace the registry lists.

Each marketplace has a small harness (a `World`): the adapter, built through the registry
from a config section, and a handle on the platform behind it (the paper market's book, the
fake Vast, the fake RunPod, the fake Clore.ai) that can add a renter, end it, and make reads
fail where the platform allows. Adding a marketplace adds one harness to `WORLDS`.

What every provider promises the scheduler:
- `status()` is a snapshot: `listed` True/False/None, one occupancy per GPU, and
  `locked_until` at or after the end of every contract it knows of;
- `capabilities` tell the truth: what a provider cannot do raises `ProviderRejected` and
  sends nothing;
- a listing provider shows its offer and its end after `list`, shows it gone after
  `unlist` (which returns the state it read back), and running contracts survive an unlist;
- a failing or odd platform raises a `ProviderError` subclass, never anything else, and no
  guessed state is returned;
- `earnings()` answers the same for the same days; `urgent=True` reads and unlists alike;
- `set_deadline` bounds every call.
"""

from __future__ import annotations

import abc
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

import pytest
from fakes.clore import KEY as CLORE_KEY
from fakes.clore import FakeClore
from fakes.runpod import KEY as RUNPOD_KEY
from fakes.runpod import FakeRunpod
from fakes.vast import FakeVast, drive

from broker.clock import FakeClock
from broker.config import parse_config
from broker.errors import ConfigError, ProviderError, ProviderRejected
from broker.providers import Offer, Provider, ProviderStatus, RentalKind, create_provider
from broker.providers.paper import PaperMarket
from broker.providers.registry import MARKETPLACES, kind_of

T = TypeVar("T")
H = timedelta(hours=1)
GPUS = 4
OCCUPANCY = {"free", "on-demand", "interruptible", "reserved", "rented", "unknown"}


class World(abc.ABC):
    """One marketplace under test: its adapter and a handle on the platform behind it."""

    kind: ClassVar[str]
    can_list: ClassVar[bool]
    # Read faults the platform can be made to show ("500", "429", "garbage", "timeout").
    read_faults: ClassVar[tuple[str, ...]] = ()
    # 200 answers of a shape the adapter must refuse (not guess from).
    odd_reads: ClassVar[tuple[Any, ...]] = ()
    # Whether writes (list, unlist) can be made to fail.
    failing_writes: ClassVar[bool] = False

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.provider: Provider

    @abc.abstractmethod
    def section(self) -> dict[str, Any]:
        """The `[provider]` section (as TOML would give it)."""

    async def start(self) -> None:
        config = parse_config({"provider": self.section()})
        self.provider = create_provider(config, self.clock, gpu_count=GPUS)
        await self.provider.start()

    async def close(self) -> None:
        await self.provider.close()

    def run(self, awaitable: Awaitable[T]) -> Awaitable[T]:
        """Await a provider call, moving the fake clock through its waits."""
        return drive(self.clock, awaitable, limit=600)

    @abc.abstractmethod
    def add_renter(self, gpus: int, kind: RentalKind = RentalKind.ON_DEMAND) -> Any: ...

    @abc.abstractmethod
    def end_renter(self, renter: Any) -> None: ...

    def renter_end(self, renter: Any) -> datetime | None:
        """When the renter's contract ends, where the platform has one."""
        return None

    def sent(self) -> int:
        """Requests the platform has received."""
        return 0

    def fail_reads(self, fault: str, times: int) -> None:
        raise NotImplementedError

    def answer_reads(self, data: Any, times: int) -> None:
        raise NotImplementedError

    def fail_writes(self, status: int, times: int) -> None:
        raise NotImplementedError

    def heal(self) -> None:
        """Every injected fault gone."""
        raise NotImplementedError


class PaperWorld(World):
    kind = "paper"
    can_list = True

    def section(self) -> dict[str, Any]:
        return {"kind": "paper", "arrivals_per_hour": 0}

    @property
    def market(self) -> PaperMarket:
        assert isinstance(self.provider, PaperMarket)
        return self.provider

    def add_renter(self, gpus: int, kind: RentalKind = RentalKind.ON_DEMAND) -> Any:
        bid = 0.5 if kind is RentalKind.INTERRUPTIBLE else None
        return self.market.book.rent(self.clock.now(), kind, gpus, bid=bid)

    def end_renter(self, renter: Any) -> None:
        self.market.book.end(self.clock.now(), renter.id)

    def renter_end(self, renter: Any) -> datetime | None:
        end: datetime = renter.end
        return end


class VastWorld(World):
    """The fake Vast in its realistic mode (per-endpoint 429s, latency), with the default
    request spacing; only the latency is shortened to keep the suite fast."""

    kind = "vast"
    can_list = True
    failing_writes = True
    read_faults = ("500", "429", "garbage", "timeout")
    odd_reads = (
        None, {}, "x", [None], {"machines": 5}, [{"id": "x"}],
        [{"id": 4242, "num_gpus": "many"}],
        [{"id": 4242, "listed": True, "end_date": 1e300, "num_gpus": 4}],
        [{"id": 4242, "num_gpus": 4, "gpu_occupancy": "D x x x",
          "current_rentals_running": 1, "client_end_date": 1e20}],
    )  # fmt: skip

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.fake = FakeVast.realistic(clock, machines={4242: GPUS}, latency=0.01)

    def section(self) -> dict[str, Any]:
        return {
            "kind": "vast", "machine_id": 4242, "price_gpu": 0.3, "base_url": self.fake.url,
            "api_key_env": "CONTRACT_VAST_KEY", "docker_socket": "", "request_timeout": "300ms",
            "retry_attempts": 3,
        }  # fmt: skip

    async def start(self) -> None:
        await self.fake.start()
        await super().start()

    async def close(self) -> None:
        await super().close()
        await self.fake.close()

    def add_renter(self, gpus: int, kind: RentalKind = RentalKind.ON_DEMAND) -> Any:
        bid = 0.5 if kind is RentalKind.INTERRUPTIBLE else None
        return self.fake.add_rental(kind, gpus, bid=bid)

    def end_renter(self, renter: Any) -> None:
        self.fake.end_rental(renter.id)

    def renter_end(self, renter: Any) -> datetime | None:
        end: datetime = renter.end
        return end

    def sent(self) -> int:
        return len(self.fake.requests)

    def fail_reads(self, fault: str, times: int) -> None:
        where: dict[str, Any] = {"path": "/api/v0/machines", "method": "GET"}
        if fault == "garbage":
            self.fake.garbage(times, **where)
        elif fault == "timeout":
            self.fake.slow(1.0, times, **where)
        else:
            self.fake.fail(int(fault), times, **where)

    def answer_reads(self, data: Any, times: int) -> None:
        self.fake.answer(data, times, path="/api/v0/machines", method="GET")

    def fail_writes(self, status: int, times: int) -> None:
        self.fake.fail(status, times, path="/api/v0/machines", method="PUT")
        self.fake.fail(status, times, path="/api/v0/machines", method="DELETE")

    def heal(self) -> None:
        self.fake.faults.clear()


class RunpodWorld(World):
    kind = "runpod"
    can_list = False
    read_faults = ("500", "429", "garbage", "timeout")
    odd_reads = (
        None, [1], "x", {"data": 5}, {"errors": 5}, {"data": {"myself": []}},
        {"data": {"myself": {"machines": 5}}},
        {"data": {"myself": {"machines": [{"id": "m-1", "gpuTotal": "four"}]}}},
        {"data": {"myself": {"machines": [{"id": "m-1", "pods": [{"gpuCount": 1}]}]}}},
    )  # fmt: skip

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.fake = FakeRunpod()

    def section(self) -> dict[str, Any]:
        return {
            "kind": "runpod", "base_url": self.fake.url, "api_key_env": "CONTRACT_RUNPOD_KEY",
            "request_timeout": "300ms", "retry_attempts": 3,
        }  # fmt: skip

    async def start(self) -> None:
        await self.fake.start()
        await super().start()

    async def close(self) -> None:
        await super().close()
        await self.fake.close()

    def add_renter(self, gpus: int, kind: RentalKind = RentalKind.ON_DEMAND) -> Any:
        return self.fake.add_pod(gpus)

    def end_renter(self, renter: Any) -> None:
        self.fake.end_pod(renter)

    def sent(self) -> int:
        return len(self.fake.queries)

    def fail_reads(self, fault: str, times: int) -> None:
        if fault == "garbage":
            self.fake.garbage(times)
        elif fault == "timeout":
            self.fake.slow(1.0, times)
        else:
            self.fake.failures += [int(fault)] * times

    def answer_reads(self, data: Any, times: int) -> None:
        self.fake.answer(data, times)


class CloreWorld(World):
    """The fake Clore.ai: one request a second per key (answered `{"code": 5}`), errors as
    HTTP 200 with a code, latency shortened. Clore's shortest rental is taken as 30 min here
    (6 h in life, which no policy default allows) so the suite's 2 h offers may list;
    `test_provider_clore` keeps 6 h."""

    kind = "clore"
    can_list = True
    failing_writes = True
    # "429" is Clore's own way of saying it: HTTP 200 with {"code": 5}.
    read_faults = ("500", "429", "garbage", "timeout")
    odd_reads = (
        None, {}, "x", [1], {"code": "0"}, {"code": 0}, {"code": 0, "config": 5},
        {"code": 0, "config": {"name": "rig", "visibility": "public"}},
        {"code": 0, "config": {"name": "rig", "visibility": "sometimes", "rental_status": 0}},
        {"code": 0, "config": {"name": "rig", "visibility": "hidden", "rental_status": "no"}},
        {"code": 0, "config": {"name": "other", "visibility": "hidden", "rental_status": 0}},
        {"code": 0, "config": {"name": "rig", "visibility": "public", "rental_status": 1,
                               "mrl": "long"}},
        {"code": 2}, {"code": 6, "error": "invalid_server"}, {"code": 99},
    )  # fmt: skip
    SERVER_CONFIG = "/v1/server_config"
    SETTINGS = "/v1/set_server_settings"

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.fake = FakeClore.realistic(
            clock, servers={"rig": GPUS}, latency=0.01, min_rental=1
        )

    def section(self) -> dict[str, Any]:
        return {
            "kind": "clore", "server_name": "rig", "base_url": self.fake.url,
            "api_key_env": "CONTRACT_CLORE_KEY", "price_on_demand": 0.0002,
            "min_rental": "30m", "earnings_rate": 80000.0, "request_timeout": "300ms",
            "retry_attempts": 3,
        }  # fmt: skip

    async def start(self) -> None:
        await self.fake.start()
        await super().start()

    async def close(self) -> None:
        await super().close()
        await self.fake.close()

    def add_renter(self, gpus: int, kind: RentalKind = RentalKind.ON_DEMAND) -> Any:
        # One order rents the whole server, whatever the GPUs asked for.
        return self.fake.rent(kind="spot" if kind is RentalKind.INTERRUPTIBLE else "on-demand")

    def end_renter(self, renter: Any) -> None:
        self.fake.end_order(renter)

    def renter_end(self, renter: Any) -> datetime | None:
        end: datetime = renter.end
        return end

    def sent(self) -> int:
        return len(self.fake.requests)

    def fail_reads(self, fault: str, times: int) -> None:
        if fault == "garbage":
            self.fake.garbage(times, path=self.SERVER_CONFIG)
        elif fault == "timeout":
            self.fake.slow(1.0, times, path=self.SERVER_CONFIG)
        elif fault == "429":
            self.fake.code(5, times, path=self.SERVER_CONFIG)
        else:
            self.fake.fail(int(fault), times, path=self.SERVER_CONFIG)

    def answer_reads(self, data: Any, times: int) -> None:
        self.fake.answer(data, times, path=self.SERVER_CONFIG)

    def fail_writes(self, status: int, times: int) -> None:
        if status == 429:
            self.fake.code(5, times, path=self.SETTINGS)
        else:
            self.fake.fail(status, times, path=self.SETTINGS)

    def heal(self) -> None:
        self.fake.faults.clear()


WORLDS: dict[str, type[World]] = {
    w.kind: w for w in (PaperWorld, VastWorld, RunpodWorld, CloreWorld)
}
LISTING = [k for k, w in WORLDS.items() if w.can_list]
OBSERVING = [k for k, w in WORLDS.items() if not w.can_list]
READ_FAULTS = [(k, f) for k, w in WORLDS.items() for f in w.read_faults]
ODD_READS = [(k, i) for k, w in WORLDS.items() for i in range(len(w.odd_reads))]


def test_every_registered_marketplace_has_a_harness() -> None:
    assert sorted(WORLDS) == sorted(kind_of(m) for m in MARKETPLACES)


@pytest.mark.parametrize("section", MARKETPLACES, ids=kind_of)
def test_every_section_gets_the_config_errors_with_key_paths(section: type[Any]) -> None:
    kind = kind_of(section)
    with pytest.raises(ConfigError) as raised:
        parse_config({"provider": {"kind": kind, "poll_intervall": "5s"}})
    assert "provider.poll_intervall: unknown key (did you mean 'poll_interval'?)" in (
        raised.value.problems
    )
    with pytest.raises(ConfigError) as raised:
        parse_config({"provider": {"kind": kind, "poll_interval": "soon"}})
    assert any(p.startswith("provider.poll_interval: ") for p in raised.value.problems)


def test_reading_the_config_loads_no_http_stack() -> None:
    # broker.config imports every marketplace module for its section; their adapters'
    # HTTP clients are imported only when an adapter is made.
    code = "import sys, broker.config; print(sorted({'aiohttp', 'tenacity'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


@pytest.fixture
async def world(
    request: pytest.FixtureRequest, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    monkeypatch.setenv("CONTRACT_VAST_KEY", "test-key")
    monkeypatch.setenv("CONTRACT_RUNPOD_KEY", RUNPOD_KEY)
    monkeypatch.setenv("CONTRACT_CLORE_KEY", CLORE_KEY)
    made = WORLDS[request.param](clock)
    await made.start()
    # The harness says what the platform allows; the adapter must say the same.
    assert made.provider.capabilities.can_list is made.can_list
    yield made
    await made.close()


def offer(world: World, hours: float = 2) -> Offer:
    return Offer(price_gpu=0.3, end_date=world.clock.now() + hours * H)


async def rented(world: World, gpus: int = 2) -> Any:
    """A renter on the machine (after listing it, where the broker lists)."""
    if world.can_list:
        await world.run(world.provider.list(offer(world)))
    return world.add_renter(gpus)


def assert_snapshot(world: World, status: ProviderStatus) -> None:
    assert isinstance(status, ProviderStatus)
    assert status.listed in (True, False, None)
    assert len(status.gpu_occupancy) == GPUS
    assert set(status.gpu_occupancy) <= OCCUPANCY
    assert status.observed_at == world.clock.now()


def same_state(a: ProviderStatus, b: ProviderStatus) -> tuple[Any, ...]:
    fields = ("listed", "offer_end", "rentals", "gpu_occupancy", "locked_until")
    return tuple(getattr(a, f) == getattr(b, f) for f in fields)


# -- status ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS, indirect=True)
async def test_status_of_an_idle_machine(world: World) -> None:
    status = await world.run(world.provider.status())
    assert_snapshot(world, status)
    assert not status.rented and status.rentals.total == 0
    assert status.locked_until is None
    assert "free" in status.gpu_occupancy


@pytest.mark.parametrize("world", WORLDS, indirect=True)
async def test_a_renter_shows_and_locks_the_gpus_until_its_end(world: World) -> None:
    renter = await rented(world, gpus=2)
    status = await world.run(world.provider.status())
    assert_snapshot(world, status)
    assert status.rented and status.rentals.total == 1
    # Two GPUs are the renter's; none of them may read as free.
    assert sum(o != "free" for o in status.gpu_occupancy) >= 2
    end = world.renter_end(renter)
    if end is not None:
        assert status.locked_until is not None and status.locked_until >= end

    world.end_renter(renter)
    status = await world.run(world.provider.status())
    assert not status.rented and status.locked_until is None


@pytest.mark.parametrize("world", WORLDS, indirect=True)
async def test_an_urgent_read_shows_what_a_background_one_does(world: World) -> None:
    await rented(world)
    background = await world.run(world.provider.status())
    urgent = await world.run(world.provider.status(urgent=True))
    assert_snapshot(world, urgent)
    assert all(same_state(background, urgent))


# -- capabilities ---------------------------------------------------------------------


@pytest.mark.parametrize("world", OBSERVING, indirect=True)
async def test_an_observe_only_provider_refuses_to_list_and_sends_nothing(world: World) -> None:
    before = world.sent()
    with pytest.raises(ProviderRejected):
        world.provider.make_offer(world.clock.now() + H)
    with pytest.raises(ProviderRejected):
        await world.run(world.provider.list(offer(world)))
    with pytest.raises(ProviderRejected):
        await world.run(world.provider.unlist())
    with pytest.raises(ProviderRejected):
        await world.run(world.provider.unlist(urgent=True))
    assert world.sent() == before


@pytest.mark.parametrize("world", WORLDS, indirect=True)
async def test_displacing_is_done_only_where_the_capabilities_say(world: World) -> None:
    if world.can_list:
        await world.run(world.provider.list(offer(world)))
    world.add_renter(GPUS, RentalKind.INTERRUPTIBLE)
    before = world.sent()
    if not world.provider.capabilities.can_displace_interruptible:
        with pytest.raises(ProviderRejected):
            await world.run(world.provider.displace_interruptible())
        assert world.sent() == before
        return
    await world.run(world.provider.displace_interruptible())
    status = await world.run(world.provider.status())
    # The interruptible renter is paused: it runs no more, and our own self-rental is
    # no renter.
    assert status.rentals.interruptible == 0 and status.rentals.total == 0
    await world.run(world.provider.end_displacement())
    status = await world.run(world.provider.status())
    assert status.rentals.interruptible == 1


# -- listing --------------------------------------------------------------------------


@pytest.mark.parametrize("world", LISTING, indirect=True)
async def test_list_shows_the_offer_and_its_end(world: World) -> None:
    wanted = offer(world, hours=3)
    await world.run(world.provider.list(wanted))
    status = await world.run(world.provider.status())
    assert status.listed is True
    assert status.offer_end is not None and wanted.end_date is not None
    assert abs((status.offer_end - wanted.end_date).total_seconds()) <= 1


@pytest.mark.parametrize("urgent", [False, True], ids=["background", "urgent"])
@pytest.mark.parametrize("world", LISTING, indirect=True)
async def test_unlist_returns_the_read_back_and_running_contracts_survive(
    world: World, urgent: bool
) -> None:
    renter = await rented(world, gpus=1)
    read_back = await world.run(world.provider.unlist(urgent=urgent))
    if read_back is not None:
        assert_snapshot(world, read_back)
        assert read_back.listed is False and read_back.rentals.total == 1
    status = await world.run(world.provider.status())
    assert status.listed is False and status.offer_end is None
    assert status.rented and status.rentals.total == 1
    end = world.renter_end(renter)
    assert end is not None and status.locked_until is not None and status.locked_until >= end


# -- failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world", "fault"), READ_FAULTS, indirect=["world"], ids=[f"{k}-{f}" for k, f in READ_FAULTS]
)
async def test_a_failing_platform_raises_a_provider_error(world: World, fault: str) -> None:
    await rented(world)
    world.fail_reads(fault, times=100)
    with pytest.raises(ProviderError):
        await world.run(world.provider.status())
    with pytest.raises(ProviderError):
        await world.run(world.provider.status(urgent=True))


@pytest.mark.parametrize(
    ("world", "fault"), READ_FAULTS, indirect=["world"], ids=[f"{k}-{f}" for k, f in READ_FAULTS]
)
async def test_a_passing_failure_is_retried_to_the_true_state(world: World, fault: str) -> None:
    await rented(world)
    world.fail_reads(fault, times=1)
    status = await world.run(world.provider.status())
    assert status.rented and status.rentals.total == 1


@pytest.mark.parametrize("status", [500, 429, 400])
@pytest.mark.parametrize("world", [k for k, w in WORLDS.items() if w.failing_writes], indirect=True)
async def test_a_failing_write_raises_and_is_not_taken_as_done(world: World, status: int) -> None:
    await world.run(world.provider.list(offer(world)))
    world.fail_writes(status, times=100)
    with pytest.raises(ProviderError):
        await world.run(world.provider.unlist(urgent=True))
    with pytest.raises(ProviderError):
        await world.run(world.provider.list(offer(world, hours=5)))
    world.heal()
    status_now = await world.run(world.provider.status())
    assert status_now.listed is True  # the unlist did not happen, and nothing says it did
    assert status_now.offer_end is not None
    assert status_now.offer_end <= world.clock.now() + 2 * H  # nor did the new end


@pytest.mark.parametrize(
    ("world", "index"), ODD_READS, indirect=["world"], ids=[f"{k}-{i}" for k, i in ODD_READS]
)
async def test_an_odd_answer_is_a_provider_error_not_a_guess(world: World, index: int) -> None:
    world.answer_reads(world.odd_reads[index], times=100)
    with pytest.raises(ProviderError):
        await world.run(world.provider.status())


@pytest.mark.parametrize("world", [k for k, w in WORLDS.items() if w.read_faults], indirect=True)
async def test_a_deadline_bounds_the_retries(world: World) -> None:
    world.fail_reads("500", times=100)
    start = world.clock.monotonic()
    world.provider.set_deadline(start + 2.0)
    with pytest.raises(ProviderError):
        await world.run(world.provider.status())
    # Without the deadline three tries back off 1..2 s and 2..3 s: past the deadline.
    assert world.clock.monotonic() - start <= 2.0
    world.provider.set_deadline(None)


# -- earnings -------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS, indirect=True)
async def test_earnings_are_the_same_for_the_same_days(world: World) -> None:
    await rented(world, gpus=GPUS)
    await world.clock.advance(13 * H)  # across midnight: two days with earnings
    first = world.clock.now().date() - timedelta(days=1)
    last = world.clock.now().date()
    once = await world.run(world.provider.earnings(first, last))
    again = await world.run(world.provider.earnings(first, last))
    assert [(r.day, r.amount) for r in once] == [(r.day, r.amount) for r in again]
    days = [r.day for r in once]
    assert days == sorted(set(days)) and all(first <= d <= last for d in days)
    assert all(r.provider == world.kind for r in once)

