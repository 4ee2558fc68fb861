"""ComfyUI: /queue for activity, POST /free to unload, /system_stats to watch VRAM."""

from __future__ import annotations

from typing import Any

from broker.services.base import ServiceAdapter, ServiceProbe

# What torch may keep reserved after /free and still count as drained; the CUDA context
# itself is not visible here and is left to the scheduler's NVML check.
IDLE_RESERVED_BYTES = 512 * 1024 * 1024


class ComfyUIAdapter(ServiceAdapter):
    kind = "comfyui"

    async def _busy(self) -> bool:
        queue: Any = await self._get_json("/queue")
        if not isinstance(queue, dict):
            raise ValueError(f"GET /queue: unexpected answer {queue!r:.120}")
        return bool(queue.get("queue_running") or queue.get("queue_pending"))

    async def _reserved_bytes(self) -> int:
        stats: Any = await self._get_json("/system_stats")
        return sum(int(d.get("torch_vram_total") or 0) for d in stats.get("devices") or [])

    async def _probe(self) -> ServiceProbe:
        return ServiceProbe(reachable=True, busy=await self._busy())

    async def _drain_api(self, limit_s: float) -> None:
        deadline = self._clock.monotonic() + limit_s

        async def queue_empty() -> bool:
            return not await self._busy()

        async def memory_freed() -> bool:
            return await self._reserved_bytes() <= IDLE_RESERVED_BYTES

        await self._wait_until(queue_empty, limit_s, "an empty queue")
        # /free answers at once and acts after the running prompt, so poll what it freed.
        await self._post_json("/free", {"unload_models": True, "free_memory": True})
        left = max(0.0, deadline - self._clock.monotonic())
        await self._wait_until(memory_freed, left, "torch VRAM released (/system_stats)")
