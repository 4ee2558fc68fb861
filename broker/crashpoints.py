"""Named points where the crash tests kill the broker, as a power cut would.

`GPU_BROKER_CRASHPOINT=list:journaled gpu-broker run` makes the process SIGKILL itself the
first time it passes that point, so the tests can restart it against the same ledger and
marketplace and check that it converges. Unset (always, outside the tests), each point is
one string comparison.
"""

from __future__ import annotations

import os
import signal

ENV = "GPU_BROKER_CRASHPOINT"
_ARMED = os.environ.get(ENV) or None


def crashpoint(name: str) -> None:
    if _ARMED is not None and name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
