"""One `gpu-broker run` per state directory: an exclusive lock taken before anything else.

Two brokers on one ledger would both reconcile, withdraw each other's offer and count the
same energy twice. The lock is `flock` on `STATE_DIR/gpu-broker.lock`, which the kernel
drops when the process dies however it dies (SIGKILL, power cut), so a crashed run never
leaves a stale lock behind; the file holds the owner's pid only to name it in the error.
A ledger in a database would take its own lock here too (an advisory lock on the server).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from broker.errors import BrokerError

LOCK_FILE = "gpu-broker.lock"


class InstanceLocked(BrokerError):
    """Another gpu-broker holds the state directory."""


def make_private_dir(path: Path) -> None:
    """Create `path` (and its parents) with mode 0700 whatever the umask; an existing
    directory is left as it is (its owner may have opened it on purpose)."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # the umask may have taken bits from mkdir's mode


class InstanceLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> InstanceLock:
        """Take the lock or raise `InstanceLocked` naming the holder; touches nothing else."""
        state_dir = state_dir.expanduser()
        try:
            make_private_dir(state_dir)
            path = state_dir / LOCK_FILE
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise BrokerError(f"broker.state_dir: cannot use {state_dir}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "pid unknown"
            raise InstanceLocked(f"another gpu-broker ({who}) is using {state_dir}") from None
        except OSError as err:
            os.close(fd)
            raise BrokerError(f"broker.state_dir: cannot lock {path}: {err.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        # Emptied, not removed: removing it would let a third process lock a new file
        # while a second one still waits on the old one.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
