"""OpenAI-compatible servers: llama.cpp (`/slots`, `/metrics`) and vLLM (`/metrics`).

Neither can say "unload now" the way Ollama can: llama.cpp frees memory on its own with
`--sleep-idle-seconds`, vLLM only through sleep mode (`POST /sleep`, `/wake_up`) when
started with it. Otherwise use `drain = "systemd:UNIT"` or `"command"`.
"""

from __future__ import annotations

from typing import Any

from broker.services.base import ServiceAdapter, ServiceProbe

_BUSY_METRICS = (
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)


def metric_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum each named metric over its label sets in Prometheus text format."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        if name in names:
            try:
                sums[name] = sums.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return sums


class OpenAIAdapter(ServiceAdapter):
    kind = "openai"

    async def _metrics(self) -> dict[str, float] | None:
        status, text = await self._get_text("/metrics")
        if status != 200:
            return None
        return metric_sums(text, _BUSY_METRICS)

    async def _busy(self) -> tuple[bool | None, bool]:
        """(busy, is_vllm)."""
        status, _ = await self._get_text("/slots")
        if status == 200:
            slots: Any = await self._get_json("/slots")
            if isinstance(slots, list) and all(isinstance(s, dict) for s in slots):
                return any(s.get("is_processing") for s in slots), False
            # Not llama.cpp's list of slots (another server answers /slots its own way):
            # whether it works cannot be told from it; fall through to /metrics.
        metrics = await self._metrics()
        if metrics:
            is_vllm = any(k.startswith("vllm:") for k in metrics)
            return any(v > 0 for v in metrics.values()), is_vllm
        await self._get_json("/v1/models")  # reachable, but it cannot say whether it works
        return None, False

    async def _probe(self) -> ServiceProbe:
        busy, _ = await self._busy()
        return ServiceProbe(reachable=True, busy=busy)

    async def _drain_api(self, limit_s: float) -> None:
        is_vllm = False

        async def idle() -> bool:
            nonlocal is_vllm
            busy, is_vllm = await self._busy()
            return busy is not True

        await self._wait_until(idle, limit_s, "no request processing")
        if is_vllm:
            await self._post_json("/sleep?level=1", {})

    async def _resume_api(self) -> None:
        _, is_vllm = await self._busy()
        if is_vllm:
            await self._post_json("/wake_up", {})
