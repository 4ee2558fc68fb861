"""Model loads: the service watchers record what Ollama and ComfyUI load, for sizing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fakes.comfyui import FakeComfyUI
from fakes.ollama import FakeOllama

from broker.clock import FakeClock
from broker.ledger import ModelLoad, SqliteLedger
from broker.scheduling.watchers import ServiceWatch
from broker.services import ComfyUIAdapter, OllamaAdapter
from broker.services.base import ServiceProbe
from broker.services.loads import ModelLoadRecorder, ModelLoadTracker

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def probe(*models: str, reachable: bool = True) -> ServiceProbe:
    return ServiceProbe(reachable=reachable, busy=None, loaded=models)


def test_tracker_counts_models_new_since_the_last_probe_after_a_baseline() -> None:
    tracker = ModelLoadTracker({"ollama": [0, 1]})
    at = [T0 + timedelta(seconds=5 * i) for i in range(6)]
    assert tracker.observe("ollama", probe("llama3"), at[0]) == []  # baseline: unknown when
    assert tracker.observe("ollama", probe("llama3", "qwen"), at[1]) == [
        ModelLoad("ollama", at[1], "qwen", (0, 1))
    ]
    assert tracker.observe("ollama", probe(reachable=False), at[2]) == []  # a blip
    assert tracker.observe("ollama", probe("qwen"), at[3]) == []  # an unload is no load
    assert [x.model for x in tracker.observe("ollama", probe("llama3"), at[4])] == ["llama3"]
    assert tracker.observe("other", probe("x"), at[5]) == []  # another service's baseline


async def test_ollama_loads_reach_the_ledger_through_the_service_watch(
    clock: FakeClock, tmp_path: Path
) -> None:
    ledger = await SqliteLedger.open(tmp_path / "ledger.sqlite3", host="box")
    async with FakeOllama() as fake:
        adapter = OllamaAdapter("ollama", fake.url, clock)
        watch = ServiceWatch(
            [adapter], clock, on_update=lambda: None,
            loads=ModelLoadRecorder(ledger, {"ollama": [1]}),
        )  # fmt: skip
        try:
            fake.loaded["llama3.2:1b"] = 1
            await watch._fetch(False)
            fake.loaded["qwen2.5:7b"] = 1
            await clock.advance(5)
            await watch._fetch(False)
            del fake.loaded["llama3.2:1b"]
            await watch._fetch(False)
        finally:
            await adapter.aclose()
    got = await ledger.model_loads(T0 - timedelta(days=400), clock.now() + timedelta(days=1))
    await ledger.close()
    assert [(r.service, r.model, r.gpus, r.at) for r in got] == [
        ("ollama", "qwen2.5:7b", (1,), clock.now())
    ]


async def test_comfyui_probe_reports_the_checkpoint_of_the_last_prompt_it_ran(
    clock: FakeClock,
) -> None:
    def prompt(ckpt: str) -> dict[str, object]:
        return {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "3": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0]}},
        }

    async with FakeComfyUI() as fake:
        adapter = ComfyUIAdapter("comfyui", fake.url, clock)
        try:
            assert (await adapter.probe()).loaded == ()
            fake.running.append("a")
            fake.prompts["a"] = prompt("sdxl_base.safetensors")
            assert (await adapter.probe()).loaded == ("sdxl_base.safetensors",)
            await fake.finish()
            idle = await adapter.probe()  # still in VRAM after the prompt ends
            assert (idle.busy, idle.loaded) == (False, ("sdxl_base.safetensors",))
            fake.running.append("b")
            fake.prompts["b"] = prompt("flux1-dev.safetensors")
            assert (await adapter.probe()).loaded == ("flux1-dev.safetensors",)
            await fake.finish()
            drain = asyncio.create_task(adapter.drain(60))
            for _ in range(200):  # the drain polls on the fake clock
                await asyncio.sleep(0.002)
                if drain.done():
                    break
                await clock.advance(1)
            await drain
            assert (await adapter.probe()).loaded == ()  # /free unloaded it
        finally:
            await adapter.aclose()
