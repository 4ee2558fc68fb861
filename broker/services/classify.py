"""Which requests are inference (demand for the GPUs) and which are management.

SPEC section 8: only inference is ever held. Model lists, `/api/ps`, `/queue`, health
checks and the like must pass at once in every state, because front ends such as Open WebUI
poll them with short timeouts and would show the service as down.
"""

from __future__ import annotations

from typing import Literal

ServiceKind = Literal["ollama", "comfyui", "openai"]

_OLLAMA_INFERENCE = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})
_COMFYUI_INFERENCE = frozenset({"/prompt", "/api/prompt"})
# llama.cpp's native routes besides the OpenAI-style /v1/*; each one runs the model.
_LLAMACPP_INFERENCE = frozenset(
    {
        "/completion",
        "/completions",
        "/chat/completions",
        "/embedding",
        "/embeddings",
        "/infill",
        "/rerank",
        "/reranking",
    }
)


def is_inference(kind: ServiceKind, method: str, path: str) -> bool:
    if method != "POST":
        return False
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/")
    if kind == "ollama":
        return path in _OLLAMA_INFERENCE or path.startswith("/v1/")
    if kind == "comfyui":
        return path in _COMFYUI_INFERENCE
    return path.startswith("/v1/") or path in _LLAMACPP_INFERENCE
