"""The quick demo touches nothing it did not start: its upstream is on a port no inference
server uses, and it never drains (unloads or stops) what answers there."""

from __future__ import annotations

from pathlib import Path

from fakes.ollama import FakeOllama

from broker.clock import FakeClock
from broker.config import load_config
from broker.services import build_adapter
from broker.units import parse_hostport

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "quick-demo.toml"

# Default ports of the servers a demo user may run: Ollama, ComfyUI, vLLM, llama.cpp /
# Open WebUI, LM Studio, text-generation-webui, Gradio (A1111), KoboldCpp, LocalAI.
TAKEN = {11434, 8188, 8000, 8080, 1234, 5000, 7860, 5001, 3000}


def test_the_demo_forwards_to_a_port_nobody_uses_and_never_drains() -> None:
    config = load_config(DEMO)
    assert config.services
    for service in config.services:
        _, port = parse_hostport(service.upstream.split("://", 1)[1])
        assert port not in TAKEN, service.upstream
        assert service.drain == "none"


async def test_a_demo_drain_leaves_a_real_service_that_answers_alone(
    fake_ollama: FakeOllama,
) -> None:
    # Something answers on the demo's upstream with a model loaded: draining must not
    # unload it (the real Ollama the issue saw unloaded every cycle).
    section = load_config(DEMO).services[0].model_copy(update={"upstream": fake_ollama.url})
    fake_ollama.loaded["llama3.2:1b"] = 0
    adapter = build_adapter(section, FakeClock())
    try:
        await adapter.drain(30.0)
        await adapter.resume()
    finally:
        await adapter.aclose()
    assert "llama3.2:1b" in fake_ollama.loaded
    assert not [r for r in fake_ollama.seen if r.method == "POST"], fake_ollama.seen
