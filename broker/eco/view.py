"""`GET /api/eco`: the `eco --json` object of the running broker, for the dashboard.

The live part is the sampler's latest snapshot (no NVML call); the days are the ledger's
idle records plus this run's not yet written, so every idle sample counts once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from broker.eco.now import eco_object, summaries
from broker.scheduling.status import StatusSource


async def eco_view(daemon: StatusSource, days: float) -> dict[str, Any]:
    sampler = daemon.scheduler.sampler
    snap = sampler.latest
    now = daemon.clock.now()
    records = []
    if daemon.ledger is not None:
        records = await daemon.ledger.idle(now - timedelta(days=days), now)
    history = daemon.idle_history
    if history is not None:
        records.extend(history.unwritten())
    result = eco_object(
        daemon.config,
        sampler.devices,
        {s.index: s for s in snap.gpus} if snap is not None else {},
        snap.processes if snap is not None else {},
        summaries(records),
        days,
    )
    profile = daemon.profile
    result["profile"] = (
        profile.status() if profile is not None else {"enabled": False, "situation": None,
                                                      "refused": None}
    )  # fmt: skip
    return result
