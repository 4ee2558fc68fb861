"""The optional eco profile: persistence mode on, and a power limit per situation.

Situations follow the pool: local use (LOCAL, PAUSED), idle (IDLE), and rented, which
covers every state in which a renter has or may soon get the cards (DRAINING, LISTED,
RENTED, RECLAIMING, DEGRADED): a renter gets the card's default limit, never a lowered one,
and draining already restores it so the offer never goes live on a lowered card.

What the cards had before is written to `eco-restore.json` in the state directory before
the first change (atomically, synced), given back at stop, and given back at the next
start when a crash left the file behind. Every change is read back (a setter can answer
success and change nothing). NVML's setters need root: without it the first refusal is
logged once, with how to grant it, and the broker runs on without the profile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from broker.config import EcoProfile
from broker.errors import GpuError, GpuPermissionError, GpuSettingError
from broker.gpu.base import GpuDevice
from broker.gpu.sampler import GpuSampler
from broker.scheduling.pool import PoolState
from broker.scheduling.status import SchedulerHooks

log = logging.getLogger(__name__)

RESTORE_FILE = "eco-restore.json"

HOW_TO_GRANT = (
    "NVML changes power limits and persistence mode for root only: run the service as "
    "root to use [eco.profile], or leave it off and have an admin set the cards once "
    "(`sudo nvidia-smi -pm 1`, or enable nvidia-persistenced; `sudo nvidia-smi -i N -pl W`; "
    "a limit set so lasts until the driver unloads)"
)


class Situation(StrEnum):
    LOCAL = "local"
    IDLE = "idle"
    RENTED = "rented"


def situation_of(state: PoolState) -> Situation:
    if state in (PoolState.LOCAL, PoolState.PAUSED):
        return Situation.LOCAL
    if state is PoolState.IDLE:
        return Situation.IDLE
    return Situation.RENTED


def _write_atomically(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class PowerProfile(SchedulerHooks):
    def __init__(self, sampler: GpuSampler, state_dir: Path, profile: EcoProfile) -> None:
        self._sampler = sampler
        self._profile = profile
        self._file = state_dir.expanduser() / RESTORE_FILE
        self._want = Situation.LOCAL
        self._wake = asyncio.Event()
        self._saved: dict[str, dict[str, Any]] | None = None  # by UUID, once written
        self._warned: set[str] = set()
        self.situation: Situation | None = None  # the one applied last
        self.refused: str | None = None  # why the profile is off for this run

    @property
    def enabled(self) -> bool:
        return self._profile.enabled

    # -- told by the scheduler --------------------------------------------------------------

    def state_changed(self, state: PoolState, before: PoolState, reason: str) -> None:
        self.want(state)

    def want(self, state: PoolState) -> None:
        situation = situation_of(state)
        if situation is not self._want:
            self._want = situation
            self._wake.set()

    # -- applying ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply the situation wanted, and again each time it changes, until cancelled."""
        while True:
            self._wake.clear()
            if self.refused is None:
                try:
                    await self.apply(self._want)
                except GpuError as err:  # the driver did not answer: try at the next change
                    log.warning("eco profile not applied: %s", err)
                except OSError as err:
                    # No record of what to give back, no change: off for this run.
                    self.refused = f"cannot write {self._file}: {err}"
                    log.error("eco profile off for this run: %s", self.refused)
            await self._wake.wait()

    def _target(self, dev: GpuDevice, situation: Situation, original: float | None) -> float | None:
        if situation is Situation.RENTED:
            return dev.power_default_w if dev.power_default_w is not None else original
        wanted = (
            self._profile.local_watts if situation is Situation.LOCAL else self._profile.idle_watts
        )
        if wanted is None:
            return original
        low = dev.power_min_w if dev.power_min_w is not None else wanted
        high = dev.power_max_w if dev.power_max_w is not None else wanted
        clamped = min(max(wanted, low), high)
        if clamped != wanted:
            self._warn_once(
                f"clamp:{dev.uuid}:{situation}",
                "GPU %d accepts power limits of %g-%g W: %s limit %g W is applied as %g W",
                dev.index, low, high, situation.value, wanted, clamped,
            )  # fmt: skip
        return clamped

    async def apply(self, situation: Situation) -> None:
        backend = self._sampler.backend
        devices = await backend.devices()
        if self._saved is None:
            self._saved = {
                d.uuid: {
                    "index": d.index,
                    "power_limit_w": d.power_limit_w,
                    "persistence_mode": d.persistence_mode,
                }
                for d in devices
            }
            # Before anything changes: a crash from here on leaves what to give back.
            _write_atomically(self._file, {"gpus": self._saved})
        try:
            for dev in devices:
                saved = self._saved.get(dev.uuid, {})
                if self._profile.persistence_mode and dev.persistence_mode is False:
                    await self._setting(backend.set_persistence_mode(dev.index, True), dev)
                target = self._target(dev, situation, saved.get("power_limit_w"))
                if target is not None and target != dev.power_limit_w:
                    got = await self._setting(backend.set_power_limit(dev.index, target), dev)
                    if got is not None:
                        log.info(
                            "GPU %d power limit %g W (%s)", dev.index, got, situation.value
                        )
        except GpuPermissionError as err:
            self.refused = f"{err}. {HOW_TO_GRANT}"
            log.warning("eco profile off for this run: %s", self.refused)
            await self.restore()  # whatever did change before the refusal
            return
        finally:
            self._sampler.devices = await backend.devices()
        self.situation = situation

    async def _setting(self, call: Any, dev: GpuDevice) -> Any:
        try:
            return await call
        except GpuPermissionError:
            raise
        except GpuSettingError as err:
            self._warn_once(f"set:{dev.uuid}:{err}", "eco profile: %s", err)
            return None

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # -- giving back -------------------------------------------------------------------------

    async def restore(self) -> list[str]:
        """Give every card back what it had; the file goes once all is given back.
        Returns what could not be."""
        if self._saved is None:
            return []
        problems = await self._give_back(self._saved)
        if not problems:
            self._file.unlink(missing_ok=True)
            self._saved = None
        return problems

    async def restore_leftover(self) -> list[str]:
        """At start, before anything else: what a crashed run left changed is given back."""
        try:
            data = json.loads(self._file.read_text(encoding="utf-8"))
            saved = dict(data["gpus"])
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.error("cannot read %s (%s); the cards' settings are left as they are",
                      self._file, err)  # fmt: skip
            return [f"{self._file}: {err}"]
        log.warning("a previous run left the eco profile applied; giving the cards back "
                    "their settings from %s", self._file)  # fmt: skip
        problems = await self._give_back(saved)
        if not problems:
            self._file.unlink(missing_ok=True)
        return problems

    async def _give_back(self, saved: Mapping[str, Mapping[str, Any]]) -> list[str]:
        backend = self._sampler.backend
        problems: list[str] = []
        for dev in await backend.devices():
            was = saved.get(dev.uuid)
            if was is None:
                continue
            limit, persistence = was.get("power_limit_w"), was.get("persistence_mode")
            try:
                if limit is not None and limit != dev.power_limit_w:
                    await backend.set_power_limit(dev.index, float(limit))
                if persistence is not None and persistence != dev.persistence_mode:
                    await backend.set_persistence_mode(dev.index, bool(persistence))
            except GpuError as err:
                problems.append(f"GPU {dev.index}: {err}")
                log.error("eco profile: could not give GPU %d its settings back: %s",
                          dev.index, err)  # fmt: skip
        self._sampler.devices = await backend.devices()
        return problems

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "situation": None if self.situation is None else self.situation.value,
            "refused": self.refused,
        }
