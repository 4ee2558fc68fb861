"""The gate: a reverse proxy in front of one local service (SPEC section 8).

It must be invisible: bytes are relayed as they arrive (NDJSON and SSE streams chunk by
chunk, websockets after an upgrade), with `Host` rewritten for the upstream (Ollama answers
403 to a non-local Host) and hop-by-hop headers dropped. Only inference requests meet the
`GateControl`; management requests go straight through in every state.

Why asyncio streams and a small HTTP/1.1 framer instead of aiohttp's server and client: the
gate sits on every request a team makes, and aiohttp's request/response objects cost about
0.15 ms of CPU per proxied request on a small box, more than the whole budget
(scripts/bench-gate measures it). Here a request costs one head parse, one upstream write
and a copy loop, and the body is never decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import tzinfo
from typing import TYPE_CHECKING, cast

from broker.clock import Clock
from broker.services.classify import ServiceKind, is_inference
from broker.services.control import GateControl, ReclaimCallback
from broker.services.httpwire import (
    ChunkedScanner,
    HttpFramingError,
    RequestHead,
    ResponseHead,
    build_head,
    parse_request_head,
    parse_response_head,
)
from broker.services.replies import error_response
from broker.services.upstream import UpstreamAddress, UpstreamConnection, UpstreamPool
from broker.units import parse_hostport

if TYPE_CHECKING:
    from broker.config import ServiceSection

log = logging.getLogger(__name__)

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
_PIECE = 64 * 1024  # largest slice relayed per read
_PREREAD_BYTES = 1024 * 1024  # bodies up to this are read whole (one upstream write, retryable)
_HIGH_WATER = 256 * 1024  # wait for the peer to drain only when this much is queued


class _UpstreamFailed(Exception):
    """The upstream broke before the gate sent the client anything: answer 502."""


class _ClientGone(Exception):
    """The client closed its side mid-request."""


class _BodyTooLarge(Exception):
    pass


class _GateProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol that also cancels the request in progress when its client leaves.

    Without this, a client that hangs up while its request is held or mid-stream would only
    be noticed at the next write, and meanwhile keep a held slot or an upstream stream busy.
    """

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._client_reader = asyncio.StreamReader(limit=gate.max_header_bytes)
        super().__init__(self._client_reader)
        self._task: asyncio.Task[None] | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        writer = asyncio.StreamWriter(
            cast(asyncio.Transport, transport), self, self._client_reader, loop
        )
        self._task = loop.create_task(
            self._gate._serve(self._client_reader, writer, self), name=self._gate.task_name
        )
        self._gate._track(self._task)

    def eof_received(self) -> bool:
        super().eof_received()
        self._abandon()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._abandon()

    def _abandon(self) -> None:
        if self.busy and self._task is not None and not self._task.done():
            self._task.cancel()


