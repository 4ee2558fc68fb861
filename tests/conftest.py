from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import pytest

from broker.clock import FakeClock
from broker.runtime import loop_factory

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))


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
