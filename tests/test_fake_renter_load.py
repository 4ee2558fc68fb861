"""`gpus.fake_renter_load_pct`: in a demo on simulated GPUs, a GPU the marketplace shows a
renter on works at that load (status, dashboard, energy), is counted as the renter's (the
pool stays RENTED, no reclaim), and is idle again once the renter has gone."""

from __future__ import annotations

import pytest
from fakes.rig import RigFactory, listed
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.gpu.fake import FakeBackend
from broker.providers import RentalKind
from broker.scheduling.pool import PoolState


def _gpus(rig: object) -> list[dict[str, object]]:
    return rig.daemon.status()["gpus"]  # type: ignore[attr-defined,no-any-return]


async def test_a_rented_simulated_gpu_shows_the_renters_work(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(gpus={"fake_renter_load_pct": 85})
    await listed(rig)
    assert [g["utilization_pct"] for g in _gpus(rig)] == [0, 0]
    contract = fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=1)
    await rig.until_state(PoolState.RENTED, limit=60)
    await rig.run_for(30, step=1)
    assert rig.state is PoolState.RENTED  # the renter's load is not local demand
    gpus = _gpus(rig)
    busy = [g for g in gpus if g["utilization_pct"] == 85]
    assert len(busy) == 1 and busy[0]["power_w"] > 300  # 22 W idle, 350 W at full load
    assert busy[0]["idle"] is False
    idle = [g for g in gpus if g["utilization_pct"] == 0]
    assert len(idle) == 1 and idle[0]["power_w"] == 22
    backend = rig.daemon.sampler.backend  # type: ignore[union-attr]
    assert isinstance(backend, FakeBackend)
    # The fake's ground truth drew the load's watts: 85 % of 22..350 W is 300.8 W.
    index = busy[0]["index"]
    assert isinstance(index, int)
    end = backend.elapsed()
    assert backend.true_energy_j(index, end - 10, end) == pytest.approx(3008.0)

    fake_vast.end_rental(contract.id)
    await rig.until(lambda: rig.state is not PoolState.RENTED, limit=120)
    await rig.run_for(10, step=1)
    assert [g["utilization_pct"] for g in _gpus(rig)] == [0, 0]


async def test_without_the_key_rented_simulated_gpus_stay_as_scripted(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    rig = await make_rig()
    await listed(rig)
    fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
    await rig.until_state(PoolState.RENTED, limit=60)
    await rig.run_for(10, step=1)
    assert [g["utilization_pct"] for g in _gpus(rig)] == [0, 0]
