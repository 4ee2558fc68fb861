"""Pooled keep-alive connections from a gate to its upstream service.

Each connection is an `asyncio.Protocol` that hands what it reads straight to the client
connection that currently owns it (no reader task, no per-chunk future): the gate relays a
streamed answer from inside `data_received`. Flow control is the transports' own: the
owner pauses this connection's reading while the client's send buffer is full, and this
connection tells its owner when its own send buffer fills (a large request body, a tunnel).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

# A connect guard against an upstream that neither accepts nor refuses (a firewalled
# remote host). It is a socket-level timeout, not a schedule, so it uses the loop's own
# timer rather than the broker's Clock (a FakeClock would never fire it).
CONNECT_TIMEOUT_S = 10.0
# Send-buffer size above which a transport asks its producer to pause (low water: a quarter).
HIGH_WATER = 256 * 1024
_MAX_IDLE = 256


@dataclass(frozen=True, slots=True)
class UpstreamAddress:
    host: str
    port: int
    tls: bool
    prefix: bytes  # a path prefix from the upstream URL, prepended to every target
    host_header: bytes  # what the upstream expects in Host (Ollama: a loopback name)

    @classmethod
    def parse(cls, url: str) -> UpstreamAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(
            host=host,
            port=port,
            tls=tls,
            prefix=parts.path.rstrip("/").encode(),
            host_header=f"{shown}:{port}".encode(),
        )


class UpstreamOwner(Protocol):
    """What a connection reports to the exchange using it."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream closed (`exc` None: a clean end of stream) or the socket failed."""
        ...

    def upstream_full(self, full: bool) -> None:
        """This connection's send buffer crossed the high (True) or low (False) mark."""
        ...


class UpstreamConnection(asyncio.Protocol):
    transport: asyncio.Transport

    def __init__(self) -> None:
        self.owner: UpstreamOwner | None = None
        self.reused = False  # served a request before: the upstream may have closed it idle
        self.closed = False
        self._reading = True

    # ---- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_data(data)
        else:
            self.abort()  # an idle connection has nothing to say: do not trust it

    def eof_received(self) -> bool:
        self.closed = True
        owner = self.owner
        if owner is not None:
            owner.upstream_lost(self, None)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        owner = self.owner
        if owner is not None:
            owner.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_full(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_full(False)

    # ---- used by the owner
    def pause(self) -> None:
        if self._reading and not self.closed:
            self._reading = False
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self._reading and not self.closed:
            self._reading = True
            self.transport.resume_reading()

    @property
    def reading(self) -> bool:
        return self._reading

    def abort(self) -> None:
        # abort, not close: a half-read response must not be drained before the socket goes
        self.closed = True
        self.owner = None
        self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections, newest first, so the warm ones get reused."""

    def __init__(self, address: UpstreamAddress) -> None:
        self.address = address
        self._idle: deque[UpstreamConnection] = deque()
        self._ssl = ssl.create_default_context() if address.tls else None

    def take(self) -> UpstreamConnection | None:
        """An idle connection that is still open, or None (then `connect()`)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport.is_closing():
                continue  # the upstream closed it while idle
            conn.reused = True
            return conn
        return None

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, conn = await loop.create_connection(
                UpstreamConnection, self.address.host, self.address.port, ssl=self._ssl
            )
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        conn.owner = None
        if len(self._idle) >= _MAX_IDLE or conn.closed or conn.transport.is_closing():
            conn.abort()
            return
        if not conn._reading:
            conn.resume()  # it was paused for a slow client
        self._idle.append(conn)

    @property
    def idle(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().abort()
