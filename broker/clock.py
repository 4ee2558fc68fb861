"""The one source of time.

Everything below the CLI takes a `Clock` instead of calling `time.time()` or
`datetime.now()`, so tests drive schedules by advancing a `FakeClock` instead of sleeping.
Wall time (`now`) is for timestamps and calendar maths; monotonic time is for intervals and
deadlines, because the wall clock can jump (NTP, a user fixing the date).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Current wall time, timezone-aware, in UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; only differences mean anything."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep for `seconds` of monotonic time."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until `monotonic()` reaches `deadline`."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))


class FakeClock:
    """A clock that moves only when a test says so.

    `advance()` walks through the pending deadlines in order: at each one it sets the time,
    wakes the sleepers that are due and lets them run, so a task that wakes and sleeps again
    inside the advanced span is woken again at its next deadline, as under the real clock.
    """

    def __init__(self, start: datetime | None = None, monotonic_start: float = 1000.0) -> None:
        start = start or datetime(2026, 1, 1, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware start time")
        self._wall = start.astimezone(UTC)
        self._mono = monotonic_start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._mono + max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._mono:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        live = [d for d, _, f in self._sleepers if not f.done()]
        return min(live) if live else None

    async def advance(self, seconds: float | timedelta, *, settle: int = 10) -> None:
        """Move both clocks forward, waking every sleeper whose deadline passes, in order."""
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if seconds < 0:
            raise ValueError("a clock cannot go backwards; use set_wall() for wall jumps")
        target = self._mono + seconds
        await self._let_run(settle)
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline = self._sleepers[0][0]
            self._move_to(deadline)
            while self._sleepers and self._sleepers[0][0] <= deadline:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            await self._let_run(settle)
        self._move_to(target)
        await self._let_run(settle)

    def set_wall(self, when: datetime) -> None:
        """Jump the wall clock only (as NTP would); monotonic time and sleepers are untouched."""
        if when.tzinfo is None:
            raise ValueError("wall time must be timezone-aware")
        self._wall = when.astimezone(UTC)

    def _move_to(self, mono: float) -> None:
        if mono > self._mono:
            self._wall += timedelta(seconds=mono - self._mono)
            self._mono = mono

    @staticmethod
    async def _let_run(times: int) -> None:
        for _ in range(times):
            await asyncio.sleep(0)
