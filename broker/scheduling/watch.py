"""One poller for everything the scheduler watches (marketplace, services, earnings).

Modelled on Home Assistant's DataUpdateCoordinator: a task fetches on its interval and keeps
the latest snapshot with the time its read *started* (a read that began before an action
cannot vouch for the state after it). The decision loop reads `latest` and never waits on a
fetch. A failure is logged once, and the recovery once, not every poll. `request_refresh()`
asks for a read now without waiting for it; `read_now()` does one and returns it (the urgent
read-back of a reclaim). Reads may overlap (an urgent one beside a stalled background one):
a result older than the snapshot already held is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from broker.clock import Clock

log = logging.getLogger(__name__)

T = TypeVar("T")

Fetch = Callable[[bool], Awaitable[T]]  # fetch(urgent) -> snapshot


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    value: T
    started: float  # monotonic time the read began
    read: int  # the read's number, in start order (1-based)


class Poller(Generic[T]):
    def __init__(
        self,
        name: str,
        fetch: Fetch[T],
        clock: Clock,
        interval: Callable[[], float],
        *,
        on_update: Callable[[], None] | None = None,
        describe: Callable[[BaseException], str] | None = None,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._clock = clock
        self._interval = interval
        self._on_update = on_update
        self._describe = describe or (lambda err: f"{type(err).__name__}: {err}")
        self.snapshot: Snapshot[T] | None = None
        self.ok: bool | None = None  # the newest finished read succeeded (None: none yet)
        self.error: str | None = None
        self.reads_started = 0
        self._newest_done = 0  # number of the newest read that finished, either way
        self.floor = 0  # reads numbered below this began before an action: dropped
        self._last_start: float | None = None
        self._kick = asyncio.Event()
        self._retime = asyncio.Event()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def latest(self) -> T | None:
        return self.snapshot.value if self.snapshot is not None else None

    @property
    def fetching(self) -> bool:
        return self._in_flight > 0

    def request_refresh(self, *, urgent: bool = False) -> None:
        """Read now, in the background; the loop is woken by the result."""
        self.spawn(self.read_now(urgent=urgent), f"{self.name}-refresh")

    def spawn(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        """Run `coro` beside the poller (cancelled with it; counted as a read in flight)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def refreshing(self) -> bool:
        return bool(self._tasks)

    def schedule_soon(self) -> None:
        """Let the background task read at once instead of at its next interval."""
        self._kick.set()

    def retime(self) -> None:
        """The interval may have changed (the pool's state did): work the next read out
        again."""
        self._retime.set()

    def offer(self, value: T, started: float, read: int) -> None:
        """A snapshot read elsewhere (an unlist's read-back), numbered with `begin()`."""
        self._store(read, started, value)

    def set_floor(self, read: int) -> None:
        """Reads begun before `read` (numbered with `begin()`) cannot vouch for the state
        after an action taken since: drop them when they finish."""
        self.floor = max(self.floor, read)

    def begin(self) -> tuple[int, float]:
        """Number a read about to start (for `offer`)."""
        self.reads_started += 1
        return self.reads_started, self._clock.monotonic()

    async def read_now(self, *, urgent: bool = False) -> T | None:
        """One read; the value (also kept when it is the newest), None when it failed."""
        read, started = self.begin()
        self._last_start = started
        self._in_flight += 1
        try:
            value = await self._fetch(urgent)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # any failure of a watched thing is "unknown", never fatal
            self._failed(read, err)
            return None
        finally:
            self._in_flight -= 1
        self._store(read, started, value)
        return value

    def _store(self, read: int, started: float, value: T) -> None:
        if read < self.floor or (self.snapshot is not None and read < self.snapshot.read):
            return  # an older read finishing late: what is held is newer
        self.snapshot = Snapshot(value, started, read)
        if read >= self._newest_done:
            self._newest_done = read
            if self.ok is False:
                log.info("%s: read again after a failure", self.name)
            self.ok, self.error = True, None
        self._tell()

    def _failed(self, read: int, err: BaseException) -> None:
        if read < self._newest_done or read < self.floor:
            return  # a newer read already told, or it began before an action
        self._newest_done = read
        text = self._describe(err)
        if self.ok is not False:
            log.warning("%s: read failed (logged once until it recovers): %s", self.name, text)
        self.ok, self.error = False, text
        self._tell()

    def _tell(self) -> None:
        if self._on_update is not None:
            self._on_update()

    async def run(self) -> None:
        """Read every interval (or at once when kicked) until cancelled."""
        while True:
            while self._last_start is not None and not self._kick.is_set():
                due = self._last_start + max(0.0, self._interval())
                if self._clock.monotonic() >= due:
                    break
                self._retime.clear()
                await self._wait(due)
            self._kick.clear()
            await self.read_now()

    async def _wait(self, due: float) -> None:
        timer = asyncio.ensure_future(self._clock.sleep_until(due))
        kicked = asyncio.ensure_future(self._kick.wait())
        retimed = asyncio.ensure_future(self._retime.wait())
        try:
            await asyncio.wait((timer, kicked, retimed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            kicked.cancel()
            retimed.cancel()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
