"""broker.runtime: the loop the daemon runs on."""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType

import pytest

from broker import runtime


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_run_returns_the_result_on_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert runtime.run(_loop_module()).startswith("uvloop")
    assert runtime.loop_factory()[0] == "uvloop"


def test_asyncio_by_name_or_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.run(_loop_module(), loop="asyncio").startswith("asyncio")
    monkeypatch.setenv(runtime.ENV_VAR, "asyncio")
    assert runtime.run(_loop_module()).startswith("asyncio")
    monkeypatch.setenv(runtime.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="GPU_BROKER_LOOP"):
        runtime.run(_loop_module())


def test_without_uvloop_auto_falls_back_and_asking_for_it_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.import_module

    def no_uvloop(name: str, package: str | None = None) -> ModuleType:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_uvloop)
    assert runtime.loop_factory()[0] == "asyncio"
    assert runtime.run(_loop_module()).startswith("asyncio")
    with pytest.raises(ImportError):
        runtime.loop_factory("uvloop")


def test_an_exception_in_main_propagates_and_the_loop_is_closed() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def boom() -> None:
        seen.append(asyncio.get_running_loop())
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        runtime.run(boom())
    assert seen[0].is_closed()
