"""The eco power profile in the whole broker (virtual time, fake GPUs, fake Vast.ai): applied
per situation and read back, given back at stop, after a crash, and refused without root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fakes.rig import Rig, RigFactory

from broker.clock import FakeClock
from broker.config import EcoProfile, FakeGpu, parse_config
from broker.eco.profile import RESTORE_FILE, PowerProfile, Situation, situation_of
from broker.errors import ConfigError
from broker.gpu import FakeBackend
from broker.gpu.sampler import GpuSampler
from broker.scheduling.pool import PoolState

PROFILE = {"profile": {"enabled": True, "local_watts": 250, "idle_watts": 150}}
# Second-hand cards as found: one with persistence off, both limited to 300 W of a 350 W
# default (100-350 W allowed).
CARDS = [
    {"uuid": "GPU-rig-0", "persistence_mode": False, "power_limit_w": 300, "power_min_w": 100},
    {"uuid": "GPU-rig-1", "power_limit_w": 300, "power_min_w": 100},
]


def limits(rig: Rig) -> list[float | None]:
    assert rig.daemon.sampler is not None
    return [d.power_limit_w for d in rig.daemon.sampler.devices]


def persistence(rig: Rig) -> list[bool | None]:
    assert rig.daemon.sampler is not None
    return [d.persistence_mode for d in rig.daemon.sampler.devices]


async def test_the_profile_follows_the_pool_and_is_given_back_at_stop(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    rig = await make_rig(eco=PROFILE, gpus={"fake": CARDS})
    restore = tmp_path / "state" / RESTORE_FILE
    # Local use: the local limit, persistence on, what to give back already on disk.
    await rig.until(lambda: limits(rig) == [250, 250], limit=5)
    assert persistence(rig) == [True, True]
    saved = json.loads(restore.read_text())["gpus"]
    assert saved["GPU-rig-0"] == {"index": 0, "power_limit_w": 300, "persistence_mode": False}
    assert rig.daemon.profile is not None and rig.daemon.profile.situation is Situation.LOCAL

    await rig.until_state(PoolState.IDLE, limit=30)
    await rig.until(lambda: limits(rig) == [150, 150], limit=5)
    # Draining already gives the renter's limit back: the card's default, never lower.
    await rig.until_state(PoolState.DRAINING, limit=300)
    await rig.until(lambda: limits(rig) == [350, 350], limit=5)
    await rig.until_state(PoolState.LISTED, limit=120)
    assert limits(rig) == [350, 350]

    sampler = rig.daemon.sampler
    assert sampler is not None
    await rig.aclose()
    # Read from the backend itself, as the driver has them now.
    got = await sampler.backend.devices()
    assert [(d.power_limit_w, d.persistence_mode) for d in got] == [(300, False), (300, True)]
    assert not restore.exists()


async def test_what_a_crash_left_applied_is_given_back_at_the_next_start(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    specs = [FakeGpu.model_validate(card) for card in CARDS]
    backend = FakeBackend(specs, clock)  # the driver: its settings outlive the broker
    state_dir = tmp_path / "state"
    sampler = GpuSampler(backend, clock)
    await sampler.start()
    first = PowerProfile(sampler, state_dir, EcoProfile(enabled=True, idle_watts=120))
    await first.apply(Situation.IDLE)
    assert [d.power_limit_w for d in await backend.devices()] == [120, 120]
    # ... and the process dies here (no restore). The next start:
    second = PowerProfile(GpuSampler(backend, clock), state_dir, EcoProfile())
    assert await second.restore_leftover() == []
    got = await backend.devices()
    assert [(d.power_limit_w, d.persistence_mode) for d in got] == [(300, False), (300, True)]
    assert not (state_dir / RESTORE_FILE).exists()
    assert await second.restore_leftover() == []  # nothing left: nothing done


async def test_without_root_the_broker_runs_on_and_says_why_once(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    refused: list[dict[str, Any]] = [
        card | {"no_permission": ["power_limit", "persistence_mode"]} for card in CARDS
    ]
    with caplog.at_level(logging.WARNING, logger="broker.eco.profile"):
        rig = await make_rig(eco=PROFILE, gpus={"fake": refused})
        await rig.until_state(PoolState.IDLE, limit=30)
        await rig.until_state(PoolState.LISTED, limit=300)
    said = [r.getMessage() for r in caplog.records if r.name == "broker.eco.profile"]
    assert len(said) == 1, said
    assert "no permission" in said[0] and "root" in said[0] and "nvidia-smi -pm 1" in said[0]
    assert limits(rig) == [300, 300] and persistence(rig) == [False, True]
    assert rig.daemon.profile is not None and rig.daemon.profile.refused is not None
    assert not (tmp_path / "state" / RESTORE_FILE).exists()


def test_situations_follow_the_pool_states() -> None:
    assert {s: situation_of(s).value for s in PoolState} == {
        PoolState.LOCAL: "local",
        PoolState.PAUSED: "local",
        PoolState.IDLE: "idle",
        PoolState.DRAINING: "rented",
        PoolState.LISTED: "rented",
        PoolState.RENTED: "rented",
        PoolState.RECLAIMING: "rented",
        PoolState.DEGRADED: "rented",
    }


@pytest.mark.parametrize(
    ("profile", "says"),
    [
        ({"local_watts": 0}, "eco.profile.local_watts"),
        ({"idle_watts": "low"}, "eco.profile.idle_watts"),
        ({"enabled": "sometimes"}, "eco.profile.enabled"),
        # A renter's limit is the card's default: there is no key to lower it.
        ({"rented_watts": 100}, "eco.profile.rented_watts"),
    ],
)
def test_bad_profile_keys_are_named(profile: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"eco": {"profile": profile}})
    assert says in str(caught.value)


def test_check_warns_when_the_profile_cannot_work_without_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.cli import main

    cfg = tmp_path / "broker.toml"
    cfg.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\n[gpus]\nbackend = "auto"\n'
        '[provider]\nkind = "paper"\n[eco.profile]\nenabled = true\n'
    )
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    main(["check", "-c", str(cfg)], clock=FakeClock())
    out = capsys.readouterr().out
    assert "warn eco.profile: enabled, but not running as root" in out
    assert "sudo nvidia-smi -pm 1" in out
    monkeypatch.setattr("os.geteuid", lambda: 0)
    main(["check", "-c", str(cfg)], clock=FakeClock())
    assert "eco.profile" not in capsys.readouterr().out


async def test_without_a_record_of_what_to_give_back_nothing_is_changed(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    backend = FakeBackend([FakeGpu.model_validate(card) for card in CARDS], clock)
    sampler = GpuSampler(backend, clock)
    await sampler.start()
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the state directory should be")
    profile = PowerProfile(sampler, blocked, EcoProfile(enabled=True, local_watts=200))
    task = asyncio.create_task(profile.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert profile.refused is not None and "cannot write" in profile.refused
    assert [d.power_limit_w for d in await backend.devices()] == [300, 300]
    assert not task.done()  # the loop waits on, the broker runs on
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
