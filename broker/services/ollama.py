"""Ollama: models listed by /api/ps, unloaded with `keep_alive: 0` (FACTS.md, Ollama)."""

from __future__ import annotations

from typing import Any

from broker.services.base import ServiceAdapter, ServiceProbe


class OllamaAdapter(ServiceAdapter):
    kind = "ollama"

    async def _loaded(self) -> list[str]:
        answer: Any = await self._get_json("/api/ps")
        models = answer.get("models") if isinstance(answer, dict) else False
        if not isinstance(models, list | None):
            raise ValueError(f"GET /api/ps: unexpected answer {answer!r:.120}")
        return [
            str(m.get("name") or m.get("model")) if isinstance(m, dict) else str(m)
            for m in models or []
        ]

    async def _probe(self) -> ServiceProbe:
        # Ollama has no in-flight counter anywhere in its API: only the gate knows.
        return ServiceProbe(reachable=True, busy=None, loaded=tuple(await self._loaded()))

    async def _drain_api(self, limit_s: float) -> None:
        async def empty() -> bool:
            loaded = await self._loaded()
            # Asking again for a model already unloading is harmless, and catches a model
            # that a request loaded after the first pass.
            for model in loaded:
                await self._post_json("/api/generate", {"model": model, "keep_alive": 0})
            return not loaded

        # The unload answer comes at once; the runner goes only after in-flight requests end.
        await self._wait_until(empty, limit_s, "no model loaded (/api/ps empty)")
