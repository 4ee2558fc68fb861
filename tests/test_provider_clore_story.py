"""The whole broker on Clore.ai (tests/fakes/rig.py with the fake Clore.ai), on the
injected clock: idle -> rentable -> rented -> a local request refused with the order's
latest end -> hidden -> the order ends -> served. And a max_commitment below Clore's
shortest rental: never listed."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import ollama
import pytest
from fakes.clore import KEY, FakeClore
from fakes.rig import RigFactory, chat, journal_kinds, listed

from broker.clock import FakeClock
from broker.scheduling.pool import PoolState

SETTINGS = "/v1/set_server_settings"


@pytest.fixture
async def clore(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeClore]:
    monkeypatch.setenv("RIG_CLORE_KEY", KEY)
    server = FakeClore(clock, servers={"rig": 2})
    await server.start()
    yield server
    await server.close()


def on_clore(fake: FakeClore, commitment: str) -> dict[str, Any]:
    return {
        "paper": True,  # no Vast: the provider section is given whole
        "provider": {"kind": "clore", "server_name": "rig", "base_url": fake.url,
                     "api_key_env": "RIG_CLORE_KEY", "price_on_demand": 0.0002,
                     "request_timeout": "2s", "retry_attempts": 3},
        # Clore's shortest rental is 6 h: a 12 h window, and offers of up to 8 h.
        "windows": [{"cron": "0 12 * * *", "duration": "12h"}],
        "policy": {"max_commitment": commitment, "min_listed": "6h"},
    }  # fmt: skip


async def test_a_clore_rental_is_respected_and_the_gpus_come_back_at_its_end(
    make_rig: RigFactory, clock: FakeClock, clore: FakeClore
) -> None:
    rig = await make_rig(**on_clore(clore, "8h"))
    await listed(rig)
    server = clore.server()
    assert server.visibility == "public" and server.mrl == 8
    order = clore.rent(hours=1)  # a renter may take less than mrl
    await rig.until_state(PoolState.RENTED, limit=60)

    # The team asks: the order holds the GPUs for an hour, so the request is refused at
    # once, with the order's latest end, and the server is hidden from new renters.
    with pytest.raises(ollama.ResponseError) as raised:
        await asyncio.wait_for(chat(rig), 5)
    assert raised.value.status_code == 503
    stamp = re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", raised.value.error)
    assert stamp is not None, raised.value.error
    promised = datetime.fromisoformat(stamp.group())
    assert order.end <= promised < order.end + timedelta(seconds=1)
    await rig.until(lambda: server.visibility == "hidden", limit=10, step=0.5)
    assert rig.state is PoolState.RECLAIMING
    assert order.active, "hiding the server ends no order"

    # Nothing ends the order early: it runs out its hour, and then the team is served.
    await rig.until(lambda: not order.active, limit=2 * 3600, step=60)
    await rig.until_state(PoolState.LOCAL, limit=120)
    answer = await asyncio.wait_for(chat(rig), 5)
    assert answer.message.content
    assert server.visibility == "hidden"
    kinds = [k for k, _ in await journal_kinds(rig)]
    assert kinds.count("list") == 1 and "unlist" in kinds
    assert clore.rate_limited == 0, "every request waited its turn"


async def test_a_commitment_below_clores_shortest_rental_is_never_listed(
    make_rig: RigFactory, clock: FakeClock, clore: FakeClore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        rig = await make_rig(**on_clore(clore, "2h"))
    assert any("will not list on Clore.ai" in r.getMessage() for r in caplog.records)
    await rig.run_for(1800, step=10)  # idle_window is 2 min: a listing would be long up
    assert rig.state is PoolState.IDLE
    assert not clore.calls(SETTINGS), "never listed"
    assert clore.server().visibility == "hidden"
    kinds = [k for k, _ in await journal_kinds(rig)]
    assert "list" not in kinds and "drain" not in kinds
    answer = await asyncio.wait_for(chat(rig), 5)
    assert answer.message.content
