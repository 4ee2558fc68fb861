from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import broker
from broker.clock import FakeClock, SystemClock


async def test_fake_clock_moves_only_when_advanced(clock: FakeClock) -> None:
    start, mono = clock.now(), clock.monotonic()
    await asyncio.sleep(0)
    assert (clock.now(), clock.monotonic()) == (start, mono)
    await clock.advance(90)
    assert clock.now() - start == timedelta(seconds=90)
    assert clock.monotonic() - mono == 90


async def test_sleepers_wake_in_deadline_order(clock: FakeClock) -> None:
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    base = clock.monotonic()
    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in [("c", 30), ("a", 10), ("b", 20)]]
    await clock.advance(15)
    assert woke == [("a", base + 10)]
    await clock.advance(100)
    assert woke == [("a", base + 10), ("b", base + 20), ("c", base + 30)]
    await asyncio.gather(*tasks)


async def test_a_periodic_task_runs_once_per_period_inside_one_advance(clock: FakeClock) -> None:
    ticks: list[float] = []

    async def every_minute() -> None:
        deadline = clock.monotonic()
        while True:
            deadline += 60
            await clock.sleep_until(deadline)
            ticks.append(clock.monotonic())

    task = asyncio.create_task(every_minute())
    base = clock.monotonic()
    await clock.advance(timedelta(hours=1))
    assert ticks == [base + 60 * i for i in range(1, 61)]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_a_sleeper_is_not_swallowed(clock: FakeClock) -> None:
    task = asyncio.create_task(clock.sleep(60))
    await asyncio.sleep(0)
    assert clock.sleepers == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == 0
    await clock.advance(120)  # waking a cancelled sleeper must not raise


async def test_wall_jump_does_not_move_monotonic_time(clock: FakeClock) -> None:
    task = asyncio.create_task(clock.sleep(60))
    await asyncio.sleep(0)
    mono = clock.monotonic()
    clock.set_wall(datetime(2030, 1, 1, tzinfo=UTC))
    await asyncio.sleep(0)
    assert clock.monotonic() == mono
    assert not task.done()
    await clock.advance(60)
    assert task.done()
    assert clock.now() == datetime(2030, 1, 1, 0, 1, tzinfo=UTC)


async def test_sleep_in_the_past_returns_at_once(clock: FakeClock) -> None:
    await asyncio.wait_for(clock.sleep_until(clock.monotonic() - 5), timeout=1)
    await asyncio.wait_for(clock.sleep(0), timeout=1)


def test_fake_clock_refuses_naive_and_backwards_time() -> None:
    with pytest.raises(ValueError):
        FakeClock(datetime(2026, 1, 1))
    clock = FakeClock()
    with pytest.raises(ValueError):
        asyncio.run(clock.advance(-1))


async def test_system_clock_is_utc_and_monotonic() -> None:
    clock = SystemClock()
    assert clock.now().tzinfo is UTC
    first = clock.monotonic()
    await clock.sleep(0.001)
    assert clock.monotonic() > first
    await clock.sleep_until(clock.monotonic() - 1)  # a past deadline returns at once


# Everything below the CLI takes its time from a Clock, so tests can drive it.
_FORBIDDEN = re.compile(
    r"\btime\.(time|monotonic|sleep)\(|\bdatetime\.(now|utcnow|today)\(|\bdate\.today\(|"
    r"\basyncio\.sleep\((?!0\))"
)
_ALLOWED = {"clock.py", "cli.py"}


def test_nothing_below_the_cli_reads_the_real_clock() -> None:
    package = Path(broker.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if path.name not in _ALLOWED
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _FORBIDDEN.search(line)
    ]
    assert offenders == []
