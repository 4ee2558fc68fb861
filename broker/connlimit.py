"""A cap on the connections an aiohttp listener holds, as an aiohttp site.

Without it, ten thousand idle sockets exhaust the file descriptors and the listener stops
answering anyone. Each accepted connection is counted until it closes; one over the cap
gets a short 503 and is closed, and a log line says so (at most one a minute, with the
count), while the connections already held go on as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from aiohttp import web

log = logging.getLogger(__name__)

_REFUSAL_BODY = b'{"error": "too many connections; try again shortly"}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n\r\n" + _REFUSAL_BODY
)
# A refused client's request is read and dropped for this long before the socket closes:
# closing with its bytes unread would send a reset that can destroy the 503 in flight.
_REFUSAL_LINGER_S = 1.0
_LOG_EVERY_S = 60.0


class ConnectionLimit:
    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.open = 0
        self.refused_total = 0
        self._refusing = 0
        self._refused_since_log = 0
        self._logged_at: float | None = None

    def factory(self, inner: Callable[[], asyncio.BaseProtocol]) -> asyncio.BaseProtocol:
        if self.open >= self.limit:
            self._refused()
            return _Refusal(self)
        self.open += 1
        return _Counted(self, cast(asyncio.Protocol, inner()))

    def _refused(self) -> None:
        self.refused_total += 1
        self._refused_since_log += 1
        now = asyncio.get_running_loop().time()
        if self._logged_at is None or now - self._logged_at >= _LOG_EVERY_S:
            log.warning(
                "%s: %d connection(s) refused with 503: %d open, the cap is %d",
                self.name, self._refused_since_log, self.open, self.limit,
            )  # fmt: skip
            self._logged_at = now
            self._refused_since_log = 0


class _Counted(asyncio.Protocol):
    """The real protocol, passed every call; counts the connection until it closes."""

    def __init__(self, limit: ConnectionLimit, inner: asyncio.Protocol) -> None:
        self._limit = limit
        self._inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._limit.open -= 1
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Refusal(asyncio.Protocol):
    def __init__(self, limit: ConnectionLimit) -> None:
        self._limit = limit
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        tr.write(_REFUSAL)
        if self._limit._refusing >= self._limit.limit:
            tr.abort()  # a flood: no lingering for these
            return
        self._limit._refusing += 1
        if tr.can_write_eof():
            tr.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_REFUSAL_LINGER_S, tr.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._limit._refusing -= 1


class CappedSite(web.BaseSite):
    """`web.TCPSite` with a `ConnectionLimit` in front of the runner's protocol factory."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, limit: ConnectionLimit
    ) -> None:
        super().__init__(runner, backlog=1024)
        self._host = host
        self._port = port
        self._limit = limit
        self.server: asyncio.Server | None = None

    @property
    def name(self) -> str:
        shown = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{shown}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: self._limit.factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._server = self.server
