"""Draining by stopping the service: `drain = "systemd:UNIT"` or `drain = "command"`.

For services whose API cannot free the card (a process keeps its CUDA context until it
exits, FACTS.md), the broker stops them and starts them again on resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from broker.clock import Clock
from broker.errors import DrainError, ServiceError

log = logging.getLogger(__name__)

# How long a resume (start) may take; starting is quick for systemd, and a command that
# hangs must not wedge the scheduler.
RESUME_TIMEOUT_S = 120.0


async def run_command(
    argv: list[str] | str, clock: Clock, limit_s: float, *, what: str
) -> None:
    """Run a program (list) or a shell command (str); raise DrainError on failure or limit_s."""
    # A session of its own, so a timeout kills the shell's children too (they would keep
    # stderr open and the wait going).
    out, err = asyncio.subprocess.DEVNULL, asyncio.subprocess.PIPE
    if isinstance(argv, str):
        proc = await asyncio.create_subprocess_shell(
            argv, stdout=out, stderr=err, start_new_session=True
        )
    else:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=err, start_new_session=True
        )
    finished = asyncio.ensure_future(proc.communicate())
    timer = asyncio.ensure_future(clock.sleep(limit_s))
    try:
        await asyncio.wait((finished, timer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not finished.done():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await finished
            raise DrainError(f"{what}: still running after {limit_s:g} s, killed")
    _, stderr = finished.result()
    if proc.returncode != 0:
        words = stderr.decode(errors="replace").strip()[-300:]
        raise DrainError(f"{what}: exit status {proc.returncode}: {words}")


class SystemdDrain:
    """`systemctl stop UNIT` on drain, `systemctl start UNIT` on resume."""

    def __init__(self, unit: str, clock: Clock, *, systemctl: str = "systemctl") -> None:
        self.unit = unit
        self._clock = clock
        self._systemctl = systemctl

    async def drain(self, limit_s: float) -> None:
        await run_command([self._systemctl, "stop", self.unit], self._clock, limit_s,
                          what=f"systemctl stop {self.unit}")  # fmt: skip

    async def resume(self) -> None:
        try:
            await run_command([self._systemctl, "start", self.unit], self._clock,
                              RESUME_TIMEOUT_S, what=f"systemctl start {self.unit}")  # fmt: skip
        except DrainError as err:
            raise ServiceError(str(err)) from err


class CommandDrain:
    """The configured `drain_command` / `resume_command`, run through the shell."""

    def __init__(self, drain_command: str, resume_command: str, clock: Clock) -> None:
        self.drain_command = drain_command
        self.resume_command = resume_command
        self._clock = clock

    async def drain(self, limit_s: float) -> None:
        await run_command(self.drain_command, self._clock, limit_s, what="drain_command")

    async def resume(self) -> None:
        try:
            await run_command(self.resume_command, self._clock, RESUME_TIMEOUT_S,
                              what="resume_command")  # fmt: skip
        except DrainError as err:
            raise ServiceError(str(err)) from err


class NoDrain:
    """`drain = "none"`: the broker gates and watches the service but never touches it.
    The quick demo uses it, so a demo on simulated GPUs cannot unload a real Ollama that
    happens to answer on its upstream port; NVML still decides whether the GPUs are free."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def drain(self, limit_s: float) -> None:
        log.info("service %s: drain = \"none\": left as it is", self.name)

    async def resume(self) -> None:
        return None
