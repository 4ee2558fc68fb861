"""The whole broker, end to end, in virtual time: fake GPUs, the fake Ollama behind the real
gate (driven by the real `ollama` client), the fake Vast.ai server, a real SQLite ledger.

Each story checks the invariants of SPEC section 3 where they bite: the offer never ends
after the window (1), nothing is listed before a verified drain (2), a local request is
served or answered 503 with Retry-After, never lost (3), every action is journaled before
it is taken (4), and the anti-flap limits hold (6).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
import ollama
import pytest
from fakes.ollama import FakeOllama
from fakes.rig import TOKEN, Rig, RigFactory, chat, journal_kinds, listed
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.providers import RentalKind
from broker.scheduling.pool import PoolState

# -- the main story -----------------------------------------------------------------------


async def test_idle_drain_list_rent_reclaim_and_the_held_chat_is_served(
    make_rig: RigFactory, clock: FakeClock, fake_ollama: FakeOllama, fake_vast: FakeVast
) -> None:
    # The window closes at 12:30, so the offer (and every contract) ends then.
    rig = await make_rig(windows=[{"cron": "0 12 * * *", "duration": "30m"}])
    took = await listed(rig)
    # idle_debounce (5 s), then idle_window (2 min), then the drain verified
    assert 125 <= took <= 140
    assert fake_ollama.loaded == {}, "the drain unloaded every model before listing"
    offer = rig.offer
    assert offer.listed
    # end = min(window end 12:30, now + max_commitment 1h) (invariant 1)
    assert offer.end_date.isoformat() == "2026-11-25T12:30:00+00:00"
    assert rig.daemon.gates[0].control.mode.value == "guarded"

    contract = fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
    await rig.until_state(PoolState.RENTED, limit=60)
    await rig.until(lambda: clock.now().isoformat() >= "2026-11-25T12:29:45", step=5)
    assert rig.state is PoolState.RENTED

    # A team member chats 15 s before the contract ends (max_hold is 30 s): held, and the
    # offer is withdrawn in the same step.
    request = asyncio.create_task(chat(rig))
    await rig.until(lambda: not rig.offer.listed, limit=5, step=0.01)
    assert rig.state is PoolState.RECLAIMING
    assert not request.done()
    assert rig.daemon.status()["services"][0]["held"] == 1
    assert list(rig.daemon.scheduler.latency.arrival_to_unlist) == [0.0]  # same virtual instant

    # The contract ends: the GPUs come back and the held chat is served.
    await rig.until(request.done, limit=40)
    answer = request.result()
    assert answer.message.content and answer.done
    assert clock.now().isoformat() >= "2026-11-25T12:30:00"
    assert rig.state is PoolState.LOCAL
    assert rig.daemon.gates[0].control.mode.value == "open"
    assert contract.ended_at is None or contract.ended_at <= clock.now()

    kinds = await journal_kinds(rig)
    # Every action has its intent written first and completed after (invariant 4).
    assert ("drain", "done") in kinds and ("list", "done") in kinds
    assert ("unlist", "done") in kinds and ("request_held", "note") in kinds
    assert ("request_rejected", "note") not in kinds
    assert not [k for k in kinds if k[1] == "intent"]


async def test_a_chat_while_a_long_contract_runs_gets_503_with_retry_after(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    rig = await make_rig()
    await listed(rig)
    fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)  # the contract keeps the 1 h end
    await rig.until_state(PoolState.RENTED, limit=60)
    with pytest.raises(ollama.ResponseError) as raised:
        await chat(rig)
    assert raised.value.status_code == 503
    assert "rented until" in raised.value.error
    # Refused at once, yet the request still withdrew the offer: no renter comes after it.
    await rig.until(lambda: not rig.offer.listed, limit=5, step=0.01)
    assert rig.state is PoolState.RECLAIMING
    # The same through plain HTTP: Retry-After says how long the contract still runs.
    async with aiohttp.ClientSession() as session, session.post(
        rig.gate_url + "/api/generate", json={"model": "llama3.2:1b", "prompt": "x"}
    ) as response:
        assert response.status == 503
        retry = int(response.headers["Retry-After"])
        assert 30 < retry <= 3600
        body = await response.json()
        assert "error" in body
    await rig.run_for(1)  # the next step writes what the gates saw
    kinds = await journal_kinds(rig)
    assert kinds.count(("request_rejected", "note")) == 2


async def test_a_held_request_past_max_hold_gets_503(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    """The contract ends, but the marketplace stops answering, so the broker cannot see
    the GPUs free: the held request gets its 503 at max_hold, not an endless wait."""
    rig = await make_rig(windows=[{"cron": "0 12 * * *", "duration": "30m"}])
    await listed(rig)
    fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
    await rig.until_state(PoolState.RENTED, limit=60)
    await rig.until(lambda: clock.now().isoformat() >= "2026-11-25T12:29:50", step=5)
    fake_vast.fail(500, times=10_000, path="/api/v0/machines")
    request = asyncio.create_task(chat(rig))
    await rig.until(request.done, limit=120)
    with pytest.raises(ollama.ResponseError) as raised:
        request.result()
    assert raised.value.status_code == 503
    assert "were not free within 30 s" in raised.value.error
    assert rig.state is PoolState.DEGRADED, "it cannot see the marketplace"
    fake_vast.faults.clear()
    await rig.until_state(PoolState.LOCAL, limit=60)
    answer = await asyncio.wait_for(chat(rig), 5)
    assert answer.message.content


# -- windows --------------------------------------------------------------------------------


async def test_window_closing_while_listed_withdraws_the_offer(
    make_rig: RigFactory, clock: FakeClock
) -> None:
    # A 30 min window from 12:00: listed at ~12:02 until 12:30 at the latest (invariant 1).
    rig = await make_rig(windows=[{"cron": "0 12 * * *", "duration": "30m"}])
    await listed(rig)
    assert rig.offer.end_date.isoformat() == "2026-11-25T12:30:00+00:00"
    await rig.until(lambda: not rig.offer.listed, limit=1800, step=5)
    assert clock.now().isoformat() <= "2026-11-25T12:30:05+00:00"
    await rig.until_state(PoolState.LOCAL, limit=10)
    assert rig.daemon.gates[0].control.mode.value == "open"


async def test_window_closing_while_rented_waits_for_the_contract_then_gives_back(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(windows=[{"cron": "0 12 * * *", "duration": "30m"}])
    await listed(rig)
    fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=1)
    await rig.until_state(PoolState.RENTED, limit=60)
    # One GPU rented, the other still on offer: the ledger's per-GPU states say so.
    ledger = rig.daemon.ledger
    assert ledger is not None
    gpu_now = {
        i.subject: i.state
        for i in await ledger.state_intervals(clock.now() - timedelta(hours=1),
                                              clock.now() + timedelta(seconds=1), scope="gpu")
        if i.end is None
    }  # fmt: skip
    assert sorted(gpu_now.values()) == ["LISTED", "RENTED"]
    locked = rig.daemon.scheduler.locked_until()
    # The contract keeps the offer's end date, which is the window's end (invariant 1).
    assert locked is not None and locked.isoformat() == "2026-11-25T12:30:00+00:00"
    await rig.until_state(PoolState.LOCAL, limit=1800, step=5)
    assert clock.now() - locked < timedelta(seconds=15)
    assert not rig.offer.listed
    assert rig.daemon.gates[0].control.mode.value == "open"
    # No offer, first or renewed, ever ended after the window.
    window_end = datetime(2026, 11, 25, 12, 30, tzinfo=UTC).timestamp()
    ends = [c.body["end_date"] for c in fake_vast.calls(method="PUT")]
    assert ends and all(end <= window_end for end in ends)


async def test_outside_every_window_the_broker_never_lists(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    rig = await make_rig(windows=[{"cron": "0 22 * * *", "duration": "2h"}])
    await rig.run_for(1800, step=10)
    assert rig.state is PoolState.LOCAL
    assert "outside every window" in rig.daemon.scheduler.last_reason
    assert not fake_vast.calls(method="PUT")


# -- demand during drain, anti-flap ---------------------------------------------------------


async def test_a_chat_during_the_drain_aborts_it_and_is_served_at_once(
    make_rig: RigFactory, fake_ollama: FakeOllama, fake_vast: FakeVast
) -> None:
    fake_ollama.unload_delay_polls = 30  # the unload takes a while: time for a request
    rig = await make_rig()
    await rig.until_state(PoolState.DRAINING, limit=300)
    answer = await asyncio.wait_for(chat(rig), 5)
    assert answer.message.content
    await rig.run_for(2)
    assert rig.state in (PoolState.LOCAL, PoolState.IDLE)
    assert not fake_vast.calls(method="PUT"), "never listed"
    kinds = await journal_kinds(rig)
    assert ("drain", "failed") in kinds and ("resume_services", "done") in kinds


async def test_flapping_demand_meets_local_hold_and_the_daily_cycle_limit(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(
        policy={"max_cycles_per_day": 2, "local_hold": "5m", "min_listed": "5m"},
        windows=[{"cron": "0 0 * * *", "duration": "24h"}],
    )
    listed_at: list[float] = []
    for _ in range(2):
        await rig.until_state(PoolState.LISTED, limit=1800, step=2)
        listed_at.append(clock.monotonic())
        await asyncio.wait_for(chat(rig), 5)  # held, unlisted, released, served
        assert rig.state is PoolState.LOCAL
    # The local hold kept the second listing at least 5 min after the first reclaim.
    assert listed_at[1] - listed_at[0] >= 300
    await rig.run_for(3600, step=10)
    assert rig.state is not PoolState.LISTED
    assert "2 listings in the last 24h" in rig.daemon.scheduler.last_reason
    assert len(fake_vast.calls(method="PUT")) == 2


# -- the API, pause, resume, stop -------------------------------------------------------------


async def test_status_api_and_token_protected_controls(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    rig = await make_rig()
    await listed(rig)
    async with aiohttp.ClientSession() as session:
        async with session.get(rig.api_url + "/api/status") as response:
            status = await response.json()
        pool = status["pools"][0]
        assert pool["state"] == "LISTED" and pool["gpus"] == [0, 1]
        assert pool["listed_until"] == rig.offer.end_date.isoformat()
        assert pool["locked_until"] is None
        assert {g["uuid"] for g in status["gpus"]} == {"GPU-rig-0", "GPU-rig-1"}
        assert status["services"][0]["reachable"] is True
        assert status["provider"] == status["provider"] | {"kind": "vast", "listed": True}

        async with session.post(rig.api_url + "/api/pause") as response:
            assert response.status == 401
        bad = {"Authorization": "Bearer wrong"}
        async with session.post(rig.api_url + "/api/pause", headers=bad) as response:
            assert response.status == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        async with session.post(rig.api_url + "/api/pause", headers=good) as response:
            assert response.status == 200
        await rig.until_state(PoolState.PAUSED, limit=30)
        assert not rig.offer.listed
        await rig.run_for(600, step=10)
        assert rig.state is PoolState.PAUSED

        async with session.post(rig.api_url + "/api/resume", headers=good) as response:
            assert response.status == 200
        await rig.until_state(PoolState.LISTED, limit=1200, step=2)


async def test_clean_stop_withdraws_the_offer_and_closes_the_ledger(
    make_rig: RigFactory, fake_ollama: FakeOllama
) -> None:
    rig = await make_rig()
    await listed(rig)
    ledger = rig.daemon.ledger
    assert ledger is not None
    await rig.aclose()
    assert not rig.offer.listed
    kinds = [k for k in await _journal_after_close(rig) if k[0] == "unlist"]
    assert kinds == [("unlist", "done")]


async def _journal_after_close(rig: Rig) -> list[tuple[str, str]]:
    from broker.ledger import open_ledger

    ledger = await open_ledger(rig.config.broker, host="rig")
    try:
        entries = await ledger.journal_entries()
        open_intervals = [
            i
            for i in await ledger.state_intervals(
                rig.clock.now() - timedelta(days=1), rig.clock.now() + timedelta(days=1)
            )
            if i.end is None
        ]
        assert open_intervals == [], "a clean stop closes every state interval"
        return [(e.kind, e.status) for e in entries]
    finally:
        await ledger.close()


# -- the invariants, one by one where the stories above do not already break them ----------


async def test_never_listed_while_a_local_process_still_holds_a_gpu(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    """Invariant 2: the API drain succeeds (Ollama says nothing is loaded), yet NVML still
    shows the local runner on GPU 1: the drain is not verified, so nothing is listed."""
    runner = {"pid": 4242, "name": "ollama", "memory_mb": 400}  # under idle_memory_mb
    rig = await make_rig(
        gpus={
            "allowed_processes": ["ollama"],  # idle with its runner resident ...
            "fake": [
                {"uuid": "GPU-rig-0"},
                {"uuid": "GPU-rig-1", "timeline": [{"at": "0s", "processes": [runner]}]},
            ],
        },
    )
    await rig.until(lambda: "drain" in rig.daemon.scheduler.last_reason, limit=600)
    await rig.run_for(600, step=5)  # ... but a drain must leave no local process at all
    assert not fake_vast.calls(method="PUT"), "never listed"
    assert rig.state is not PoolState.LISTED
    kinds = await journal_kinds(rig)
    assert ("drain", "failed") in kinds
    assert rig.daemon.ledger is not None
    failed = [e for e in await rig.daemon.ledger.journal_entries(kinds=["drain"])
              if e.status == "failed"]  # fmt: skip
    assert failed and "process 4242 (ollama) still holds it" in (failed[0].outcome or "")


async def test_no_listing_shorter_than_min_listed(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    """Invariant 6: a window closing in 8 minutes cannot take a 10 minute minimum listing."""
    rig = await make_rig(
        windows=[{"cron": "0 12 * * *", "duration": "10m"}], policy={"min_listed": "10m"}
    )
    await rig.run_for(900, step=5)
    assert not fake_vast.calls(method="PUT")
    assert rig.state is PoolState.LOCAL


async def test_earnings_sync_is_idempotent(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    """Invariant 5: the hourly sync (and a restart's) writes each provider day once."""
    rig = await make_rig(windows=[{"cron": "0 12 * * *", "duration": "30m"}])
    await listed(rig)
    fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
    await rig.until_state(PoolState.LOCAL, limit=3600, step=10)  # the window ends it
    scheduler = rig.daemon.scheduler
    ledger = rig.daemon.ledger
    assert ledger is not None
    await scheduler.sync_earnings()
    first = await ledger.earnings(clock.now().date(), clock.now().date())
    assert len(first) == 1 and first[0].amount > 0 and first[0].source == "provider"
    assert await scheduler.sync_earnings() == 0, "nothing changed, nothing written"
    again = await ledger.earnings(clock.now().date(), clock.now().date())
    assert again == first
