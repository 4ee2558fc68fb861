"""The gate in front of a fake ComfyUI: websocket passthrough and /prompt holding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import aiohttp
import pytest
from fakes.comfyui import FakeComfyUI

from broker.clock import FakeClock
from broker.services.control import GateControl
from broker.services.gate import Gate

PROMPT = {"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}, "client_id": "c1"}


@pytest.fixture
async def comfy() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI() as fake:
        yield fake


@pytest.fixture
async def gate(comfy: FakeComfyUI, clock: FakeClock) -> AsyncIterator[Gate]:
    control = GateControl(clock, name="comfyui", max_hold=timedelta(seconds=10))
    async with Gate(name="comfyui", kind="comfyui", upstream=comfy.url,
                    listen=("127.0.0.1", 0), control=control) as g:  # fmt: skip
        yield g


async def until(condition: object, what: str) -> None:
    for _ in range(500):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


async def test_websocket_passes_both_ways_and_carries_prompt_events(
    gate: Gate, comfy: FakeComfyUI
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(gate.url + "/ws?clientId=c1") as ws,
    ):
        hello = await ws.receive_json()
        assert hello["type"] == "status" and hello["data"]["sid"] == "c1"
        await ws.send_str("ping")
        assert await ws.receive_str() == "pong"
        async with session.post(gate.url + "/api/prompt", json=PROMPT) as r:
            assert r.status == 200
            prompt_id = (await r.json())["prompt_id"]
        kinds = [(await ws.receive_json())["type"] for _ in range(2)]
        assert kinds == ["status", "execution_start"]
        await comfy.finish()
        done = await ws.receive_json()
        assert done == {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}
    await until(lambda: not comfy.sockets, "the upstream websocket to close")


async def test_prompt_is_held_while_queue_and_stats_pass(
    gate: Gate, comfy: FakeComfyUI, clock: FakeClock
) -> None:
    gate.control.guard()
    async with aiohttp.ClientSession() as session:
        post = asyncio.create_task(session.post(gate.url + "/prompt", json=PROMPT))
        await until(lambda: gate.control.held == 1, "the prompt to be held")
        for path in ("/queue", "/api/queue", "/system_stats", "/prompt"):  # GET: management
            async with session.get(gate.url + path) as r:
                assert r.status == 200, path
        assert comfy.running == []  # the prompt has not reached ComfyUI
        gate.control.release()
        async with await post as r:
            assert r.status == 200 and (await r.json())["node_errors"] == {}
    assert len(comfy.running) == 1


async def test_held_prompt_times_out_in_comfyui_error_shape(
    gate: Gate, clock: FakeClock
) -> None:
    gate.control.guard()
    async with aiohttp.ClientSession() as session:
        post = asyncio.create_task(session.post(gate.url + "/api/prompt", json=PROMPT))
        await until(lambda: gate.control.held == 1, "the prompt to be held")
        await clock.advance(10)
        async with await post as r:
            body = await r.json()
            assert r.status == 503 and r.headers["Retry-After"] == "10"
    assert body["node_errors"] == {}
    assert body["error"]["type"] == "gpu_broker"
    assert "being reclaimed" in body["error"]["message"]
