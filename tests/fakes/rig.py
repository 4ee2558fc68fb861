"""A whole broker in one event loop, on a FakeClock: fake GPUs, the fake Ollama behind a
real gate, the fake Vast.ai server (or the paper market), a real SQLite ledger and the API.

`Rig.until(predicate)` moves virtual time forward a step at a time and, after each step,
lets real I/O (loopback HTTP to the fakes) finish before looking, so a test reads like a
story ("until listed", "a chat arrives", "until served") and takes milliseconds.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import ollama

from broker.clock import FakeClock
from broker.config import Config, parse_config
from broker.daemon import Daemon
from broker.scheduling.pool import PoolState
from fakes.ollama import FakeOllama
from fakes.vast import FakeVast, drive

VAST_KEY = "rig-vast-key"
TOKEN = "rig-api-token-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rig_config(
    state_dir: Path,
    *,
    ollama_url: str,
    vast_url: str | None,
    policy: dict[str, Any] | None = None,
    windows: list[dict[str, Any]] | None = None,
    services: dict[str, Any] | None = None,
    gpus: dict[str, Any] | None = None,
    provider: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    eco: dict[str, Any] | None = None,
) -> Config:
    data: dict[str, Any] = {
        "broker": {
            "state_dir": str(state_dir),
            "timezone": "UTC",
            "sample_interval": "1s",
            "api_listen": f"127.0.0.1:{free_port()}",
            "api_token_env": "RIG_API_TOKEN",
        }
        | (broker or {}),
        "gpus": {
            "backend": "fake",
            "idle_debounce": "5s",
            "process_interval": "1s",
            "fake": [{"uuid": "GPU-rig-0"}, {"uuid": "GPU-rig-1"}],
        }
        | (gpus or {}),
        "services": [
            {
                "name": "ollama",
                "kind": "ollama",
                "upstream": ollama_url,
                "gate_listen": f"127.0.0.1:{free_port()}",
                "gpus": [0, 1],
                "max_hold": "30s",
            }
            | (services or {})
        ],
        "policy": {
            "idle_window": "2m",
            "drain_timeout": "1m",
            "min_listed": "10m",
            "max_cycles_per_day": 3,
            "local_hold": "5m",
            "max_commitment": "1h",
        }
        | (policy or {}),
        # The rig's clock starts at 12:00 UTC: inside this window, which ends at 18:00.
        "windows": windows if windows is not None else [{"cron": "0 12 * * *", "duration": "6h"}],
        "energy": {"currency": "USD", "price_per_kwh": 0.2, "overhead_watts": 40},
    }
    if eco is not None:
        data["eco"] = eco
    if vast_url is not None:
        data["provider"] = {
            "kind": "vast",
            "machine_id": 4242,
            "api_key_env": "RIG_VAST_KEY",
            "base_url": vast_url,
            "price_gpu": 0.3,
            "min_bid": 0.1,
            "request_spacing": "0s",
            "request_timeout": "2s",
            "retry_attempts": 2,
            "docker_socket": "",
        } | (provider or {})
    elif (provider or {}).get("kind", "paper") == "paper":
        data["provider"] = {"kind": "paper", "arrivals_per_hour": 0} | (provider or {})
    else:
        data["provider"] = dict(provider or {})  # another marketplace, given whole
    return parse_config(data)


class Rig:
    def __init__(
        self,
        clock: FakeClock,
        config: Config,
        ollama: FakeOllama,
        vast: FakeVast | None,
        host: str = "rig",
    ) -> None:
        self.clock = clock
        self.config = config
        self.ollama = ollama
        self.vast = vast
        self.daemon = Daemon(config, clock, host=host)

    @property
    def state(self) -> PoolState:
        return self.daemon.scheduler.state

    @property
    def gate_url(self) -> str:
        return self.daemon.gates[0].url

    @property
    def api_url(self) -> str:
        assert self.daemon.api is not None
        return self.daemon.api.url

    @property
    def offer(self) -> Any:
        assert self.vast is not None
        return self.vast.machine().book.offer

    async def start(self) -> Rig:
        await self.daemon.start()
        await self.settle()
        return self

    async def settle(self) -> None:
        """Let real I/O finish: wait (real time) until the scheduler is parked again.

        A step that waits on the clock itself (a retry's backoff) gets the clock moved to
        its deadline once nothing else has happened for a few milliseconds, as `drive()`
        does, so virtual waits inside a step pass and real I/O still runs."""
        quiet = 0
        scheduler = self.daemon.scheduler
        reading_since: float | None = None
        for _ in range(5000):
            await asyncio.sleep(0.001)
            if scheduler.parked:
                # The watchers' reads (real I/O to the fakes) finish too, unless one stalls
                # (a `slow` fault): the loop must not wait on it, nor must the story.
                if scheduler.reading:
                    now = asyncio.get_running_loop().time()
                    reading_since = reading_since or now
                    if now - reading_since < 0.3:
                        continue
                await asyncio.sleep(0.001)
                if scheduler.parked and (not scheduler.reading or reading_since is not None):
                    return
            else:
                reading_since = None
            quiet += 1
            deadline = self.clock.next_deadline()
            if quiet >= 20 and deadline is not None:
                await self.clock.advance(max(0.0, deadline - self.clock.monotonic()))
                quiet = 0
        raise AssertionError("the scheduler did not settle within 5 s of real time")

    async def run_for(self, seconds: float, step: float = 1.0) -> None:
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end:
            await self.clock.advance(min(step, end - self.clock.monotonic()))
            await self.settle()

    async def until(
        self, predicate: Callable[[], bool], *, limit: float = 3600.0, step: float = 1.0
    ) -> float:
        """Advance until `predicate()`; returns the virtual seconds it took."""
        start = self.clock.monotonic()
        while not predicate():
            if self.clock.monotonic() - start > limit:
                raise AssertionError(
                    f"not reached within {limit:g} s of virtual time; pool is "
                    f"{self.state.value}: {self.daemon.scheduler.last_reason}"
                )
            await self.clock.advance(step)
            await self.settle()
        return self.clock.monotonic() - start

    async def until_state(self, state: PoolState, **kw: Any) -> float:
        return await self.until(lambda: self.state is state, **kw)

    async def aclose(self) -> None:
        await drive(self.clock, self.daemon.aclose())


RigFactory = Callable[..., Awaitable[Rig]]  # the `make_rig` fixture (tests/conftest.py)


async def chat(rig: Rig) -> Any:
    """One non-streamed chat through the rig's gate, with the real `ollama` client."""
    async with ollama.AsyncClient(host=rig.gate_url) as client:
        return await client.chat(
            model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}], stream=False
        )


async def journal_kinds(rig: Rig) -> list[tuple[str, str]]:
    """(kind, status) of every journal entry but the transitions, oldest first."""
    assert rig.daemon.ledger is not None
    entries = await rig.daemon.ledger.journal_entries()
    return [(e.kind, e.status) for e in entries if e.kind != "transition"]


async def listed(rig: Rig) -> float:
    """From a fresh start to LISTED; returns the virtual seconds it took."""
    return await rig.until_state(PoolState.LISTED, limit=600)
