"""What both ledger stores share beyond SQL: how old rows are folded into 15-minute sums,
and how energy_totals shares a row between spans (as SQL text, in either dialect).

Pure functions of plain rows, so SQLite and PostgreSQL fold and sum exactly alike and one
contract suite holds for both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

# Energy records are folded into sums per GPU, pool state and slot of this many seconds ...
ROLLUP_SECONDS = 900
# ... once they are this old (measured from the newest record written).
RAW_RETENTION = 86_400.0
# Local requests are kept one row each for this long (measured from the newest arrival
# written), so a replay of the last month sees every request as it came ...
DEMAND_RAW_RETENTION = 35 * 86_400.0
# ... and are then folded into one row per service, outcome and bucket of this many seconds.
DEMAND_BUCKET_SECONDS = 900
# At most this many records are folded per write, so a large backlog (a ledger migrated from
# an old version) is worked off a little at a time instead of stalling the daemon's writes.
COMPACT_BATCH = 20_000

# (GPU uuid, GPU index, pool state, slot) -> [start, end, joules, overhead joules, method]
SlotSums = dict[tuple[str, int, str, int], list[Any]]
# (slot, pool state) -> [start, end, joules, overhead joules]
MachineSums = dict[tuple[int, str], list[float]]
# (service, outcome, bucket) -> [first arrival, duration sum, held sum, count]
DemandSums = dict[tuple[str, str, int], list[Any]]


def floor_to(ts: float, step: float) -> float:
    return math.floor(ts / step) * step


def energy_cutoff(newest_end: float) -> float:
    """Records as written that end by this are folded (a day before the newest, on a slot)."""
    return floor_to(newest_end - RAW_RETENTION, ROLLUP_SECONDS)


def demand_cutoff(newest_arrival: float) -> float:
    """Requests as written that arrived before this are folded."""
    return floor_to(newest_arrival - DEMAND_RAW_RETENTION, DEMAND_BUCKET_SECONDS)


def slot_sums(rows: Iterable[Sequence[Any]]) -> SlotSums:
    """Energy records as written (id, uuid, index, state, start, end, joules, overhead,
    method), summed by GPU, pool state and slot; a record spanning slots is shared by time,
    one of no length counts in the slot it starts in."""
    sums: SlotSums = {}
    for _, uuid, index, state, start, end, joules, overhead, method in rows:
        first = math.floor(start / ROLLUP_SECONDS)
        last = max(first, math.ceil(end / ROLLUP_SECONDS) - 1)
        for slot in range(first, last + 1):
            a = max(start, slot * ROLLUP_SECONDS)
            b = min(end, (slot + 1) * ROLLUP_SECONDS)
            if end > start:
                if b <= a:
                    continue
                share = (b - a) / (end - start)
            else:
                share = 1.0
            acc = sums.get((uuid, index, state, slot))
            if acc is None:
                sums[(uuid, index, state, slot)] = [a, b, joules * share, overhead * share, method]
            else:
                acc[0] = min(acc[0], a)
                acc[1] = max(acc[1], b)
                acc[2] += joules * share
                acc[3] += overhead * share
                if acc[4] != method:
                    acc[4] = "mixed"
    return sums


def machine_sums(sums: SlotSums) -> MachineSums:
    """The per-GPU slot sums added up over the GPUs: the whole machine's, per slot and state."""
    machine: MachineSums = {}
    for (_, _, state, slot), (a, b, joules, overhead, _) in sums.items():
        acc = machine.get((slot, state))
        if acc is None:
            machine[(slot, state)] = [a, b, joules, overhead]
        else:
            acc[0] = min(acc[0], a)
            acc[1] = max(acc[1], b)
            acc[2] += joules
            acc[3] += overhead
    return machine


def demand_sums(rows: Iterable[Sequence[Any]]) -> DemandSums:
    """Requests as written (id, service, outcome, arrival, duration, held, count), summed by
    service, outcome and bucket."""
    sums: DemandSums = {}
    for _, service, outcome, arrival, duration, held, count in rows:
        key = (service, outcome, math.floor(arrival / DEMAND_BUCKET_SECONDS))
        acc = sums.get(key)
        if acc is None:
            sums[key] = [arrival, duration, held, count]
        else:
            acc[0] = min(acc[0], arrival)
            acc[1] += duration
            acc[2] += held
            acc[3] += count
    return sums


def share_sql(t: str, least: str, greatest: str) -> str:
    """The part of row `t` inside span s [s.a, s.b): by time, or whole if it has no length
    (`least` / `greatest`: the dialect's two-argument MIN and MAX)."""
    return (
        f"(CASE WHEN {t}.end_ts > {t}.start_ts THEN "
        f"({least}({t}.end_ts, s.b) - {greatest}({t}.start_ts, s.a)) "
        f"/ ({t}.end_ts - {t}.start_ts) ELSE 1.0 END)"
    )


def inside_sql(t: str) -> str:
    """Row `t` has a part in span s (one of no length: it starts there)."""
    return (
        f"{t}.start_ts < s.b AND ({t}.end_ts > s.a "
        f"OR ({t}.end_ts <= {t}.start_ts AND {t}.start_ts >= s.a))"
    )
