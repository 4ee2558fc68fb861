"""The replay decides what the live service decides: a day of local requests and renters
through the whole daemon (tests/fakes/rig.py: the real loop, gate and ledger, the fake
Vast, the injected clock), then the same day through `broker.simulation`; the pool goes
through the same transitions at the same times.

The live loop steps every `sample_interval` (5 s here) and reads the marketplace every
`poll_interval` (10 s), on its own phase; the replay steps at the event itself. A
transition may come a few ticks and a poll apart (a late tick carries into the next timer),
never more; the sequence must be identical.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import ollama
from fakes.rig import Rig, RigFactory, chat
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.config import BrokerSection
from broker.ledger import open_ledger
from broker.ledger.base import DemandRecord
from broker.providers import RentalKind
from broker.scheduling.pool import PoolState
from broker.simulation.inputs import Renter, Request
from broker.simulation.replay import Timings, replay

# (minutes after the start, ...) The rig starts at 12:00 UTC; windows 12:00-18:00 and
# 22:00-06:00; max_commitment 1h, idle_window 2m, local_hold 5m, min_listed 10m.
REQUESTS = [125, 240, 650, 900, 1000]
RENTERS = [  # (minute, hours it stays, min offer hours)
    (30, 1.5, 0.5),
    (200, 0.5, 0.9),  # wants more than the sawtooth leaves: goes elsewhere
    (230, 0.25, 0.2),
    (620, 8.0, 0.5),  # stays through the night until the 03:20 request
    (960, 1.0, 0.5),
]
SPAN_S = 24 * 3600
TICK = 5.0
# The loop's ticks (5 s), its marketplace poll (10 s) and the drain's check by the next
# samples add up along a chain of timers (idle -> drain -> list); every timer in the story
# is 2 minutes or more, so an error in one would still show.
TOLERANCE_S = 30.0


def _windows() -> list[dict[str, Any]]:
    return [{"cron": "0 12 * * *", "duration": "6h"}, {"cron": "0 22 * * *", "duration": "8h"}]


async def _live_day(
    rig: Rig, clock: FakeClock, vast: FakeVast, expected: list[float]
) -> list[tuple[float, PoolState]]:
    """Play the day into the live daemon; `expected` (the replay's transition times) only
    says where to step second by second, the rest goes a minute at a time."""
    t0 = clock.monotonic()
    seen: list[tuple[float, PoolState]] = []
    machine = rig.daemon.scheduler.machine
    original = machine.step

    def step(obs: Any) -> Any:
        decision = original(obs)
        if decision.changed:
            seen.append((clock.monotonic() - t0, decision.state))
        return decision

    machine.step = step  # type: ignore[method-assign]
    control = rig.daemon.gates[0].control
    requests = [m * 60.0 for m in REQUESTS]
    renters = [(m * 60.0, h, o) for m, h, o in RENTERS]
    zones = sorted(
        [(m - 2, m + 20) for m in [*requests, *(r[0] for r in renters)]]
        + [(x - 3, x + 12) for x in expected]
    )
    tasks: list[asyncio.Task[Any]] = []

    async def ask() -> None:
        """A user: refused with 503, they come back at the time it named."""
        while True:
            try:
                await chat(rig)
                return
            except ollama.ResponseError:
                assert control.refused_until is not None
                await clock.sleep((control.refused_until - clock.now()).total_seconds())

    while (elapsed := clock.monotonic() - t0) < SPAN_S:
        while requests and requests[0] <= elapsed:
            requests.pop(0)
            tasks.append(asyncio.create_task(ask()))
        while renters and renters[0][0] <= elapsed:
            _, hours, min_offer = renters.pop(0)
            book = vast.machine().book
            offer = book.offer
            left = (offer.end_date - clock.now()).total_seconds() if offer.end_date else 0.0
            if offer.listed and not book.running() and left >= min_offer * 3600:
                leaves = clock.now() + timedelta(hours=hours)
                vast.add_rental(RentalKind.ON_DEMAND, gpus=2, leaves_at=leaves)
        await rig.settle()
        if any(a <= elapsed < b for a, b in zones):
            await clock.advance(TICK)
            continue
        ahead = [a - elapsed for a, _ in zones if a > elapsed]
        await clock.advance(max(1.0, min(300.0, ahead[0] if ahead else 300.0)))
    await rig.settle()
    for task in tasks:
        task.cancel()
    return seen


def _replayed(rig: Rig, start: datetime) -> tuple[list[tuple[float, PoolState]], list[float]]:
    config = rig.config
    at = start.timestamp()
    demand = [Request(at + m * 60.0, 0.0) for m in REQUESTS]
    renters = [
        Renter(at + m * 60.0, 2, hours, "on-demand", 10.0, min_offer)
        for m, hours, min_offer in RENTERS
    ]
    # The rig's fake GPUs show no load for a request (no keep_alive to wait out), nor for a
    # renter (the rental is seen at a poll).
    timings = Timings(
        keep_alive_s=0.0,
        debounce_s=0.0,
        drain_s=TICK,  # unload, then the next samples verify
        poll_s=config.provider.poll_interval.total_seconds(),
        max_hold_s=30.0,
        sample_s=config.broker.sample_interval.total_seconds(),
        renter_load=False,
    )
    sim = replay(
        config, config.policy, demand, renters, start, start + timedelta(seconds=SPAN_S),
        timings=timings, record=True,
    )  # fmt: skip
    offers = [t.timestamp() - at for t, _ in sim.actions]
    return [(t.at.timestamp() - at, t.state) for t in sim.transitions], offers


def _settled(moves: list[tuple[float, PoolState]]) -> list[tuple[float, PoolState]]:
    """Without a RECLAIMING that lasts no time: when an offer lapses at the window's end,
    the live loop either reads the lapse first (LISTED -> LOCAL) or unlists at the tick of
    the window's end (LISTED -> RECLAIMING -> LOCAL at once), whichever its poll and tick
    order give; both give the GPUs back at the same time."""
    out: list[tuple[float, PoolState]] = []
    for k, (t, state) in enumerate(moves):
        after = moves[k + 1] if k + 1 < len(moves) else None
        if state is PoolState.RECLAIMING and after is not None and (
            after[1] is PoolState.LOCAL and after[0] - t <= TICK
        ):
            continue
        out.append((t, state))
    return out


async def test_a_replayed_day_takes_the_live_services_decisions(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    # The loop ticks every 5 s (not 1 s) so that a day of it takes seconds, not a minute.
    rig = await make_rig(
        windows=_windows(), policy={"max_cycles_per_day": 6}, broker={"sample_interval": "5s"}
    )
    start = clock.now()
    replayed, offers = _replayed(rig, start)
    live = await _live_day(rig, clock, fake_vast, [t for t, _ in replayed] + offers)
    # the day was eventful: rented, reclaimed for a request, listed several times
    states = {s for _, s in live}
    assert {PoolState.RENTED, PoolState.RECLAIMING, PoolState.LISTED} <= states
    live, replayed = _settled(live), _settled(replayed)
    assert [s for _, s in live] == [s for _, s in replayed], (live, replayed)
    for (t_live, state), (t_sim, _) in zip(live, replayed, strict=True):
        assert abs(t_live - t_sim) <= TOLERANCE_S, (state, t_live, t_sim, live, replayed)
    assert PoolState.RECLAIMING in {s for _, s in live}  # the refusals' reclaims stay


async def test_the_live_service_learns_the_weekly_rhythm_from_the_ledger(
    make_rig: RigFactory, clock: FakeClock, tmp_path: Path
) -> None:
    # Two weeks of the team coming at 12:20 every day, recorded before this start (12:00).
    now = clock.now()
    state = tmp_path / "state"
    ledger = await open_ledger(BrokerSection(state_dir=state, timezone="UTC"), host="rig")
    try:
        await ledger.add_demand(
            [
                DemandRecord("ollama", now - timedelta(days=d) + timedelta(minutes=20), 4.0,
                             "passed")
                for d in range(1, 15)
            ]
        )  # fmt: skip
    finally:
        await ledger.close()
    rig = await make_rig(policy={"demand_risk": 0.1})
    rhythm = rig.daemon.scheduler.loop.rhythm
    assert sum(rhythm.visits) == 14
    await rig.run_for(600, step=5)
    # the 12:00-13:00 hour is the team's: not listed, and the reason says why
    assert rig.state is PoolState.LOCAL
    assert "weekly rhythm" in rig.daemon.scheduler.loop.last_reason
    # once what is left of that hour is under the risk (about a visit an hour: its last
    # five or six minutes), it lists, an offer spanning the rest and the quiet hours after
    await rig.until_state(PoolState.LISTED, limit=3600, step=5)
    assert now.replace(minute=50) <= clock.now() < now.replace(hour=13)
