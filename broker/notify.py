"""Notifications (`[[notify]]`): what the broker did, sent through apprise.

apprise speaks ntfy, Telegram, Discord, Slack, Matrix, e-mail and about a hundred more
from one URL each, so the broker carries no client per service. Each channel has its own
task and queue: the scheduler's hooks only put a line in the queues (no I/O on the decision
loop), apprise's blocking send runs in a worker thread, a channel sends at most one message
per `min_interval` (what happens meanwhile goes out together after it), and a failing
channel is logged once, then once more when it works again.

Events: `listed`, `rented`, `reclaim` (a reclaim began), `back` (the GPUs are local again),
`refused` (a local request was answered 503 or in-band), `degraded` (the marketplace cannot
be read), and `earnings`, one line a day at `daily_at` with yesterday's figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING

from broker.clock import Clock
from broker.config import Config, NotifyEvent, NotifySection
from broker.errors import SecretError
from broker.scheduling.pool import PoolState
from broker.scheduling.status import SchedulerHooks
from broker.scheduling.windows import to_instant

if TYPE_CHECKING:
    from broker.report import Report

log = logging.getLogger(__name__)

MAX_PENDING = 20  # lines kept while a channel waits; older ones are counted, not sent
TITLE = "gpu-broker"

Sender = Callable[[str, str, str], Awaitable[bool]]  # (url, title, body) -> delivered
ReportSource = Callable[[datetime, datetime], Awaitable["Report"]]


async def apprise_send(url: str, title: str, body: str) -> bool:
    """Send one message through apprise, off the event loop (its calls block)."""

    def send() -> bool:
        import apprise  # imported here: only a broker with [[notify]] pays for it

        sink = apprise.Apprise()
        if not sink.add(url):
            raise ValueError("apprise does not understand this URL")
        return bool(sink.notify(title=title, body=body))

    return await asyncio.to_thread(send)


def url_problem(url: str) -> str | None:
    """Why apprise cannot use `url` (None: it can). Sends nothing; the URL is not shown,
    as it may hold a token."""
    import apprise

    if apprise.Apprise().add(url):
        return None
    scheme = url.split("://", 1)[0]
    return f"apprise does not understand this {scheme}:// URL (see its wiki for the form)"


def _event_of(state: PoolState, before: PoolState) -> NotifyEvent | None:
    if state is PoolState.LISTED and before is not PoolState.RENTED:
        return "listed"
    if state is PoolState.RENTED:
        return "rented"
    if state is PoolState.RECLAIMING:
        return "reclaim"
    if state is PoolState.DEGRADED:
        return "degraded"
    if state in (PoolState.LOCAL, PoolState.IDLE, PoolState.PAUSED) and before in (
        PoolState.RENTED, PoolState.RECLAIMING, PoolState.LISTED,
    ):  # fmt: skip
        return "back"
    return None


_LABELS: dict[NotifyEvent, str] = {
    "listed": "Listed on the marketplace",
    "rented": "Rented",
    "reclaim": "Reclaim asked",
    "back": "GPUs back for local use",
    "refused": "Local request refused",
    "degraded": "Degraded",
    "earnings": "Earnings",
}


class Channel:
    """One [[notify]] entry: its queue, its sending task, its once-only failure log."""

    def __init__(self, index: int, section: NotifySection, clock: Clock, send: Sender) -> None:
        self.key = f"notify[{index}]"
        self.section = section
        self.events = set(section.events)
        self._clock = clock
        self._send = send
        self._pending: deque[str] = deque()
        self._dropped = 0
        self._wake = asyncio.Event()
        self._failing = False
        self.sent = 0  # messages delivered (for tests and status)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.key}-sender")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def put(self, event: NotifyEvent, line: str) -> None:
        if event not in self.events:
            return
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self._dropped += 1
        self._pending.append(line)
        self._wake.set()

    async def _run(self) -> None:
        interval = self.section.min_interval.total_seconds()
        while True:
            await self._wake.wait()
            self._wake.clear()
            lines = list(self._pending)
            self._pending.clear()
            if self._dropped:
                lines.insert(0, f"({self._dropped} earlier message(s) left out)")
                self._dropped = 0
            if not lines:
                continue
            await self._deliver("\n".join(lines))
            if interval > 0:
                await self._clock.sleep(interval)  # what comes meanwhile waits, together

    async def _deliver(self, body: str) -> None:
        try:
            url = self.section.resolved_url()
            delivered = await self._send(url, TITLE, body)
            why = "" if delivered else "the service did not accept the message"
        except SecretError as err:
            delivered, why = False, "; ".join(err.problems)
        except Exception as err:  # apprise plugins raise what they like
            delivered, why = False, f"{type(err).__name__}: {err}"
        if delivered:
            self.sent += 1
            if self._failing:
                log.info("%s: sending works again", self.key)
                self._failing = False
            return
        if not self._failing:  # once, not once per message
            log.warning("%s: cannot send notifications: %s", self.key, why)
            self._failing = True


class Notifier(SchedulerHooks):
    """Scheduler hooks that turn events into lines for the channels, plus the daily line."""

    def __init__(
        self,
        config: Config,
        clock: Clock,
        *,
        send: Sender = apprise_send,
        report: ReportSource | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._report = report
        self.channels = [Channel(i, s, clock, send) for i, s in enumerate(config.notify)]
        self._daily: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for channel in self.channels:
            channel.start()
            if self._report is not None and "earnings" in channel.events:
                self._daily.append(asyncio.create_task(
                    self._daily_lines(channel), name=f"{channel.key}-daily"))  # fmt: skip

    async def aclose(self) -> None:
        for task in self._daily:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._daily = []
        for channel in self.channels:
            await channel.aclose()

    def _line(self, event: NotifyEvent, text: str) -> str:
        when = self._clock.now().astimezone(self._config.broker.tz).strftime("%H:%M")
        return f"{when} {_LABELS[event]}: {text}"

    def _put(self, event: NotifyEvent, text: str) -> None:
        line = self._line(event, text)
        for channel in self.channels:
            channel.put(event, line)

    # ---- hooks (inline on the loop: a queue append, nothing more)
    def state_changed(self, state: PoolState, before: PoolState, reason: str) -> None:
        event = _event_of(state, before)
        if event is not None:
            self._put(event, reason)

    def request_event(self, event: str, service: str) -> None:
        if event == "rejected":
            self._put("refused", f"a request to {service} was refused: the GPUs are rented")

    # ---- the daily earnings line
    async def _daily_lines(self, channel: Channel) -> None:
        tz = self._config.broker.tz
        hour, minute = (int(x) for x in channel.section.daily_at.split(":"))
        while True:
            now = self._clock.now()
            today = now.astimezone(tz).date()
            at = to_instant(datetime.combine(today, time(hour, minute)), tz)
            if at <= now:
                at = to_instant(datetime.combine(today + timedelta(days=1), time(hour, minute)), tz)
            await self._clock.sleep((at - now).total_seconds())
            try:
                channel.put("earnings", self._line("earnings", await self.earnings_line()))
            except Exception as err:  # a report that fails must not end the daily line
                log.warning("notify: cannot build the daily earnings line: %s", err)

    async def earnings_line(self) -> str:
        """Yesterday's figures (local day) from the report."""
        assert self._report is not None
        tz = self._config.broker.tz
        today = self._clock.now().astimezone(tz).date()
        start = to_instant(datetime.combine(today - timedelta(days=1), time()), tz)
        end = to_instant(datetime.combine(today, time()), tz)
        report = await self._report(start, end)
        t = report.totals
        cur = report.currency
        mark = "~" if t.earnings_source == "estimate" and t.earnings else ""
        # Cents of a quiet day still show: two significant digits for the smallest amount.
        small = min((abs(v) for v in (t.earnings, t.energy_cost, t.net) if abs(v) >= 1e-9),
                    default=1.0)  # fmt: skip
        d = max(2, min(5, 1 - math.floor(math.log10(small))))
        return (
            f"{(today - timedelta(days=1)).isoformat()}: earned {mark}{t.earnings:.{d}f} {cur}, "
            f"energy cost {t.energy_cost:.{d}f} {cur}, net {t.net:.{d}f} {cur}; "
            f"{t.rented_gpu_hours:.1f} GPU-h rented"
        )
