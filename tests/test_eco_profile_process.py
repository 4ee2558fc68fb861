"""The eco profile in the real `gpu-broker run` process, on the real NVML code path: the
stand-in driver of tests/fakes/nvml.py keeps its cards' settings in a file, as a real
driver keeps them after the broker's process is gone. SIGTERM gives the cards back at
once; SIGKILL leaves them changed, and the next start gives them back before anything else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fakes.nvml import StandInDriver, StandInGpu, save
from fakes.rig import free_port

from broker.eco.profile import RESTORE_FILE

TESTS = Path(__file__).parent


def write_config(tmp_path: Path, *, profile: bool) -> tuple[Path, int]:
    path = tmp_path / ("profile.toml" if profile else "plain.toml")
    port = free_port()
    path.write_text(
        f"""
[broker]
state_dir = "{tmp_path / "state"}"
timezone = "UTC"
sample_interval = "100ms"
api_listen = "127.0.0.1:{port}"

[gpus]
backend = "nvml"
process_interval = "100ms"

[provider]
kind = "paper"

[eco.profile]
enabled = {"true" if profile else "false"}
local_watts = 250
"""
    )
    return path, port


def cards(driver_file: Path) -> list[tuple[int, int]]:
    """(power limit mW, persistence) of each card, as the driver has them now."""
    data = json.loads(driver_file.read_text())
    return [(g["limit_mw"], g["persistence"]) for g in data["gpus"]]


class Broker:
    def __init__(self, driver_file: Path, config_and_port: tuple[Path, int]) -> None:
        config, self.port = config_and_port
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p
        )
        self.log = config.parent / f"broker-{time.monotonic_ns()}.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fakes.nvml", str(driver_file), "run", "-c", str(config)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def api_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/status", timeout=2):
                return True
        except OSError:
            return False

    def stop(self, sig: signal.Signals) -> int:
        # Signals are handled once the service runs (a start in progress finishes first).
        self.wait_for("running", self.api_up)
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            self._out.close()

    def wait_for(self, what: str, predicate: Callable[[], bool], limit: float = 60) -> None:
        deadline = time.monotonic() + limit
        while not predicate():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{what}: not reached\n{self.output()[-4000:]}")
            time.sleep(0.02)


def test_applied_read_back_and_given_back_on_sigterm_and_after_sigkill(tmp_path: Path) -> None:
    driver_file = tmp_path / "driver.json"
    save(
        StandInDriver(
            [
                StandInGpu("GPU-proc-0", limit_mw=300_000, persistence=0),
                StandInGpu("GPU-proc-1", limit_mw=300_000, persistence=1),
            ]
        ),
        driver_file,
    )
    as_found = [(300_000, 0), (300_000, 1)]
    applied = [(250_000, 1), (250_000, 1)]
    restore = tmp_path / "state" / RESTORE_FILE
    profile = write_config(tmp_path, profile=True)

    # SIGTERM: applied (through NVML, read back), then given back before the exit.
    broker = Broker(driver_file, profile)
    broker.wait_for("profile applied", lambda: cards(driver_file) == applied)
    assert restore.exists()
    assert broker.stop(signal.SIGTERM) == 0, broker.output()[-3000:]
    assert cards(driver_file) == as_found
    assert not restore.exists()

    # SIGKILL: the cards stay changed, and what to give back stays on disk ...
    broker = Broker(driver_file, profile)
    broker.wait_for("profile applied", lambda: cards(driver_file) == applied)
    assert broker.stop(signal.SIGKILL) == -signal.SIGKILL
    assert cards(driver_file) == applied
    assert restore.exists()

    # ... so the next start gives it back, even with the profile switched off since.
    plain = write_config(tmp_path, profile=False)
    broker = Broker(driver_file, plain)
    broker.wait_for("given back", lambda: cards(driver_file) == as_found)
    broker.wait_for("file gone", lambda: not restore.exists())
    assert broker.stop(signal.SIGTERM) == 0, broker.output()[-3000:]
    assert "a previous run left the eco profile applied" in broker.output()
    assert cards(driver_file) == as_found
