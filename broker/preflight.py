"""What `check` and `run` both verify before anything is touched, so `check` passing means
`run` starts: the GPUs the services name exist, every listening address is free, and no
other gpu-broker owns the state directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from broker.config import Config
from broker.errors import BrokerError
from broker.instance_lock import LOCK_FILE
from broker.listeners import reserve

GATE_HINT = (
    " (if the service itself still listens there, move it, e.g. "
    "OLLAMA_HOST=127.0.0.1:11435, and point upstream at it)"
)


def gpu_index_problems(config: Config, found: Iterable[int]) -> list[str]:
    """One line per service GPU index the backend did not find."""
    present = sorted(set(found))
    shown = ", ".join(str(i) for i in present) or "none"
    return [
        f"services[{i}].gpus: GPU {gpu} does not exist (GPUs found: {shown})"
        for i, service in enumerate(config.services)
        for gpu in service.gpus
        if gpu not in present
    ]


def listen_addresses(config: Config) -> list[tuple[str, str, str]]:
    """(config key, "host:port", hint) for every address `run` listens on."""
    return [
        *(
            (f"services[{i}].gate_listen", s.gate_listen, GATE_HINT)
            for i, s in enumerate(config.services)
            if s.gate_listen is not None
        ),
        ("broker.api_listen", config.broker.api_listen, ""),
    ]


def listen_problems(addresses: Sequence[tuple[str, str, str]]) -> list[str]:
    """Bind each address the way `run` does and let it go: one line per address that
    cannot be bound (all of them, not only the first)."""
    problems = []
    for address in addresses:
        try:
            reserve([address]).release()
        except BrokerError as error:
            problems.append(str(error))
    return problems


def running_instance(state_dir: Path) -> str | None:
    """Who holds `state_dir`'s instance lock ("pid 1234", "pid unknown"), or None when no
    gpu-broker does. Creates nothing: a state directory that is not there has no broker."""
    path = state_dir.expanduser() / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                if text.isdigit():
                    return f"pid {text}"
            return "pid unknown"
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
