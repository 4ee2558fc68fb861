"""The one small interface every service adapter implements.

An adapter answers two questions for the scheduler, "can I reach it?" and "is it working?",
and does two things, drain (free the GPUs) and resume. How to drain is either the service's
own API or, when configured, a systemd unit or a pair of shell commands (see drain.py).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import aiohttp

from broker.clock import Clock
from broker.errors import DrainError, ServiceError
from broker.services.classify import ServiceKind

log = logging.getLogger(__name__)

# Each call to a local service is small; one that takes longer means the service is stuck.
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True, slots=True)
class ServiceProbe:
    reachable: bool
    busy: bool | None  # work running or queued; None when the service cannot tell
    loaded: tuple[str, ...] = ()  # models it holds in memory, where it says
    detail: str | None = None  # why it is unreachable, in the service's words


class Drainer(Protocol):
    """Stops a service's use of the GPUs and starts it again."""

    async def drain(self, limit_s: float) -> None: ...

    async def resume(self) -> None: ...


class ServiceAdapter(ABC):
    kind: ClassVar[ServiceKind]

    def __init__(
        self,
        name: str,
        base_url: str,
        clock: Clock,
        *,
        session: aiohttp.ClientSession | None = None,
        drainer: Drainer | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._clock = clock
        self._session = session
        self._own_session = session is None
        self._drainer = drainer
        self.poll_interval = poll_interval

    # ---- the interface
    async def probe(self) -> ServiceProbe:
        """Reachability and activity; never raises for a service that is down."""
        try:
            return await self._probe()
        except (aiohttp.ClientError, TimeoutError, ServiceError, ValueError) as err:
            return ServiceProbe(reachable=False, busy=None, detail=str(err) or type(err).__name__)
        except Exception as err:  # an answer of a shape nobody expected: unknown, not fatal
            log.debug("service %s: probe failed", self.name, exc_info=True)
            return ServiceProbe(
                reachable=False, busy=None, detail=f"unexpected answer: {type(err).__name__}: {err}"
            )

    async def drain(self, limit_s: float) -> None:
        """Free the GPUs within `limit_s` seconds, or raise DrainError."""
        log.info("service %s: draining", self.name)
        try:
            if self._drainer is not None:
                await self._drainer.drain(limit_s)
            else:
                await self._drain_api(limit_s)
        except aiohttp.ClientConnectorError as err:
            # Nothing listens: a service that is not running holds no models. Whether
            # anything still holds the GPUs is for NVML to say (the scheduler verifies).
            log.info("service %s: not running (%s), nothing to unload", self.name, err)
            return
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise DrainError(f"service {self.name}: drain failed: {err}") from err
        log.info("service %s: drained", self.name)

    async def resume(self) -> None:
        """Undo drain(): start the service again where it was stopped."""
        try:
            if self._drainer is not None:
                await self._drainer.resume()
            else:
                await self._resume_api()
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise ServiceError(f"service {self.name}: resume failed: {err}") from err
        log.info("service %s: resumed", self.name)

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # ---- for each kind
    @abstractmethod
    async def _probe(self) -> ServiceProbe: ...

    @abstractmethod
    async def _drain_api(self, limit_s: float) -> None: ...

    async def _resume_api(self) -> None:  # noqa: B027 - a default, not an abstract hook
        """Most services load models again on the next request: nothing to do."""

    # ---- helpers
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_REQUEST_TIMEOUT)
        return self._session

    async def _get_json(self, path: str) -> Any:
        async with self._http().get(self.base_url + path) as response:
            await _raise_for_status(response)
            return await response.json(content_type=None)

    async def _get_text(self, path: str) -> tuple[int, str]:
        async with self._http().get(self.base_url + path) as response:
            return response.status, await response.text()

    async def _post_json(self, path: str, body: object) -> Any:
        async with self._http().post(self.base_url + path, json=body) as response:
            await _raise_for_status(response)
            text = await response.text()
            return text

    async def _wait_until(
        self, done: Callable[[], Awaitable[bool]], limit_s: float, what: str
    ) -> None:
        """Poll `done()` every poll_interval on the Clock until true or `limit_s` passes."""
        deadline = self._clock.monotonic() + limit_s
        while not await done():
            left = deadline - self._clock.monotonic()
            if left <= 0:
                raise DrainError(f"service {self.name}: {what} not reached within {limit_s:g} s")
            await self._clock.sleep(min(self.poll_interval, left))


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status >= 400:
        text = (await response.text())[:200]
        raise ServiceError(f"{response.method} {response.url.path}: HTTP {response.status} {text}")
