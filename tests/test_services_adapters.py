"""Service adapters against the fake servers: probe, drain, resume; polls on a FakeClock."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Awaitable
from pathlib import Path

import pytest
from aiohttp import web
from fakes.comfyui import FakeComfyUI
from fakes.ollama import FakeOllama

from broker.clock import FakeClock
from broker.config import ServiceSection
from broker.errors import DrainError, ServiceError
from broker.services import (
    ComfyUIAdapter,
    CommandDrain,
    OllamaAdapter,
    OpenAIAdapter,
    SystemdDrain,
    build_adapter,
)
from broker.services.openai import metric_sums


async def drive(clock: FakeClock, work: Awaitable[None], step: float = 1.0) -> None:
    """Run `work`, advancing the fake clock between its polls (real sockets in between)."""
    task = asyncio.ensure_future(work)
    for _ in range(200):
        await asyncio.sleep(0.002)
        if task.done():
            break
        await clock.advance(step)
    await task


async def test_ollama_probe_lists_loaded_models(clock: FakeClock) -> None:
    async with FakeOllama() as fake:
        fake.loaded["llama3.2:1b"] = 1
        adapter = OllamaAdapter("ollama", fake.url, clock)
        try:
            probe = await adapter.probe()
        finally:
            await adapter.aclose()
    assert probe.reachable and probe.busy is None and probe.loaded == ("llama3.2:1b",)


async def test_ollama_drain_unloads_every_model_and_waits_for_ps_to_empty(
    clock: FakeClock,
) -> None:
    async with FakeOllama() as fake:
        fake.loaded.update({"llama3.2:1b": 1, "qwen2.5:0.5b": 1})
        fake.unload_delay_polls = 2  # the runner lingers for two more polls
        adapter = OllamaAdapter("ollama", fake.url, clock, poll_interval=0.5)
        start = clock.monotonic()
        try:
            await drive(clock, adapter.drain(60), step=0.5)
        finally:
            await adapter.aclose()
    unloads = [r.body for r in fake.seen if r.path == "/api/generate"]
    assert {"model": "llama3.2:1b", "keep_alive": 0} in unloads
    assert {"model": "qwen2.5:0.5b", "keep_alive": 0} in unloads
    assert fake.loaded == {}
    assert clock.monotonic() - start >= 1.0  # it polled, on the clock, until empty


async def test_ollama_drain_gives_up_at_the_limit(clock: FakeClock) -> None:
    async with FakeOllama() as fake:
        fake.loaded["llama3.2:1b"] = 1
        fake.unload_delay_polls = 1000
        adapter = OllamaAdapter("ollama", fake.url, clock, poll_interval=1)
        try:
            with pytest.raises(DrainError, match="not reached within 5 s"):
                await drive(clock, adapter.drain(5))
        finally:
            await adapter.aclose()


async def test_unreachable_service_probes_as_down(clock: FakeClock) -> None:
    probe_server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe_server.sockets[0].getsockname()[1]
    probe_server.close()
    await probe_server.wait_closed()
    adapter = OllamaAdapter("ollama", f"http://127.0.0.1:{port}", clock)
    try:
        probe = await adapter.probe()
    finally:
        await adapter.aclose()
    assert not probe.reachable and probe.detail


async def test_draining_a_service_that_is_not_running_unloads_nothing(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens, so no model is loaded: the API drain succeeds at once, and NVML
    (the scheduler's check) decides whether the GPUs are really free."""
    probe_server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe_server.sockets[0].getsockname()[1]
    probe_server.close()
    await probe_server.wait_closed()
    adapter = OllamaAdapter("ollama", f"http://127.0.0.1:{port}", clock)
    caplog.set_level("INFO")
    try:
        await adapter.drain(5)
    finally:
        await adapter.aclose()
    assert "not running" in caplog.text and "nothing to unload" in caplog.text


