"""End to end: reclaim = "displace-interruptible" on Vast.ai, with the whole broker in virtual
time (fake GPUs, the fake Ollama behind the real gate, the fake Vast.ai, a real ledger).

The fixtures (`make_rig`, `fake_vast`) are in tests/conftest.py.
"""

from __future__ import annotations

import asyncio

from fakes.rig import RigFactory, chat, journal_kinds
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.ledger.base import JournalEntry
from broker.providers import RentalKind
from broker.scheduling.pool import PoolState


async def test_a_local_chat_displaces_an_interruptible_renter(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(policy={"reclaim": "displace-interruptible"})
    await rig.until_state(PoolState.LISTED, limit=600)
    renter = fake_vast.add_rental(RentalKind.INTERRUPTIBLE, gpus=2, bid=0.2)
    await rig.until_state(PoolState.RENTED, limit=60)
    assert renter.end > clock.now()  # a graceful reclaim would wait for this (up to 1 h)

    request = asyncio.create_task(chat(rig))
    # Held, the renter displaced by our self-rental, the offer withdrawn, the chat served:
    # all within a few seconds, not at the contract's end.
    await rig.until(request.done, limit=10, step=0.01)
    answer = request.result()
    assert answer.message.content and answer.done
    assert not rig.offer.listed
    assert renter.active, "displaced, not ended: the renter's contract goes on"
    # The self-rental was made (displace before unlist: it rents the live offer), and it
    # stays while the displaced contract runs: ended now, the renter would resume on the
    # GPUs the team is using.
    assert len(fake_vast.self_rentals()) == 1
    assert fake_vast.calls(method="PUT")[-1].path.startswith("/api/v0/asks/")
    await rig.run_for(600, step=10)
    assert renter.paused and rig.state is PoolState.LOCAL
    assert "self-rental" in rig.daemon.scheduler.last_reason, "and nothing is listed"
    # The contract ends with the offer's end date: then the self-rental goes.
    await rig.until(lambda: fake_vast.self_rentals() == [], limit=3700, step=10)
    assert clock.now() >= renter.end
    deletes = [d.path for d in fake_vast.calls(method="DELETE")]
    assert deletes[0] == "/api/v0/machines/4242/asks/"
    assert f"/api/v0/instances/{next(iter(fake_vast.instances))}/" in deletes[1:]
    kinds = await journal_kinds(rig)
    assert ("displace", "done") in kinds and ("end_displacement", "done") in kinds
    assert kinds.index(("displace", "done")) < kinds.index(("unlist", "done"))
    assert kinds.index(("unlist", "done")) < kinds.index(("end_displacement", "done"))
    assert ("request_held", "note") in kinds
    assert not [k for k in kinds if k[1] == "intent"]


async def test_a_restart_ends_the_self_rental_the_previous_run_left(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(policy={"reclaim": "displace-interruptible"})
    await rig.until_state(PoolState.LISTED, limit=600)
    fake_vast.add_rental(RentalKind.INTERRUPTIBLE, gpus=2, bid=0.2)
    await rig.until_state(PoolState.RENTED, limit=60)
    # As if the previous run had displaced and then died before ending it.
    assert rig.daemon.ledger is not None
    await rig.daemon.ledger.journal(JournalEntry(clock.now(), "displace", "done"))
    await rig.daemon.scheduler.provider.displace_interruptible()
    assert len(fake_vast.self_rentals()) == 1
    await rig.aclose()

    again = await make_rig(policy={"reclaim": "displace-interruptible"})
    assert fake_vast.self_rentals() == []
    kinds = await journal_kinds(again)
    assert ("end_displacement", "done") in kinds


async def test_the_renter_stays_displaced_while_the_team_uses_the_gpus(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(
        policy={"reclaim": "displace-interruptible"}, services={"max_hold": "2h"}
    )
    await rig.until_state(PoolState.LISTED, limit=600)
    renter = fake_vast.add_rental(RentalKind.INTERRUPTIBLE, gpus=2, bid=0.2)
    await rig.until_state(PoolState.RENTED, limit=60)
    await chat(rig)
    await rig.run_for(30)
    assert renter.paused and rig.state is PoolState.LOCAL


async def test_the_chat_that_displaces_is_held_with_the_default_max_hold(
    make_rig: RigFactory, fake_vast: FakeVast
) -> None:
    rig = await make_rig(policy={"reclaim": "displace-interruptible"})
    await rig.until_state(PoolState.LISTED, limit=600)
    fake_vast.add_rental(RentalKind.INTERRUPTIBLE, gpus=2, bid=0.2)
    await rig.until_state(PoolState.RENTED, limit=60)
    answer = await chat(rig)
    assert answer.done
