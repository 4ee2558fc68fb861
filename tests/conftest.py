from __future__ import annotations

import asyncio
import os
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


# -- per-test timeouts (pytest-timeout) ----------------------------------------------------
# A test that waits on a socket (every async test: aiohttp servers, gates, clients) or on a
# child process fails after these many seconds, with its name, instead of hanging the run
# until CI's limit. A test that needs longer carries its own @pytest.mark.timeout(...).
# Scaled by GPU_BROKER_TEST_TIMEOUT_SCALE on a slow or crowded machine.
_SCALE = float(os.environ.get("GPU_BROKER_TEST_TIMEOUT_SCALE", "1"))
SOCKET_TIMEOUT = 30.0
PROCESS_TIMEOUT = 180.0
_PROCESS_MODULES = frozenset({
    "test_cli.py", "test_code_quality.py", "test_daemon_process.py",
    "test_dashboard_chromium.py", "test_provider_contract.py",
    "test_provider_vast_conformance.py", "test_simulate_live.py", "test_fleet_e2e.py",
    "test_fleet_ledger.py", "test_fleet_views.py", "test_ledger_contract.py",
    "test_open_webui.py", "test_daemon_e2e.py", "test_daemon_demand.py",
})  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        if item.path.name in _PROCESS_MODULES:
            item.add_marker(pytest.mark.timeout(PROCESS_TIMEOUT * _SCALE))
        elif item.get_closest_marker("asyncio") is not None:
            item.add_marker(pytest.mark.timeout(SOCKET_TIMEOUT * _SCALE))
