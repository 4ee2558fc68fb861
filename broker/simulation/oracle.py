"""The oracle: the best net any policy could make, knowing every request and renter ahead.

Rules it keeps (the issue's): no local request waits (a rental ends before the next
request arrives, and none starts while a request runs); offers only inside the windows,
never ending after the window, and none longer than `max_commitment` when a renter takes
it; a renter rents only as the replay's renters do (listed, nobody renting, the price
suits, at least `min_offer_hours` left on the offer).

What it may do that a policy cannot: list at the very instant a renter arrives (no
listed-but-unrented time, no idle_window, no drain, no anti-flap limits) and renew the
offer continuously, so a rental lasts until the renter leaves, the window closes, the next
local request comes or the oracle lets the offer run out, whichever it chooses.

It is exact for that problem, solved as a weighted interval scheduling DP over the renter
arrivals: renter i arriving at t may take the machine for [t, e) with

    lo = min(t + hours, t + min_offer)   (the offer's first end date is at least t + min_offer)
    hi = min(t + hours, window_end, next_request)
    lo <= e <= hi,  min_offer <= max_commitment,  t + min_offer <= window_end

and the value of [t, e) is what it pays minus the energy it draws. Between two later
arrivals the set of renters still reachable does not change while the value grows with e
(a rented hour earns more than its power costs), so the best e is `hi` or the arrival
time of a later renter, plus `lo` for a renter whose hours do not pay their energy.
best[i] = max(best[i+1], max_e value_i(e) + best[first renter arriving at or after e]),
computed from the last renter back. It bounds every policy that keeps every local
request from waiting (each such schedule is one of the oracle's choices); a policy that
makes the team wait (refusals) can earn more than the oracle, at the team's expense, so
a share of the oracle above 100 % is possible and says exactly that.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from broker.simulation.economics import EnergyPrice, Machine
from broker.simulation.inputs import Renter, Request


@dataclass(frozen=True)
class OracleResult:
    earnings: float
    energy_cost: float
    extra_energy_cost: float
    rented_gpu_hours: float
    rentals: tuple[tuple[float, float], ...]  # (start, end) of each rental taken

    @property
    def net(self) -> float:
        return self.earnings - self.energy_cost

    @property
    def extra_net(self) -> float:
        return self.earnings - self.extra_energy_cost


def busy_spans(demand: Sequence[Request]) -> tuple[list[float], list[float]]:
    """The merged [start, end) spans when a local request runs."""
    starts: list[float] = []
    ends: list[float] = []
    for r in sorted(demand, key=lambda r: r.at):
        end = r.at + r.duration_s
        if ends and r.at <= ends[-1]:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(r.at)
            ends.append(end)
    return starts, ends


def solve(
    demand: Sequence[Request],
    renters: Sequence[Renter],
    windows: Sequence[tuple[float, float]],
    *,
    max_commitment_s: float,
    machine: Machine,
    price: EnergyPrice,
    start: float,
    end: float,
) -> OracleResult:
    b_start, b_end = busy_spans(demand)
    w_start = [w[0] for w in windows]
    w_end = [w[1] for w in windows]
    people = sorted((r for r in renters if start <= r.at < end), key=lambda r: r.at)
    times = [r.at for r in people]
    rented_w = machine.load_watts + machine.overhead_watts
    extra_w = machine.load_watts - machine.idle_watts
    per_currency = machine.usd_per_currency or 1.0

    def value(t: float, e: float, usd_h: float) -> float:
        return usd_h / per_currency * (e - t) / 3600 - price.cost(t, e, rented_w)

    n = len(people)
    best = [0.0] * (n + 1)
    choice: list[float | None] = [None] * n
    for i in range(n - 1, -1, -1):
        best[i] = best[i + 1]
        r = people[i]
        t = r.at
        usd_h = machine.pays(r)
        if usd_h is None:
            continue
        k = bisect.bisect_right(w_start, t) - 1
        if k < 0 or t >= w_end[k]:
            continue  # outside every window
        window_end = min(w_end[k], end)
        k = bisect.bisect_right(b_start, t) - 1
        if k >= 0 and t < b_end[k]:
            continue  # a local request runs
        following = b_start[k + 1] if k + 1 < len(b_start) else float("inf")
        min_offer = r.min_offer_hours * 3600
        if min_offer > max_commitment_s or t + min_offer > window_end:
            continue
        leaves = t + r.hours * 3600
        lo = min(leaves, t + min_offer)
        hi = min(leaves, window_end, following)
        if lo > hi or hi <= t:
            continue
        cands = {lo, hi}
        j = bisect.bisect_right(times, lo, lo=i + 1)
        while j < n and times[j] < hi:
            cands.add(times[j])
            j += 1
        for e in cands:
            nxt = bisect.bisect_left(times, e, lo=i + 1)
            total = value(t, e, usd_h) + best[nxt]
            if total > best[i]:
                best[i], choice[i] = total, e
    # walk the choices forward
    earnings = energy = extra = gpu_h = 0.0
    taken: list[tuple[float, float]] = []
    i = 0
    while i < n:
        chosen = choice[i]
        if chosen is None:  # passing this renter by is as good (choice is set only when better)
            i += 1
            continue
        r, e = people[i], chosen
        usd_h = machine.pays(r) or 0.0
        earnings += usd_h / per_currency * (e - r.at) / 3600
        energy += price.cost(r.at, e, rented_w)
        extra += price.cost(r.at, e, extra_w)
        gpu_h += machine.gpu_count * (e - r.at) / 3600
        taken.append((r.at, e))
        i = bisect.bisect_left(times, e, lo=i + 1)
    return OracleResult(earnings, energy, extra, gpu_h, tuple(taken))

