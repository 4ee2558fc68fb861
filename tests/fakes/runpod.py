"""A fake RunPod GraphQL endpoint (`POST /graphql`) answering the one read query gpu-broker
sends, from state the test sets. RunPod has no host API to list or unlist (FACTS.md), so
there is nothing else to fake.

Faults: `failures` (statuses for the next answers), `garbage`, `answer` (a JSON shape the
client may not expect), `slow` (real seconds; only that request waits).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from aiohttp import web

KEY = "rp-key"


class FakeRunpod:
    def __init__(self) -> None:
        self.machines: list[dict[str, Any]] = [
            {
                "id": "m-1", "listed": True, "gpuTotal": 4, "gpuReserved": 0,
                "hostPricePerGpu": 0.25, "hostMinBidPerGpu": 0.1, "pods": [],
                "machineBalance": {"hostTotalEarnings": 12.5, "hostGpuEarnings": 12.0,
                                   "hostDiskEarnings": 0.5},
                "someNewField": 1,
            }
        ]  # fmt: skip
        self.earnings: list[dict[str, Any]] = [
            {"machineId": "m-1", "date": "2026-11-24T00:00:00Z", "hostTotalEarnings": 3.0},
            {"machineId": "m-1", "date": "2026-11-25", "hostTotalEarnings": 4.5},
            {"machineId": "m-2", "date": "2026-11-25", "hostTotalEarnings": 9.0},
        ]
        self.queries: list[str] = []
        self.failures: list[int] = []
        self.odd_answers: list[str] = []  # raw bodies answered 200 before the real one
        self.stalls: list[float] = []
        self._pod_ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.add_routes([web.post("/graphql", self._graphql)])
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- controls for tests -----------------------------------------------------------

    def add_pod(self, gpus: int = 1, machine: int = 0) -> str:
        """A renter's pod starts on the machine (RunPod shows no end date for it)."""
        row = self.machines[machine]
        pod = f"pod-{next(self._pod_ids)}"
        row["pods"] = [
            *row["pods"],
            {"id": pod, "desiredStatus": "RUNNING", "costPerHr": 0.25 * gpus, "gpuCount": gpus},
        ]
        row["gpuReserved"] = (row.get("gpuReserved") or 0) + gpus
        return pod

    def end_pod(self, pod: str, machine: int = 0) -> None:
        row = self.machines[machine]
        gone = [p for p in row["pods"] if p["id"] == pod]
        row["pods"] = [p for p in row["pods"] if p["id"] != pod]
        row["gpuReserved"] = max(0, row["gpuReserved"] - sum(p["gpuCount"] for p in gone))

    def garbage(self, times: int = 1) -> None:
        self.odd_answers += ["<html><body>502 Bad Gateway</body></html>"] * times

    def answer(self, data: Any, times: int = 1) -> None:
        self.odd_answers += [json.dumps(data)] * times

    def slow(self, seconds: float, times: int = 1) -> None:
        self.stalls += [seconds] * times

    # -- the endpoint -----------------------------------------------------------------

    async def _graphql(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.queries.append(body["query"])
        if self.stalls:
            await asyncio.sleep(self.stalls.pop(0))
        if self.failures:
            return web.Response(status=self.failures.pop(0), text="upstream error")
        if self.odd_answers:
            return web.Response(text=self.odd_answers.pop(0), content_type="application/json")
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response(
                {"errors": [{"message": "Unauthorized request, please check your API key"}]}
            )
        return web.json_response(
            {"data": {"myself": {"machines": self.machines, "machineEarnings": self.earnings}}}
        )
