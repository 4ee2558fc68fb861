"""How the daemon runs its event loop: uvloop when it is there, asyncio's own otherwise.

The gates relay every request a team makes. On asyncio's selector loop, the loop's own
Python (select wrapper, handle queue, transport methods) costs about as much per proxied
request as the gate's work; uvloop does that part in C, which is what brings the gate
under its CPU and streaming targets on a small box (README, "Benchmarks"). Everything in
broker/ is plain asyncio and runs on either loop.

    from broker import runtime
    runtime.run(serve())                  # uvloop if importable, else asyncio

`GPU_BROKER_LOOP=asyncio` (or `uvloop`) in the environment overrides the choice, to rule
the loop in or out when chasing a problem in the field.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopName = Literal["auto", "uvloop", "asyncio"]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]
ENV_VAR = "GPU_BROKER_LOOP"


def loop_factory(name: LoopName | None = None) -> tuple[str, LoopFactory]:
    """The loop to run on, and a factory for it: `name`, else $GPU_BROKER_LOOP, else auto.

    auto picks uvloop when it can be imported; asking for uvloop by name when it cannot
    is an error rather than a silent fallback.
    """
    chosen = name or os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if chosen not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"{ENV_VAR}: expected auto, uvloop or asyncio, got {chosen!r}")
    if chosen != "asyncio":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if chosen == "uvloop":
                raise
        else:
            factory: LoopFactory = uvloop.new_event_loop
            return "uvloop", factory
    return "asyncio", asyncio.new_event_loop


def run(
    main: Coroutine[Any, Any, T], *, loop: LoopName | None = None, debug: bool | None = None
) -> T:
    """Run `main` to completion on a new loop (see `loop_factory`), like `asyncio.run`."""
    try:
        _, factory = loop_factory(loop)
    except BaseException:
        main.close()  # never started: no "was never awaited" warning on top of the error
        raise
    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)