class Gate:
    """A reverse proxy for one service; `control` is what the scheduler drives."""

    def __init__(
        self,
        *,
        name: str,
        kind: ServiceKind,
        upstream: str,
        listen: str | tuple[str, int],
        control: GateControl,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.name = name
        self.kind: ServiceKind = kind
        self.control = control
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.task_name = f"gate-{name}-connection"
        # a (host, 0) tuple lets tests and the bench take any free port
        self._listen = parse_hostport(listen) if isinstance(listen, str) else listen
        self._upstream = UpstreamAddress.parse(upstream)
        self._upstream_url = upstream
        self._pool = UpstreamPool(self._upstream, read_limit=max_header_bytes)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._host_line = b"Host: " + self._upstream.host_header + b"\r\n"

    @classmethod
    def from_section(
        cls,
        section: ServiceSection,
        clock: Clock,
        *,
        on_reclaim: ReclaimCallback | None = None,
        display_tz: tzinfo | None = None,
    ) -> Gate:
        if section.gate_listen is None:
            raise ValueError(f"service {section.name} has no gate_listen")
        control = GateControl(
            clock,
            name=section.name,
            max_hold=section.max_hold,
            on_reclaim=on_reclaim,
            display_tz=display_tz,
        )
        return cls(
            name=section.name,
            kind=section.kind,
            upstream=section.upstream,
            listen=section.gate_listen,
            control=control,
            max_header_bytes=section.max_header_bytes,
            max_body_bytes=section.max_body_bytes,
        )

    # ---- lifecycle
    async def start(self) -> None:
        host, port = self._listen
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _GateProtocol(self), host, port, backlog=1024, reuse_address=True
        )
        log.info("gate %s: listening on %s, forwarding to %s", self.name, self.url,
                 self._upstream_url)  # fmt: skip

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("gate not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        host = self._listen[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._pool.close()
        await self.control.aclose()

    async def __aenter__(self) -> Gate:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    # ---- one client connection: requests one after another (keep-alive)
    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: _GateProtocol
    ) -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed an idle keep-alive connection
                except asyncio.LimitOverrunError:
                    self._reply(writer, "/", 431, "request head too large", keep_alive=False)
                    return
                try:
                    head = parse_request_head(raw)
                    if not head.target.startswith(b"/"):
                        raise HttpFramingError("only origin-form request targets are served")
                except HttpFramingError as err:
                    self._reply(writer, "/", 400, f"bad request: {err}", keep_alive=False)
                    return
                proto.busy = True
                keep_alive = await self._exchange(head, reader, writer)
                proto.busy = False
                if not keep_alive:
                    return
        except (ConnectionError, _ClientGone):
            pass  # the client went away; its upstream side was closed on the way out
        finally:
            writer.close()

    async def _exchange(
        self, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; true when the client connection can carry another."""
        length = head.content_length
        if length is not None and length > self.max_body_bytes:
            self._reply(writer, head.path, 413, f"request body over {self.max_body_bytes} bytes",
                        keep_alive=False)  # fmt: skip
            return False
        if head.expect_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body: bytes | None  # None: streamed after the head
        if length is not None and length <= _PREREAD_BYTES:
            body = await reader.readexactly(length) if length else b""
        elif length is None and not head.chunked:
            body = b""
        else:
            body = None
        if not is_inference(self.kind, head.method, head.path):
            return await self._forward(head, body, reader, writer)
        control = self.control
        refusal = await control.admit()
        if refusal is not None:
            keep_alive = head.keep_alive and body is not None
            self._reply(writer, head.path, 503, refusal.message, keep_alive=keep_alive,
                        retry_after_s=refusal.retry_after_s)  # fmt: skip
            return keep_alive
        control.request_started()
        try:
            return await self._forward(head, body, reader, writer)
        finally:
            control.request_finished()

    def _reply(
        self,
        writer: asyncio.StreamWriter,
        path: str,
        status: int,
        message: str,
        *,
        keep_alive: bool,
        retry_after_s: int | None = None,
    ) -> None:
        writer.write(error_response(self.kind, path, status, message, keep_alive=keep_alive,
                                    retry_after_s=retry_after_s))  # fmt: skip

    # ---- relaying to the upstream
    def _upstream_head(self, head: RequestHead) -> bytes:
        version = b" HTTP/1.0\r\n" if head.http10 else b" HTTP/1.1\r\n"
        start = head.method.encode() + b" " + self._upstream.prefix + head.target + version
        extra = b""
        if head.upgrade is not None:
            extra = b"Connection: Upgrade\r\nUpgrade: " + head.upgrade + b"\r\n"
        elif head.http10:
            extra = b"Connection: close\r\n"
        parts = [start, self._host_line]
        for name, value in head.headers:
            if name.lower() != b"host":
                parts += (name, b": ", value, b"\r\n")
        parts += (extra, b"\r\n")
        return b"".join(parts)

    async def _forward(
        self,
        head: RequestHead,
        body: bytes | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        request_head = self._upstream_head(head)
        conn: UpstreamConnection | None = None
        try:
            try:
                conn, response, raw = await self._send(head, request_head, body, reader)
            except _BodyTooLarge:
                too_large = f"request body over {self.max_body_bytes} bytes"
                self._reply(writer, head.path, 413, too_large, keep_alive=False)
                return False
            except _UpstreamFailed as err:
                log.warning("gate %s: upstream %s failed: %s", self.name, self._upstream_url, err)
                message = (f"gpu-broker gate: the {self.kind} service at {self._upstream_url} "
                           f"is not answering ({err})")  # fmt: skip
                keep_alive = head.keep_alive and body is not None
                self._reply(writer, head.path, 502, message, keep_alive=keep_alive)
                return keep_alive
            if response.status == 101:
                writer.write(raw)
                await self._tunnel(reader, writer, conn)
                return False
            keep_alive = await self._relay_response(head, response, conn, writer)
            conn = None  # handed back to the pool or closed by _relay_response
            return keep_alive
        finally:
            if conn is not None:
                conn.close()

    async def _send(
        self,
        head: RequestHead,
        request_head: bytes,
        body: bytes | None,
        reader: asyncio.StreamReader,
    ) -> tuple[UpstreamConnection, ResponseHead, bytes]:
        """Send the request; return the connection and the final response head."""
        for attempt in range(2):
            try:
                conn = await (self._pool.acquire() if attempt == 0 else self._pool.connect())
            except (OSError, TimeoutError) as err:
                raise _UpstreamFailed(str(err) or type(err).__name__) from err
            try:
                if body is not None:
                    conn.writer.write(request_head + body)
                else:
                    conn.writer.write(request_head)
                    await self._relay_request_body(head, reader, conn)
                while True:
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
                    response = parse_response_head(raw, request_method=head.method)
                    if response.status == 101 or response.status >= 200:
                        return conn, response, raw
                    # interim answers (103 Early Hints) are not forwarded: the gate already
                    # answered any Expect itself, and clients do not need them
            except asyncio.IncompleteReadError as err:
                conn.close()
                if attempt == 0 and conn.reused and not err.partial and body is not None:
                    continue  # the upstream had just closed this idle connection: retry once
                raise _UpstreamFailed("connection closed before an answer") from err
            except (OSError, HttpFramingError, asyncio.LimitOverrunError) as err:
                conn.close()
                raise _UpstreamFailed(str(err) or type(err).__name__) from err
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    async def _relay_request_body(
        self, head: RequestHead, reader: asyncio.StreamReader, conn: UpstreamConnection
    ) -> None:
        up = conn.writer
        if head.content_length is not None:
            remaining = head.content_length
            while remaining:
                data = await reader.read(min(remaining, _PIECE))
                if not data:
                    raise _ClientGone
                up.write(data)
                remaining -= len(data)
                if up.transport.get_write_buffer_size() > _HIGH_WATER:
                    await up.drain()
            return
        # chunked: read exactly to the end of the body so a pipelined next request stays put
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            up.write(line)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _ClientGone from None  # garbage framing: drop the connection
            if size == 0:
                while line != b"\r\n":  # trailers, then the blank line
                    line = await reader.readuntil(b"\r\n")
                    up.write(line)
                return
            total += size
            if total > self.max_body_bytes:
                raise _BodyTooLarge
            remaining = size + 2
            while remaining:
                data = await reader.read(min(remaining, _PIECE))
                if not data:
                    raise _ClientGone
                up.write(data)
                remaining -= len(data)
            if up.transport.get_write_buffer_size() > _HIGH_WATER:
                await up.drain()

    async def _relay_response(
        self,
        head: RequestHead,
        response: ResponseHead,
        conn: UpstreamConnection,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Copy the response to the client as it arrives; true when both sides stay open."""
        framed = response.chunked or response.content_length is not None
        client_keep = head.keep_alive and framed and not head.http10
        out_head = build_head(response.status_line, response.headers,
                              b"" if client_keep else b"Connection: close\r\n")  # fmt: skip
        upstream_keep = response.keep_alive and framed and not head.http10
        src = conn.reader
        transport = writer.transport
        try:
            length = response.content_length
            if length is not None and length <= _PIECE:
                # small answers arrive with their head: send both in one write
                writer.write(out_head + (await src.readexactly(length) if length else b""))
            elif length is not None:
                writer.write(out_head)
                remaining = length
                while remaining:
                    data = await src.read(min(remaining, _PIECE))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", remaining)
                    writer.write(data)
                    remaining -= len(data)
                    if transport.get_write_buffer_size() > _HIGH_WATER:
                        await writer.drain()
            elif response.chunked:
                writer.write(out_head)
                scanner = ChunkedScanner()
                while not scanner.done:
                    data = await src.read(_PIECE)
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
                    used = scanner.feed(data)
                    if used < len(data):
                        upstream_keep = False  # bytes after the end: do not trust this socket
                        data = data[:used]
                    writer.write(data)
                    if transport.get_write_buffer_size() > _HIGH_WATER:
                        await writer.drain()
            else:
                writer.write(out_head)
                while data := await src.read(_PIECE):
                    writer.write(data)
                    if transport.get_write_buffer_size() > _HIGH_WATER:
                        await writer.drain()
        except (OSError, HttpFramingError, asyncio.IncompleteReadError) as err:
            # The head is already out: all the client can be told is a cut connection.
            log.warning("gate %s: upstream broke mid-response: %s", self.name, err)
            conn.close()
            transport.abort()
            return False
        except BaseException:
            conn.close()
            raise
        if upstream_keep:
            self._pool.release(conn)
        else:
            conn.close()
        if transport.get_write_buffer_size() > _HIGH_WATER:
            await writer.drain()
        return client_keep

    async def _tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: UpstreamConnection
    ) -> None:
        """After a 101 answer: copy both ways until either side closes."""

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(_PIECE):
                    dst.write(data)
                    await dst.drain()

        tasks = {
            asyncio.create_task(pump(reader, conn.writer), name=f"gate-{self.name}-ws-up"),
            asyncio.create_task(pump(conn.reader, writer), name=f"gate-{self.name}-ws-down"),
        }
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            conn.close()
