"""Pooled keep-alive connections from a gate to its upstream service."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

# A connect guard against an upstream that neither accepts nor refuses (a firewalled
# remote host). It is a socket-level timeout, not a schedule, so it uses the loop's own
# timer rather than the broker's Clock (a FakeClock would never fire it).
CONNECT_TIMEOUT_S = 10.0
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


class UpstreamConnection:
    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        # abort, not close: a half-read response must not be drained before the socket goes
        self.writer.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections, newest first, so the warm ones get reused."""

    def __init__(self, address: UpstreamAddress, *, read_limit: int) -> None:
        self.address = address
        self._read_limit = read_limit
        self._idle: deque[UpstreamConnection] = deque()
        self._ssl = ssl.create_default_context() if address.tls else None

    async def acquire(self) -> UpstreamConnection:
        while self._idle:
            conn = self._idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():
                conn.close()  # the upstream closed it while idle
                continue
            conn.reused = True
            return conn
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                self.address.host,
                self.address.port,
                ssl=self._ssl,
                limit=self._read_limit,
            )
        return UpstreamConnection(reader, writer)

    def release(self, conn: UpstreamConnection) -> None:
        if len(self._idle) >= _MAX_IDLE or conn.writer.is_closing():
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
