"""A fake Ollama server that speaks Ollama's wire protocol (docs/api.md), for gate tests.

Like the real server it answers 403 to a Host that is not a loopback name, streams NDJSON
with headers sent alongside the first chunk, ends /v1 SSE streams with `data: [DONE]`, loads
a model on inference and unloads it on `keep_alive: 0`. Tests can pause every stream after
its first chunk (`pause_streams`) to observe a gate mid-stream.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODELS = ["llama3.2:1b", "qwen2.5:0.5b"]
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0"}
_CREATED = "2026-11-25T12:00:00.000000000Z"


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": _CREATED,
        "size": 1321098329,
        "digest": "baf6a787fdffd633537aa2eb51cfd54cb93ff08e28040095462bb63daf552878",
        "details": {"parent_model": "", "format": "gguf", "family": "llama",
                    "families": ["llama"], "parameter_size": "1.2B",
                    "quantization_level": "Q8_0"},
    }  # fmt: skip


@dataclass
class SeenRequest:
    method: str
    path: str
    host: str
    body: Any


@dataclass
class FakeOllama:
    chunks: int = 3
    loaded: dict[str, int] = field(default_factory=dict)  # model -> requests that use it
    seen: list[SeenRequest] = field(default_factory=list)
    pause_streams: asyncio.Event | None = None  # set: streams go on past their first chunk
    streams_started: int = 0
    streams_cancelled: int = 0  # the client (or gate) went away mid-stream
    unload_delay_polls: int = 0  # /api/ps keeps listing an unloaded model this many times
    _unloading: dict[str, int] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/embed", self._embed)
        app.router.add_post("/api/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._v1_models)
        app.router.add_post("/v1/chat/completions", self._v1_chat)
        app.router.add_post("/v1/embeddings", self._v1_embeddings)
        app.middlewares.append(self._host_check)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- middleware: Ollama's loopback Host check, and a log of what arrived
    @web.middleware
    async def _host_check(self, request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        body = None
        if request.method == "POST" and request.can_read_body:
            body = json.loads(await request.read() or b"null")
        self.seen.append(SeenRequest(request.method, request.path, host, body))
        if name not in _LOCAL_HOSTS:
            return web.Response(status=403)
        return await handler(request)  # type: ignore[no-any-return]

    # ---- management
    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [_model_entry(m) for m in MODELS]})

    async def _ps(self, request: web.Request) -> web.Response:
        names = list(self.loaded)
        for name, polls in list(self._unloading.items()):
            if polls <= 0:
                del self._unloading[name]
                self.loaded.pop(name, None)
                names.remove(name)
            else:
                self._unloading[name] = polls - 1
        models = [
            {**_model_entry(n), "size_vram": 1321098329, "expires_at": _CREATED,
             "context_length": 4096}
            for n in names
        ]  # fmt: skip
        return web.json_response({"models": models})

    async def _v1_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1764072000, "owned_by": "library"}
                for m in MODELS]  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    # ---- inference
    def _body(self) -> Any:
        return self.seen[-1].body or {}

    def _model(self, body: dict[str, Any]) -> str | None:
        model = body.get("model")
        return model if model in MODELS else None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = self._body()
        model = self._model(body)
        if model is None:
            return web.json_response({"error": f"model '{body.get('model')}' not found"},
                                     status=404)  # fmt: skip
        if body.get("keep_alive") == 0 and not body.get("prompt"):
            self._unloading.setdefault(model, self.unload_delay_polls)
            return web.json_response({"model": model, "created_at": _CREATED, "response": "",
                                      "done": True, "done_reason": "unload"})  # fmt: skip
        return await self._answer(request, body, model, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = self._body()
        model = self._model(body)
        if model is None:
            return web.json_response({"error": "model not found"}, status=404)
        return await self._answer(request, body, model, chat=True)

    async def _answer(
        self, request: web.Request, body: dict[str, Any], model: str, *, chat: bool
    ) -> web.StreamResponse:
        self.loaded[model] = self.loaded.get(model, 0) + 1
        words = [f"tok{i} " for i in range(self.chunks)]

        def piece(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": _CREATED, "done": done}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            if done:
                out.update(done_reason="stop", total_duration=1000, load_duration=10,
                           prompt_eval_count=3, prompt_eval_duration=100,
                           eval_count=len(words), eval_duration=800)  # fmt: skip
            return out

        if body.get("stream") is False:
            return web.json_response(piece("".join(words), True))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        self.streams_started += 1
        try:
            await response.prepare(request)
            for i, word in enumerate(words):
                await response.write(json.dumps(piece(word, False)).encode() + b"\n")
                if i == 0 and self.pause_streams is not None:
                    await self.pause_streams.wait()
                else:
                    await asyncio.sleep(0)
            await response.write(json.dumps(piece("", True)).encode() + b"\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.streams_cancelled += 1
            raise
        return response

    async def _embed(self, request: web.Request) -> web.Response:
        body = self._body()
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        return web.json_response({"model": body.get("model"),
                                  "embeddings": [[0.1, 0.2, 0.3]] * count})  # fmt: skip

    async def _embeddings(self, request: web.Request) -> web.Response:
        return web.json_response({"embedding": [0.1, 0.2, 0.3]})

    async def _v1_chat(self, request: web.Request) -> web.StreamResponse:
        body = self._body()
        model = body.get("model")
        if model not in MODELS:
            return web.json_response({"error": {"message": f"model '{model}' not found",
                                                "type": "api_error", "param": None,
                                                "code": None}}, status=404)  # fmt: skip
        words = [f"tok{i} " for i in range(self.chunks)]
        base = {"id": "chatcmpl-1", "created": 1764072000, "model": model,
                "system_fingerprint": "fp_ollama"}  # fmt: skip
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                 "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": len(words),
                          "total_tokens": 3 + len(words)}})  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def event(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        for word in words:
            await response.write(event({"role": "assistant", "content": word}, None))
        await response.write(event({"role": "assistant", "content": ""}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _v1_embeddings(self, request: web.Request) -> web.Response:
        body = self._body()
        return web.json_response({"object": "list", "model": body.get("model"), "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}})  # fmt: skip