async def test_comfyui_drain_waits_for_queue_then_frees(clock: FakeClock) -> None:
    async with FakeComfyUI() as fake:
        fake.running.append("p1")
        adapter = ComfyUIAdapter("comfyui", fake.url, clock, poll_interval=1)
        try:
            assert (await adapter.probe()).busy is True
            drain = asyncio.create_task(adapter.drain(60))
            await asyncio.sleep(0.01)
            await clock.advance(1)
            assert not drain.done() and fake.free_calls == []  # queue not empty yet
            await fake.finish()
            await drive(clock, drain)
            assert (await adapter.probe()).busy is False
        finally:
            await adapter.aclose()
    assert fake.free_calls == [{"unload_models": True, "free_memory": True}]
    assert fake.torch_reserved == 0


async def _metrics_server(
    text: str, slots: object | None, calls: list[str] | None = None
) -> web.AppRunner:
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=text)

    async def slots_route(request: web.Request) -> web.Response:
        if slots is None:
            return web.Response(status=501, text="This server does not support slots")
        return web.json_response(slots)

    async def sleep(request: web.Request) -> web.Response:
        if calls is not None:
            calls.append(f"sleep level={request.query.get('level')}")
        return web.Response()

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/slots", slots_route)
    app.router.add_post("/sleep", sleep)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def test_metric_sums_add_up_label_sets() -> None:
    text = (
        "# HELP vllm:num_requests_running x\n"
        'vllm:num_requests_running{model_name="a"} 2.0\n'
        'vllm:num_requests_running{model_name="b"} 1.0\n'
        "vllm:num_requests_waiting 0\n"
    )
    assert metric_sums(text, ("vllm:num_requests_running", "vllm:num_requests_waiting")) == {
        "vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 0.0}  # fmt: skip


async def test_openai_llamacpp_slots_and_vllm_metrics(clock: FakeClock) -> None:
    llama = await _metrics_server("", [{"id": 0, "is_processing": True}])
    calls: list[str] = []
    vllm = await _metrics_server(
        "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n", None, calls
    )
    try:
        a = OpenAIAdapter("llama", f"http://127.0.0.1:{llama.addresses[0][1]}", clock)
        b = OpenAIAdapter("vllm", f"http://127.0.0.1:{vllm.addresses[0][1]}", clock)
        try:
            assert (await a.probe()).busy is True
            assert (await b.probe()).busy is False
            await b.drain(10)  # idle: straight to sleep mode
        finally:
            await a.aclose()
            await b.aclose()
        assert calls == ["sleep level=1"]
    finally:
        await llama.cleanup()
        await vllm.cleanup()


async def test_command_drain_runs_the_shell_and_reports_failure(
    clock: FakeClock, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    ok = CommandDrain(f"echo stop >> {log}", f"echo start >> {log}", clock)
    await ok.drain(30)
    await ok.resume()
    assert log.read_text() == "stop\nstart\n"
    bad = CommandDrain("echo cannot stop >&2; exit 3", "true", clock)
    with pytest.raises(DrainError, match="exit status 3: cannot stop"):
        await bad.drain(30)


async def test_command_drain_that_hangs_is_killed_at_the_limit(clock: FakeClock) -> None:
    hung = CommandDrain("sleep 30", "true", clock)
    task = asyncio.create_task(hung.drain(5))
    await asyncio.sleep(0.05)  # let the shell start
    await clock.advance(5)
    with pytest.raises(DrainError, match="still running after 5 s"):
        await task


async def test_systemd_drain_calls_systemctl(clock: FakeClock, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" != start ] || exit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    drain = SystemdDrain("ollama.service", clock, systemctl=str(fake))
    await drain.drain(30)
    with pytest.raises(ServiceError, match=r"systemctl start ollama\.service"):
        await drain.resume()
    assert calls.read_text() == "stop ollama.service\nstart ollama.service\n"


async def test_build_adapter_picks_kind_and_drain(clock: FakeClock) -> None:
    section = ServiceSection(name="img", kind="comfyui", upstream="http://127.0.0.1:8188",
                             drain="systemd:comfyui.service")  # fmt: skip
    adapter = build_adapter(section, clock)
    assert isinstance(adapter, ComfyUIAdapter)
    assert isinstance(adapter._drainer, SystemdDrain) and adapter._drainer.unit == "comfyui.service"
    await adapter.aclose()
