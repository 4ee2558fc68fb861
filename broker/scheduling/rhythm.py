"""The team's weekly rhythm: how likely a local request is at each hour of the week.

Learned from the requests the gates saw (the ledger's demand record, then live): a *visit*
is a request that comes more than `VISIT_GAP` after the one before it (a person opening a
chat; the requests that follow belong to it). For each of the 168 hours of the week, the
rate is the visits seen in that hour over the number of times that hour has gone by since
learning began, with one imagined quiet pass as a prior so a single visit does not close
an hour for good; the same hour of other days of the same kind (weekdays, weekends) is
pooled too, and the higher of the two rates is taken (the team's comfort comes first).

`quiet_until(now, risk)` is how far ahead the chance of at least one visit stays under
`risk` (visits as a Poisson process at the learned rates): an offer that ends there is
rented out only when a request is unlikely before it ends, and a renter who wants longer
goes elsewhere instead of keeping the team waiting.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, tzinfo

VISIT_GAP = 600.0  # seconds without a request before the next one counts as a new visit
WEEK = 7 * 86400
PRIOR_WEEKS = 1.0  # quiet weeks imagined before the first one seen
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
        if self.first is None or t < self.first:
            self.first = t

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
        """Visits per hour expected at hour-of-week `hour`: the higher of that hour's own
        rate and the rate at that hour of the day over the same kind of day (weekday or
        weekend), which learns a daily habit five times faster."""
        own = self.visits[hour] / (self._passes(hour, now) + PRIOR_WEEKS)
        weekend = hour >= 5 * 24
        days = range(5, 7) if weekend else range(5)
        alike = [d * 24 + hour % 24 for d in days]
        passes = sum(self._passes(h, now) for h in alike)
        daily = sum(self.visits[h] for h in alike) / (passes + PRIOR_WEEKS)
        return max(own, daily)

    def learned(self, now: float) -> bool:
        return self.first is not None and now - self.first >= MIN_WEEKS * WEEK

    def quiet_until(self, now: datetime, risk: float, horizon: timedelta) -> datetime | None:
        """The latest end (at most `now + horizon`) before which a visit stays less likely
        than `risk`; None while the rhythm is not learned yet (no opinion)."""
        t0 = now.timestamp()
        if not self.learned(t0):
            return None
        budget = -math.log(1.0 - min(max(risk, 0.0), 0.999999))
        end = t0 + horizon.total_seconds()
        t = t0
        while t < end:
            hour_end = (t // 3600 + 1) * 3600
            step_end = min(hour_end, end)
            rate = self.rate(self._hour(t), t0) / 3600
            need = rate * (step_end - t)
            if need >= budget:
                t += budget / rate
                return datetime.fromtimestamp(t, now.tzinfo)
            budget -= need
            t = step_end
        return datetime.fromtimestamp(end, now.tzinfo)
