"""Local inference services: adapters (probe, drain, resume) and the gate in front of them.

`build_adapter()` turns a `[[services]]` section into the adapter the scheduler polls and
drains; `Gate.from_section()` builds its gate, whose `control` the scheduler drives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from broker.clock import Clock
from broker.services.base import Drainer, ServiceAdapter, ServiceProbe
from broker.services.comfyui import ComfyUIAdapter
from broker.services.control import GateControl, GateMode, GateStats, Refusal
from broker.services.drain import CommandDrain, NoDrain, SystemdDrain
from broker.services.gate import Gate
from broker.services.ollama import OllamaAdapter
from broker.services.openai import OpenAIAdapter

if TYPE_CHECKING:
    from broker.config import ServiceSection

__all__ = [
    "ComfyUIAdapter",
    "Drainer",
    "Gate",
    "GateControl",
    "GateMode",
    "GateStats",
    "OllamaAdapter",
    "OpenAIAdapter",
    "Refusal",
    "ServiceAdapter",
    "ServiceProbe",
    "build_adapter",
]

_ADAPTERS: dict[str, type[ServiceAdapter]] = {
    "ollama": OllamaAdapter,
    "comfyui": ComfyUIAdapter,
    "openai": OpenAIAdapter,
}


def build_adapter(
    section: ServiceSection,
    clock: Clock,
    *,
    session: aiohttp.ClientSession | None = None,
    poll_interval: float = 1.0,
) -> ServiceAdapter:
    drainer: Drainer | None = None
    if section.drain.startswith("systemd:"):
        drainer = SystemdDrain(section.drain.removeprefix("systemd:"), clock)
    elif section.drain == "none":
        drainer = NoDrain(section.name)
    elif section.drain == "command":
        assert section.drain_command and section.resume_command  # the config checks this
        drainer = CommandDrain(section.drain_command, section.resume_command, clock)
    adapter_class = _ADAPTERS[section.kind]
    return adapter_class(
        section.name,
        section.upstream,
        clock,
        session=session,
        drainer=drainer,
        poll_interval=poll_interval,
    )
