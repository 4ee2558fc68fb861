"""The demo tells the truth: the paper market's renters put load on the fake GPUs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fakes.rig import RigFactory

from broker.clock import FakeClock
from broker.config import FakeGpu, PaperProvider
from broker.gpu.fake import FakeBackend
from broker.providers.paper import PaperMarket
from broker.scheduling.pool import PoolState

H = timedelta(hours=1)


async def test_a_paper_renter_loads_every_gpu_it_holds_and_the_energy_stays_exact(
    clock: FakeClock,
) -> None:
    backend = FakeBackend([FakeGpu(idle_watts=20, load_watts=300)] * 2, clock)
    await backend.start()
    config = PaperProvider.model_validate(
        {"kind": "paper", "arrivals_per_hour": 30.0, "interruptible_share": 0.0,
         "mean_rental": "30m", "seed": 3}
    )  # fmt: skip
    market = PaperMarket(config, clock, gpu_count=2)
    market.on_renter_load = backend.renter_load  # as the daemon wires them
    await market.list(market.make_offer(clock.now() + 4 * H))
    for sample in await backend.sample():
        assert (sample.utilization_pct, sample.power_w) == (0.0, 20.0)
    # poll the market every 10 minutes until a renter is on the machine
    while not (await market.status()).rentals.total:
        await clock.advance(600)
    [contract] = market.book.active()
    assert contract.gpus == 2 and contract.start < clock.now()  # arrived between two polls
    samples = await backend.sample()
    assert [(s.utilization_pct, s.power_w, s.pstate) for s in samples] == [(100.0, 300.0, 0)] * 2
    assert backend.renter_loaded() == frozenset({0, 1})
    await market.unlist()  # no next renter; this one stays to the end of its stay
    await clock.advance(contract.stops_at - clock.now() + timedelta(minutes=5))
    await market.status()  # the renter left 5 minutes ago: learnt now, ended then
    assert [(s.utilization_pct, s.power_w) for s in await backend.sample()] == [(0.0, 20.0)] * 2
    assert backend.renter_loaded() == frozenset()
    # The load ran from the renter's arrival to its departure, though the market learnt of
    # each only at the next poll (no sample was taken in between to contradict it).
    total = backend.elapsed()
    loaded_from = total - (clock.now() - contract.start).total_seconds()
    loaded_to = total - (clock.now() - contract.stops_at).total_seconds()
    assert 0 < loaded_from < loaded_to < total
    rented = loaded_to - loaded_from
    for index in (0, 1):
        expected = 300.0 * rented + 20.0 * (total - rented)
        assert backend.true_energy_j(index) == pytest.approx(expected, abs=1e-6)
        [sample] = [s for s in await backend.sample() if s.index == index]
        assert sample.energy_mj is not None
        assert abs(sample.energy_mj / 1000.0 - expected) < 0.01


async def test_in_the_daemon_a_paper_rental_puts_load_watts_on_the_gpus(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(
        paper=True,
        provider={"arrivals_per_hour": 60, "interruptible_share": 0, "mean_rental": "10h"},
    )
    await rig.until_state(PoolState.LISTED, limit=600)
    await rig.until_state(PoolState.RENTED, limit=3600, step=10)
    await rig.run_for(5)
    gpus = rig.daemon.status()["gpus"]
    assert [(g["utilization_pct"], g["power_w"]) for g in gpus] == [(100.0, 350.0)] * 2
    assert rig.state is PoolState.RENTED  # renter load is not taken for local use
