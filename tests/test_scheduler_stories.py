"""Issue 11's five findings, each as a story through the whole daemon (tests/fakes/rig.py):
the fake Vast (or a RunPod-like GraphQL fake), fake GPUs, the real gate, the injected clock.

1-2. A reclaim of an unrented listing does not wait for the request spacing nor for a
     marketplace read that stalls: the unlist is urgent and its read-back releases the request.
3.   An observe-only provider (RunPod) is only watched: no drain, no unlist of a listing made
     in its dashboard, gates guarded only while pods run.
4.   A renter's own GPU load, before its rental shows and after it ends, is not a reclaim.
5.   A user refused with 503 keeps the pool local after the renters leave: no relisting before
     the time the refusal told them to retry by.
+    A service probe answering an unexpected shape does not stop the daemon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import ollama
import pytest
from aiohttp import ClientSession, web
from fakes.rig import RigFactory, chat, journal_kinds, listed
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.providers import RentalKind
from broker.scheduling.pool import PoolState

MACHINE = "/api/v0/machines/4242"


def states_seen(rig: Any, reasons: list[str] | None = None) -> set[PoolState]:
    """Every state the machine decides from now on (and, into `reasons`, why)."""
    seen: set[PoolState] = set()
    original = rig.daemon.scheduler.machine.step

    def step(obs: Any) -> Any:
        decision = original(obs)
        seen.add(decision.state)
        if reasons is not None:
            reasons.append(decision.reason)
        return decision

    rig.daemon.scheduler.machine.step = step
    return seen


# -- 1 and 2: the urgent path -----------------------------------------------------------------


async def test_a_reclaim_does_not_wait_for_request_spacing(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    # Vast's default spacing (2 s per endpoint). Today's code read the machine (spaced)
    # before and after the unlist: seconds of waiting for a listing nobody rents.
    rig = await make_rig(provider={"request_spacing": "2s"})
    await listed(rig)
    await rig.run_for(1)
    before = clock.monotonic()
    answer = await asyncio.wait_for(chat(rig), 5)
    assert answer.message.content
    # Unlisted, read back and released without any virtual time passing: no spacing wait.
    assert clock.monotonic() == before
    assert not rig.offer.listed
    assert list(rig.daemon.scheduler.latency.arrival_to_unlist) == [0.0]
    await rig.run_for(1)
    assert rig.state is PoolState.LOCAL


async def test_a_stalled_marketplace_read_does_not_delay_the_unlist(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(provider={"request_timeout": "30s", "retry_attempts": 1})
    await listed(rig)
    # The next background read of the machine hangs (40 s of real time).
    fake_vast.slow(40, path=MACHINE)
    reads = len(fake_vast.calls(method="GET", path=MACHINE))
    for _ in range(30):  # up to poll_interval and more: the next read of the machine starts
        await clock.advance(1)
        await asyncio.sleep(0.02)
        if len(fake_vast.calls(method="GET", path=MACHINE)) > reads:
            break
    assert len(fake_vast.calls(method="GET", path=MACHINE)) > reads, "the read has started"
    answer = await asyncio.wait_for(chat(rig), 3)  # real seconds: far less than the stall
    assert answer.message.content
    assert not rig.offer.listed
    assert fake_vast.calls(method="DELETE"), "unlisted"


# -- 3: observe-only ----------------------------------------------------------------------------


class FakeRunpod:
    """RunPod's GraphQL read, with one machine listed in its dashboard."""

    def __init__(self) -> None:
        self.pods: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _graphql(self, request: web.Request) -> web.Response:
        await request.read()
        machine = {
            "id": "m-1", "listed": True, "gpuTotal": 2,
            "gpuReserved": sum(p["gpuCount"] for p in self.pods),
            "hostPricePerGpu": 0.25, "hostMinBidPerGpu": 0.1, "pods": self.pods,
            "machineBalance": {"hostTotalEarnings": 0, "hostGpuEarnings": 0,
                               "hostDiskEarnings": 0},
        }  # fmt: skip
        return web.json_response(
            {"data": {"myself": {"machines": [machine], "machineEarnings": []}}}
        )

    async def __aenter__(self) -> FakeRunpod:
        app = web.Application()
        app.add_routes([web.post("/graphql", self._graphql)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def runpod(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeRunpod]:
    monkeypatch.setenv("RIG_RUNPOD_KEY", "rp-key")
    async with FakeRunpod() as server:
        yield server


async def test_observe_only_never_drains_and_leaves_a_dashboard_listing_alone(
    make_rig: RigFactory, clock: FakeClock, runpod: FakeRunpod, fake_vast: FakeVast
) -> None:
    rig = await make_rig(
        paper=True,
        provider={"kind": "runpod", "base_url": runpod.url, "api_key_env": "RIG_RUNPOD_KEY",
                  "request_spacing": "0s", "machine_id": "m-1"},
    )  # fmt: skip
    seen = states_seen(rig)
    control = rig.daemon.gates[0].control
    await rig.run_for(1800, step=10)  # half an hour, idle_window is 2 min
    assert PoolState.DRAINING not in seen and PoolState.RECLAIMING not in seen
    assert rig.state is PoolState.IDLE
    assert not control.mode.guarded
    answer = await asyncio.wait_for(chat(rig), 5)  # served at once: no pod runs
    assert answer.message.content
    kinds = await journal_kinds(rig)
    assert not [k for k in kinds if k[0] in ("drain", "list", "unlist")]

    # A pod starts: the broker shows it rented and holds local requests; it ends: local.
    runpod.pods.append({"id": "p1", "desiredStatus": "RUNNING", "costPerHr": 0.5,
                        "gpuCount": 2})  # fmt: skip
    await rig.until_state(PoolState.RENTED, limit=120)
    assert control.mode.guarded and control.mode.renters
    runpod.pods.clear()
    await rig.until(lambda: not control.mode.guarded, limit=120)
    assert rig.state in (PoolState.LOCAL, PoolState.IDLE)
    kinds = await journal_kinds(rig)
    assert not [k for k in kinds if k[0] in ("drain", "list", "unlist")]


# -- 4: renter versus team ----------------------------------------------------------------------


def loaded_gpus(start: str, end: str) -> dict[str, Any]:
    """Both fake GPUs busy (a renter's container, say) from `start` to `end`."""
    steps = [{"at": start, "utilization_pct": 95, "memory_used_mb": 18000},
             {"at": end, "utilization_pct": 0, "memory_used_mb": 0}]  # fmt: skip
    return {"fake": [{"uuid": "GPU-rig-0", "timeline": steps},
                     {"uuid": "GPU-rig-1", "timeline": steps}]}  # fmt: skip


async def test_a_renters_own_load_before_and_after_its_rental_shows_is_no_reclaim(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(gpus=loaded_gpus("4m", "7m"))
    t0 = clock.monotonic()
    await listed(rig)  # at about 2m15s
    seen = states_seen(rig)
    await rig.until(lambda: clock.monotonic() - t0 >= 239)
    # The renter's container loads the GPUs at 4m; the broker's last read of the
    # marketplace is seconds old and shows no rental yet.
    contract = fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
    await rig.until_state(PoolState.RENTED, limit=30)
    # It leaves at 6m with the offer still up; its load lingers until 7m (+ debounce).
    await rig.until(lambda: clock.monotonic() - t0 >= 360)
    fake_vast.end_rental(contract.id)
    await rig.until_state(PoolState.LISTED, limit=30)
    await rig.run_for(180, step=2)
    assert rig.state is PoolState.LISTED
    assert PoolState.RECLAIMING not in seen
    assert not fake_vast.calls(method="DELETE"), "never unlisted for a renter's load"
    # Local use after that is still local use: GPU load nobody explains, checked against a
    # provider read newer than it, reclaims.


async def test_unexplained_gpu_use_is_reclaimed_after_a_fresh_read(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(gpus=loaded_gpus("4m", "9m"))
    t0 = clock.monotonic()
    await listed(rig)
    reasons: list[str] = []
    states_seen(rig, reasons)
    await rig.until(lambda: rig.state is not PoolState.LISTED, limit=300)
    assert clock.monotonic() - t0 < 250
    assert rig.state is PoolState.LOCAL and not rig.offer.listed
    # First a check against the marketplace, then the reclaim on a read newer than the load.
    checking = next(i for i, r in enumerate(reasons) if "checking" in r)
    assert any("local GPU use" in r for r in reasons[checking + 1 :])


# -- 5: refused users are remembered ------------------------------------------------------------


async def test_a_refused_user_keeps_the_pool_local_after_the_renters_leave(
    make_rig: RigFactory,
    clock: FakeClock,
    fake_vast: FakeVast,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = await make_rig()
    await listed(rig)
    contract = fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)  # until the 1 h offer end
    await rig.until_state(PoolState.RENTED, limit=60)
    with caplog.at_level(logging.INFO), pytest.raises(ollama.ResponseError) as raised:
        await chat(rig)
    assert raised.value.status_code == 503
    assert "at the latest" in raised.value.error
    refusals = [r for r in caplog.records if "refused (503)" in r.getMessage()]
    assert len(refusals) == 1
    await rig.until(lambda: not rig.offer.listed, limit=5, step=0.1)
    # The renter leaves after 10 min, long before its contract's end.
    await rig.run_for(600, step=10)
    fake_vast.end_rental(contract.id)
    await rig.until_state(PoolState.LOCAL, limit=60)
    # The local hold (5 min) and the idle window (2 min) pass; the refused user was told
    # to come back within the hour: the GPUs wait for them, unlisted.
    await rig.run_for(1800, step=10)
    assert rig.state is PoolState.LOCAL
    assert "refused request" in rig.daemon.scheduler.last_reason
    assert len(fake_vast.calls(method="PUT")) == 1, "not listed again"
    answer = await asyncio.wait_for(chat(rig), 5)
    assert answer.message.content


# -- no single component stops the service ------------------------------------------------------


@pytest.fixture
async def odd_server() -> AsyncIterator[str]:
    """An OpenAI-compatible server whose /slots answers an object, not llama.cpp's list."""

    async def slots(request: web.Request) -> web.Response:
        return web.json_response({"slots": "not a list", "busy": 1})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.add_routes([web.get("/slots", slots), web.get("/v1/models", models)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_a_probe_answering_an_unexpected_shape_does_not_stop_the_daemon(
    make_rig: RigFactory, odd_server: str
) -> None:
    rig = await make_rig(services={"kind": "openai", "upstream": odd_server})
    await rig.run_for(60, step=5)
    tasks = {t.get_name(): t for t in rig.daemon._tasks}
    assert not tasks["scheduler"].done(), "the scheduler still runs"
    probe = rig.daemon.scheduler.probes["ollama"]
    assert probe.busy is None  # unknown, not a crash
    await listed(rig)  # and the pool goes on
    async with ClientSession() as session, session.get(rig.api_url + "/api/status") as r:
        assert r.status == 200
