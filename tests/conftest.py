from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fakes.ollama import FakeOllama
from fakes.postgres import PgServer, find_bindir, running_server
from fakes.rig import TOKEN, VAST_KEY, Rig, RigFactory, rig_config
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.runtime import loop_factory

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))


# -- a whole broker (tests/fakes/rig.py), for the end-to-end, metrics and dashboard tests ---


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as server:
        server.loaded["llama3.2:1b"] = 1
        yield server


@pytest.fixture
async def fake_vast(clock: FakeClock) -> AsyncIterator[FakeVast]:
    server = FakeVast(clock, machines={4242: 2}, api_keys={VAST_KEY})
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def make_rig(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RigFactory]:
    """`await make_rig(**rig_config overrides, paper=False)`: a started Rig, closed after."""
    monkeypatch.setenv("RIG_VAST_KEY", VAST_KEY)
    monkeypatch.setenv("RIG_API_TOKEN", TOKEN)
    rigs: list[Rig] = []

    async def make(**overrides: Any) -> Rig:
        paper = overrides.pop("paper", False)
        config = rig_config(
            tmp_path / "state",
            ollama_url=fake_ollama.url,
            vast_url=None if paper else fake_vast.url,
            **overrides,
        )
        rig = Rig(clock, config, fake_ollama, None if paper else fake_vast)
        rigs.append(rig)
        return await rig.start()

    yield make
    for rig in rigs:
        await rig.aclose()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    """The gate's tests run on asyncio's loop and on uvloop, which the daemon runs them on."""
    loops: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    if item.path.name.startswith("test_gate_"):
        name, factory = loop_factory("auto")
        if name == "uvloop":
            loops["uvloop"] = factory
    return loops


# -- a real PostgreSQL server (tests/fakes/postgres.py), for the ledger contract suite -----


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    with running_server() as server:
        yield server
