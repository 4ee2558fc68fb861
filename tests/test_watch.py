"""The poller every watcher is built on: interval on the injected clock, failures logged once
(and the recovery once), reads that began before an action or a newer read dropped."""

from __future__ import annotations

import asyncio
import logging

import pytest

from broker.clock import FakeClock
from broker.scheduling.watch import Poller


async def test_failures_are_logged_once_and_the_recovery_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    answers: list[object] = [RuntimeError("down"), RuntimeError("down"), {"a": 1}]

    async def fetch(urgent: bool) -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    updates: list[bool | None] = []
    poller: Poller[object] = Poller("thing", fetch, clock, lambda: 5.0)
    poller._on_update = lambda: updates.append(poller.ok)
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(poller.run())
        await clock.advance(0)
        assert poller.ok is False and poller.latest is None
        await clock.advance(5)
        await clock.advance(5)
        assert poller.ok is True and poller.latest == {"a": 1}
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "broker.scheduling.watch"]
    assert len([m for m in lines if "read failed" in m]) == 1
    assert len([m for m in lines if "again" in m]) == 1
    assert updates == [False, False, True]


async def test_a_read_begun_before_an_action_or_a_newer_read_is_dropped(clock: FakeClock) -> None:
    release = asyncio.Event()
    values = iter(["slow-old", "fresh"])

    async def fetch(urgent: bool) -> str:
        value = next(values)
        if value == "slow-old":
            await release.wait()  # a read that stalls
        return value

    poller: Poller[str] = Poller("market", fetch, clock, lambda: 10.0)
    stalled = asyncio.create_task(poller.read_now())
    await asyncio.sleep(0)
    read, started = poller.begin()  # an action (an unlist) begins after the stalled read
    poller.set_floor(read)
    poller.offer("read-back", started, read)
    assert await poller.read_now(urgent=True) == "fresh"
    release.set()
    assert await stalled == "slow-old"  # returned to its caller, not kept
    assert poller.latest == "fresh"
    assert poller.snapshot is not None and poller.snapshot.read == 3
