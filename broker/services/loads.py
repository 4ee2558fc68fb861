"""Model loads: what the service probes show newly loaded, written to the ledger for
`gpu-broker sizing` (how often a GPU reloads models, the cost of two services sharing it).

Each probe says which models a service holds (Ollama `/api/ps`; ComfyUI the checkpoints of
the last prompt it ran). A model in a probe that was not in the service's previous one is a
load. The first answer after the broker starts only sets the baseline: when those models
came is unknown. An unreachable service keeps its last set, so a blip counts nothing; a
restarted service that loads its models again counts them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

from broker.errors import LedgerError
from broker.ledger.base import Ledger, ModelLoad
from broker.services.base import ServiceProbe

log = logging.getLogger(__name__)


class ModelLoadTracker:
    """Turns successive probes into loads. Pure: no clock, no I/O."""

    def __init__(self, gpus: Mapping[str, Sequence[int]]) -> None:
        self._gpus = {name: tuple(g) for name, g in gpus.items()}
        self._held: dict[str, frozenset[str]] = {}

    def observe(self, service: str, probe: ServiceProbe, at: datetime) -> list[ModelLoad]:
        if not probe.reachable:
            return []
        now = frozenset(probe.loaded)
        before = self._held.get(service)
        self._held[service] = now
        if before is None:
            return []
        gpus = self._gpus.get(service, ())
        return [ModelLoad(service, at, model, gpus) for model in sorted(now - before)]


class ModelLoadRecorder:
    """Writes the tracker's loads to the ledger. Loads are a few an hour: each probe round's
    are written at once; a failed write is logged (once until writes work again) and the
    loads are lost, which costs a little history, never the watcher."""

    def __init__(self, ledger: Ledger, gpus: Mapping[str, Sequence[int]]) -> None:
        self._ledger = ledger
        self.tracker = ModelLoadTracker(gpus)
        self._failing = False

    async def observe(self, probes: Mapping[str, ServiceProbe], at: datetime) -> list[ModelLoad]:
        loads = [
            load
            for name, probe in probes.items()
            for load in self.tracker.observe(name, probe, at)
        ]
        if not loads:
            return loads
        try:
            await self._ledger.add_model_loads(loads)
        except LedgerError as err:
            if not self._failing:
                log.warning("model loads not written to the ledger: %s", err)
            self._failing = True
            return loads
        self._failing = False
        return loads
