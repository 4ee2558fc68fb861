"""A fake Docker Engine API on a unix socket: just the two read routes gpu-broker uses."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from aiohttp import web


class FakeDocker:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.containers: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    def add(
        self,
        name: str,
        *,
        device_ids: list[str] | None = None,
        count: int | None = None,
        env: list[str] | None = None,
    ) -> str:
        """A running container; `device_ids` / `count` become an nvidia device request."""
        cid = f"{next(self._ids):064x}"
        requests = []
        if device_ids is not None or count is not None:
            requests.append(
                {"Driver": "nvidia", "Count": count or 0, "DeviceIDs": device_ids,
                 "Capabilities": [["gpu"]], "Options": {}}
            )  # fmt: skip
        self.containers[cid] = {
            "Id": cid,
            "Name": f"/{name}",
            "Config": {"Image": "vastai/base", "Env": env or ["PATH=/usr/bin"]},
            "HostConfig": {"Runtime": "runc", "DeviceRequests": requests or None},
            "State": {"Status": "running", "Running": True},
        }
        return cid

    async def start(self) -> None:
        app = web.Application()
        app.add_routes(
            [
                web.get("/containers/json", self._list),
                web.get("/v{version}/containers/json", self._list),
                web.get("/containers/{id}/json", self._inspect),
                web.get("/v{version}/containers/{id}/json", self._inspect),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _list(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        return web.json_response(
            [
                {"Id": cid, "Names": [c["Name"]], "Image": c["Config"]["Image"],
                 "State": "running", "HostConfig": {"NetworkMode": "bridge"}}
                for cid, c in self.containers.items()
            ]
        )  # fmt: skip

    async def _inspect(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        container = self.containers.get(request.match_info["id"])
        if container is None:
            return web.json_response({"message": "No such container"}, status=404)
        return web.json_response(container)
