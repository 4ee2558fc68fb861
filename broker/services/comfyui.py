"""ComfyUI: /queue for activity, POST /free to unload, /system_stats to watch VRAM."""

from __future__ import annotations

from typing import Any

from broker.services.base import ServiceAdapter, ServiceProbe

# What torch may keep reserved after /free and still count as drained; the CUDA context
# itself is not visible here and is left to the scheduler's NVML check.
IDLE_RESERVED_BYTES = 512 * 1024 * 1024

# Inputs of the loader nodes that name the model a prompt loads into VRAM
# (CheckpointLoaderSimple, CheckpointLoader, UNETLoader); LoRAs and VAEs ride along.
_MODEL_INPUTS = ("ckpt_name", "unet_name")


def prompt_models(entry: Any) -> tuple[str, ...]:
    """The models a `/queue` row's prompt loads: `[number, prompt_id, prompt, extra, outputs]`,
    the prompt a map of node id to `{"class_type", "inputs"}`."""
    prompt = entry[2] if isinstance(entry, list) and len(entry) > 2 else None
    if not isinstance(prompt, dict):
        return ()
    names: set[str] = set()
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            names.update(str(inputs[k]) for k in _MODEL_INPUTS if isinstance(inputs.get(k), str))
    return tuple(sorted(names))


class ComfyUIAdapter(ServiceAdapter):
    kind = "comfyui"
    # The models of the last prompt seen running: ComfyUI keeps them loaded after it ends
    # (until /free or another prompt's models push them out).
    _last_models: tuple[str, ...] = ()

    async def _queue(self) -> dict[str, Any]:
        queue: Any = await self._get_json("/queue")
        if not isinstance(queue, dict):
            raise ValueError(f"GET /queue: unexpected answer {queue!r:.120}")
        return queue

    async def _busy(self) -> bool:
        queue = await self._queue()
        return bool(queue.get("queue_running") or queue.get("queue_pending"))

    async def _reserved_bytes(self) -> int:
        stats: Any = await self._get_json("/system_stats")
        return sum(int(d.get("torch_vram_total") or 0) for d in stats.get("devices") or [])

    async def _probe(self) -> ServiceProbe:
        queue = await self._queue()
        running = queue.get("queue_running") or []
        for entry in running if isinstance(running, list) else []:
            models = prompt_models(entry)
            if models:
                self._last_models = models
        busy = bool(running or queue.get("queue_pending"))
        return ServiceProbe(reachable=True, busy=busy, loaded=self._last_models)

    async def _drain_api(self, limit_s: float) -> None:
        deadline = self._clock.monotonic() + limit_s

        async def queue_empty() -> bool:
            return not await self._busy()

        async def memory_freed() -> bool:
            return await self._reserved_bytes() <= IDLE_RESERVED_BYTES

        await self._wait_until(queue_empty, limit_s, "an empty queue")
        # /free answers at once and acts after the running prompt, so poll what it freed.
        await self._post_json("/free", {"unload_models": True, "free_memory": True})
        self._last_models = ()  # the next prompt loads its models again
        left = max(0.0, deadline - self._clock.monotonic())
        await self._wait_until(memory_freed, left, "torch VRAM released (/system_stats)")
