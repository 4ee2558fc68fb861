"""A fake ComfyUI that speaks its HTTP and websocket protocol (server.py routes).

Every route also exists under /api/. POST /prompt queues a prompt and reports progress to
the websocket of the submitting `client_id`; `finish()` completes the running prompt. The
VRAM torch holds drops only when /free was asked for and no prompt is running, as in the
real server.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

GIB = 1024**3


@dataclass
class FakeComfyUI:
    running: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    torch_reserved: int = 6 * GIB
    free_calls: list[dict[str, Any]] = field(default_factory=list)
    sockets: dict[str, web.WebSocketResponse] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # prompt_id -> client_id
    prompts: dict[str, dict[str, Any]] = field(default_factory=dict)  # prompt_id -> nodes
    _free_asked: bool = False
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> str:
        app = web.Application()
        for prefix in ("", "/api"):
            app.router.add_get(prefix + "/queue", self._queue)
            app.router.add_get(prefix + "/prompt", self._prompt_info)
            app.router.add_post(prefix + "/prompt", self._prompt)
            app.router.add_get(prefix + "/system_stats", self._system_stats)
            app.router.add_post(prefix + "/free", self._free)
            app.router.add_get(prefix + "/ws", self._ws)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        for ws in list(self.sockets.values()):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeComfyUI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def finish(self) -> None:
        """The running prompt completes; the next pending one starts."""
        prompt_id = self.running.pop(0)
        await self._event(prompt_id, "executing", {"node": None, "prompt_id": prompt_id})
        if self.pending:
            self.running.append(self.pending.pop(0))
        self._apply_free()
        await self._broadcast_status()

    def _apply_free(self) -> None:
        if self._free_asked and not self.running:
            self.torch_reserved = 0
            self._free_asked = False

    def _queue_remaining(self) -> int:
        return len(self.running) + len(self.pending)

    async def _event(self, prompt_id: str, kind: str, data: dict[str, Any]) -> None:
        ws = self.sockets.get(self.owners.get(prompt_id, ""))
        if ws is not None and not ws.closed:
            await ws.send_json({"type": kind, "data": data})

    async def _broadcast_status(self) -> None:
        status = {"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": self._queue_remaining()}}}}  # fmt: skip
        for ws in list(self.sockets.values()):
            if not ws.closed:
                await ws.send_json(status)

    async def _queue(self, request: web.Request) -> web.Response:
        def row(n: int, pid: str) -> list[Any]:
            return [n, pid, self.prompts.get(pid, {}), {"client_id": self.owners.get(pid)}, []]

        return web.json_response({
            "queue_running": [row(i, p) for i, p in enumerate(self.running)],
            "queue_pending": [row(i, p) for i, p in enumerate(self.pending)]})  # fmt: skip

    async def _prompt_info(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self._queue_remaining()}})

    async def _prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body.get("prompt"), dict):
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "",
                     "extra_info": {}}  # fmt: skip
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt_id = str(uuid.uuid4())
        self.prompts[prompt_id] = body["prompt"]
        if body.get("client_id"):
            self.owners[prompt_id] = body["client_id"]
        (self.pending if self.running else self.running).append(prompt_id)
        await self._broadcast_status()
        await self._event(prompt_id, "execution_start", {"prompt_id": prompt_id})
        return web.json_response({"prompt_id": prompt_id, "number": len(self.owners),
                                  "node_errors": {}})  # fmt: skip

    async def _system_stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "system": {"os": "posix", "python_version": "3.11.7", "comfyui_version": "0.3.60"},
            "devices": [{"name": "cuda:0 NVIDIA GeForce RTX 3090", "type": "cuda", "index": 0,
                         "vram_total": 24 * GIB, "vram_free": 24 * GIB - self.torch_reserved,
                         "torch_vram_total": self.torch_reserved,
                         "torch_vram_free": 0}]})  # fmt: skip

    async def _free(self, request: web.Request) -> web.Response:
        self.free_calls.append(await request.json())
        self._free_asked = True
        self._apply_free()
        return web.Response(status=200)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        self.sockets[client_id] = ws
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": self._queue_remaining()}}, "sid": client_id}})  # fmt: skip
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and msg.data == "ping":
                    await ws.send_str("pong")  # not ComfyUI's; lets tests check both ways
        finally:
            self.sockets.pop(client_id, None)
        await asyncio.sleep(0)
        return ws
