"""Which GPUs renters hold, read from the local Docker engine (read-only, optional).

Vast runs each renter's container under the host's Docker, named `C.<contract id>`, with
the GPUs in its device requests (or `NVIDIA_VISIBLE_DEVICES`). Vast's own API says how many
GPUs are rented but not which, and the broker hands the others back to local use first, so
it reads them here. Whatever cannot be read stays unknown: a GPU is never guessed free.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import aiohttp

from broker.providers.base import RenterGpus

log = logging.getLogger(__name__)

RENTER_NAME = re.compile(r"^/?C\.(\d+)$")


def contract_id(name: str) -> int | None:
    match = RENTER_NAME.match(name)
    return int(match.group(1)) if match else None


def _claim(inspect: dict[str, Any]) -> tuple[frozenset[str], bool, bool]:
    """(ids, all_gpus, unknown) for one container's inspect document."""
    host = inspect.get("HostConfig") or {}
    for request in host.get("DeviceRequests") or []:
        capabilities = request.get("Capabilities") or []
        if request.get("Driver") not in (None, "", "nvidia") and not any(
            "gpu" in group for group in capabilities
        ):
            continue
        ids = request.get("DeviceIDs") or []
        if ids:
            return frozenset(str(i) for i in ids), False, False
        if request.get("Count") == -1:
            return frozenset(), True, False
        # "Count": N without IDs: N GPUs, but Docker picks which; we cannot name them.
        return frozenset(), False, True
    for entry in (inspect.get("Config") or {}).get("Env") or []:
        key, _, value = str(entry).partition("=")
        if key != "NVIDIA_VISIBLE_DEVICES":
            continue
        value = value.strip()
        if value == "all":
            return frozenset(), True, False
        if value in ("", "none", "void"):
            return frozenset(), False, False
        return frozenset(v.strip() for v in value.split(",") if v.strip()), False, False
    # A renter container that names no GPU at all: maybe a runtime we do not know.
    return frozenset(), False, True


class DockerRenters:
    """Reads renter containers over the Docker unix socket. `snapshot()` never raises."""

    def __init__(self, socket_path: Path, timeout: float = 5.0) -> None:
        self._socket = socket_path
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._warned = False

    async def snapshot(self, exclude: Collection[int] = ()) -> RenterGpus | None:
        """Renter GPUs now, or None when Docker cannot be read (logged once).

        `exclude`: contract ids that are not renters (the host's own self-rental)."""
        try:
            connector = aiohttp.UnixConnector(path=str(self._socket))
            async with aiohttp.ClientSession(
                connector=connector, timeout=self._timeout
            ) as session:
                containers = await self._get(session, "/containers/json")
                ids: set[str] = set()
                all_gpus = unknown = False
                names: list[str] = []
                for container in containers if isinstance(containers, list) else []:
                    name = next(
                        (n for n in container.get("Names") or [] if contract_id(n) is not None),
                        None,
                    )
                    if name is None or contract_id(name) in exclude:
                        continue
                    names.append(name.lstrip("/"))
                    inspect = await self._get(session, f"/containers/{container['Id']}/json")
                    found, every, dunno = _claim(inspect if isinstance(inspect, dict) else {})
                    ids |= found
                    all_gpus |= every
                    unknown |= dunno
        except (OSError, aiohttp.ClientError, TimeoutError, KeyError, ValueError) as error:
            if not self._warned:
                log.warning(
                    "cannot read renter containers from Docker at %s (%s); which GPUs "
                    "renters hold stays unknown",
                    self._socket, error,
                )  # fmt: skip
                self._warned = True
            return None
        if self._warned:
            log.info("reading renter containers from Docker at %s again", self._socket)
            self._warned = False
        return RenterGpus(
            ids=frozenset(ids), all_gpus=all_gpus, unknown=unknown, containers=tuple(names)
        )

    @staticmethod
    async def _get(session: aiohttp.ClientSession, path: str) -> Any:
        # The host part is ignored on a unix socket; "docker" is what the CLI sends.
        async with session.get(f"http://docker{path}") as response:
            response.raise_for_status()
            return await response.json(content_type=None)
