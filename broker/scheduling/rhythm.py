"""The team's weekly rhythm: how likely a local request is at each hour of the week.

Learned from the requests the gates saw (the ledger's demand record, then live): a *visit*
is a request that comes more than `VISIT_GAP` after the one before it (a person opening a
chat; the requests that follow belong to it). For each hour of the day, on weekdays and
at weekends apart, the rate is the visits seen in that hour over the number of times that
hour has gone by since learning began, with one imagined quiet pass as a prior.

`quiet_until(now, risk, horizon)` is how far ahead an offer may end with a visit before
its end less than `risk` likely (visits as a Poisson process at the learned rates, summed
over the hours the offer spans). Offers end there, and the pool is not listed when that
leaves less than `min_listed`: a renter is not let in just before the team usually comes,
while quiet nights stay fully rentable.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, tzinfo

VISIT_GAP = 600.0  # seconds without a request before the next one counts as a new visit
WEEK = 7 * 86400
PRIOR_PASSES = 1.0  # quiet passes of an hour imagined before the first one seen
MIN_WEEKS = 1.0  # learn at least this long before trusting the rhythm


class WeeklyRhythm:
    def __init__(self, tz: tzinfo) -> None:
        self.tz = tz
        self.visits = [0] * 168
        self.first: float | None = None  # POSIX time learning began
        self._last_request: float | None = None

    def _hour(self, t: float) -> int:
        local = datetime.fromtimestamp(t, self.tz)
        return local.weekday() * 24 + local.hour

    def start(self, t: float) -> None:
        """Learning covers time from `t` on (the ledger's first record, or the start)."""
        self.first = t if self.first is None else min(self.first, t)

    def request(self, t: float) -> None:
        """A local inference request arrived at POSIX time `t` (in time order)."""
        self.start(t)
        last = self._last_request
        if last is None or t - last > VISIT_GAP:
            self.visits[self._hour(t)] += 1
        self._last_request = t if last is None else max(last, t)

    def _passes(self, hour: int, now: float) -> float:
        """How many times hour-of-week `hour` has gone by between `first` and `now`."""
        assert self.first is not None
        start = datetime.fromtimestamp(self.first, self.tz)
        offset = (hour - (start.weekday() * 24 + start.hour)) % 168
        first_pass = self.first - (start.minute * 60 + start.second) + offset * 3600
        if now <= first_pass:
            return 0.0
        return (now - first_pass) // WEEK + 1

    def rate(self, hour: int, now: float) -> float:
        """Visits per hour expected at hour-of-week `hour`: that hour of the day over every
        day of the same kind (weekdays, weekends), which learns a daily habit five times
        faster than the hour of the week alone and is not thrown by one odd visit."""
        days = range(5, 7) if hour >= 5 * 24 else range(5)
        alike = [d * 24 + hour % 24 for d in days]
        passes = sum(self._passes(h, now) for h in alike)
        return sum(self.visits[h] for h in alike) / (passes + PRIOR_PASSES)

    def learned(self, now: float) -> bool:
        return self.first is not None and now - self.first >= MIN_WEEKS * WEEK

    def quiet_until(self, now: datetime, risk: float, horizon: timedelta) -> datetime | None:
        """How far ahead (at most `now + horizon`) an offer may end so that a visit before
        its end stays less than `risk` likely: the visits expected over [now, end], hour by
        hour at the learned rates, reach -ln(1 - risk) there (visits as a Poisson process).
        The risk is that of the whole offer, not of one hour: a renter holds the GPUs until
        the offer's end, so every quiet-ish hour it spans adds to it. `now` itself when
        this hour alone is that likely; None while the rhythm is not learned (no opinion)."""
        t0 = now.timestamp()
        if not self.learned(t0):
            return None
        budget = -math.log(1.0 - min(max(risk, 1e-6), 0.999999))  # visits allowed
        end = t0 + horizon.total_seconds()
        t = t0
        while t < end:
            step = min(end, (t // 3600 + 1) * 3600)
            rate = self.rate(self._hour(t), t0)
            expected = rate * (step - t) / 3600
            if expected >= budget:  # pragma: no mutate (">" differs only at a float tie)
                # whole seconds, as every time the machine shows
                return datetime.fromtimestamp(round(t + budget / rate * 3600), now.tzinfo)
            budget -= expected
            t = step
        return datetime.fromtimestamp(end, now.tzinfo)
