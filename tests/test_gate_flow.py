"""The gate under pressure: flow control both ways, pipelining, retries, cut connections.

The upstream here is a raw asyncio server whose every move the test scripts, so the test
can see what the gate sent it byte for byte and stop reading to make the gate's buffers
fill. Everything runs on one loop: when the upstream is blocked writing, the gate is not
reading from it, because nothing else could have kept it from reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.services.control import GateControl
from broker.services.gate import Gate, _Client, _Resumed
from broker.services.upstream import HIGH_WATER, UpstreamConnection

Handler = Callable[["Upstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MakeGate = Callable[[Handler], Awaitable[tuple[Gate, "Upstream"]]]
MIB = 1024 * 1024


@dataclass
class Upstream:
    """A scripted upstream: `handler` serves each connection."""

    handler: Handler
    heads: list[bytes] = field(default_factory=list)  # every request head received
    connections: int = 0
    open: int = 0
    written: int = 0  # body bytes written by a streaming handler
    blocked: bool = False  # a streaming handler waits in drain()
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.writers.add(writer)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self.writers.discard(writer)
            writer.close()

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()
        await asyncio.sleep(0)  # let the handlers see their sockets go

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    async def stream(self, writer: asyncio.StreamWriter, total: int) -> None:
        """Write `total` bytes as fast as the reader takes them, noting when blocked."""
        piece = bytes(range(256)) * 256  # 64 KiB
        while self.written < total:
            writer.write(piece)
            self.written += len(piece)
            self.blocked = True
            await writer.drain()
            self.blocked = False


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def _body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The request body as it came, chunked framing included."""
    if b"transfer-encoding: chunked" not in head.lower():
        return await reader.readexactly(_length(head))
    raw = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        if int(line.split(b";")[0], 16) == 0:
            while line != b"\r\n":
                line = await reader.readuntil(b"\r\n")
                raw += line
            return raw
        raw += await reader.readexactly(int(line.split(b";")[0], 16) + 2)


async def echo(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: answer each request with its own body."""
    while True:
        try:
            head = await up.read_head(reader)
        except asyncio.IncompleteReadError:
            return
        body = await _body(reader, head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


@pytest.fixture
async def make_gate(clock: FakeClock) -> AsyncIterator[MakeGate]:
    made: list[tuple[Gate, Upstream]] = []

    async def make(handler: Handler) -> tuple[Gate, Upstream]:
        up = Upstream(handler)
        up.server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
        control = GateControl(clock, name="raw", max_hold=timedelta(seconds=30))
        gate = Gate(name="raw", kind="ollama", upstream=up.url, listen=("127.0.0.1", 0),
                    control=control)  # fmt: skip
        await gate.start()
        made.append((gate, up))
        return gate, up

    yield make
    for gate, up in made:
        await gate.aclose()
        await up.aclose()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until `condition()` holds; bounded, about 2 s at most."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def connect(gate: Gate, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader,
                                                                   asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf is not None:  # a small window, so the gate's own buffers are what fills
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gate.port))
    return await asyncio.open_connection(sock=sock, limit=4 * MIB)


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), extra, body))  # fmt: skip


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def client_of(gate: Gate) -> object:
    (client,) = gate._clients
    return client


# ---- flow control
async def test_slow_client_pauses_the_upstream_instead_of_buffering(make_gate: MakeGate) -> None:
    total = 64 * MIB  # far more than the kernel buffers on the way can hold

    async def big(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_head(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Content-Length: %d\r\n\r\n" % total)  # fmt: skip
        await up.stream(w, total)
        await up.release.wait()

    gate, up = await make_gate(big)
    reader, writer = await connect(gate, rcvbuf=64 * 1024)
    writer.write(post(b"/api/generate", b"{}"))
    await reader.readuntil(b"\r\n\r\n")  # the head came through; now read nothing

    async def stalled() -> None:
        seen = -1
        while not (up.blocked and up.written == seen):
            seen = up.written
            await asyncio.sleep(0.02)

    await asyncio.wait_for(stalled(), 5)
    client = client_of(gate)
    # the gate holds at most its high-water mark plus one read, not the 64 MiB behind it
    assert client.transport.get_write_buffer_size() <= 2 * HIGH_WATER  # type: ignore[attr-defined]
    assert client.up is not None and not client.up.reading  # type: ignore[attr-defined]
    assert up.written < total and gate.control.in_flight == 1
    # the client catches up: every byte arrives, the connection goes back to the pool
    got = 0
    while got < total:
        got += len(await reader.read(4 * MIB))
    assert got == total
    await until(lambda: gate.control.in_flight == 0, "the request to finish")
    assert gate._pool.idle == 1
    await hang_up(writer)
    up.release.set()


async def test_client_leaving_a_paused_stream_frees_everything(make_gate: MakeGate) -> None:
    async def endless(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_head(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
        await up.stream(w, 1 << 40)

    gate, up = await make_gate(endless)
    reader, writer = await connect(gate, rcvbuf=64 * 1024)
    writer.write(post(b"/api/generate", b"{}"))
    await reader.readuntil(b"\r\n\r\n")
    await until(lambda: up.blocked, "the upstream to block")
    assert gate.control.in_flight == 1
    await hang_up(writer)
    await until(lambda: gate.control.in_flight == 0, "in-flight to drop")
    await until(lambda: up.open == 0, "the upstream connection to close")
    assert gate._pool.idle == 0 and not gate._clients


async def test_large_upload_pauses_the_client_while_the_upstream_does_not_read(
    make_gate: MakeGate,
) -> None:
    size = 48 * MIB

    async def late_reader(up: Upstream, reader: asyncio.StreamReader,
                          w: asyncio.StreamWriter) -> None:  # fmt: skip
        head = await up.read_head(reader)
        await up.release.wait()
        remaining, total = _length(head), 0
        while remaining:
            data = await reader.read(min(remaining, MIB))
            total += len(data)
            remaining -= len(data)
        body = b"%d" % total
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await w.drain()
        await echo(up, reader, w)

    gate, up = await make_gate(late_reader)
    reader, writer = await connect(gate)
    payload = b"x" * size
    writer.write(post(b"/api/show", payload))
    sent = asyncio.ensure_future(writer.drain())
    await until(lambda: len(up.heads) == 1, "the head to reach the upstream")
    await asyncio.sleep(0.1)  # let every buffer on the way fill
    assert not sent.done()  # the client is held back
    client = client_of(gate)
    assert client.paused  # type: ignore[attr-defined]
    assert client.up.transport.get_write_buffer_size() <= 2 * HIGH_WATER  # type: ignore[attr-defined]
    up.release.set()
    await sent
    head = await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(_length(head)) == b"%d" % size
    # the connection carries on: the next request goes through
    writer.write(post(b"/api/show", b"again"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(_length(head)) == b"again"
    await hang_up(writer)


async def test_pipelined_request_waits_behind_a_paused_answer(make_gate: MakeGate) -> None:
    big = 16 * MIB

    async def sized(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await up.read_head(reader)
            body = await reader.readexactly(_length(head))
            size = big if body == b"big" else len(body)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            w.write(b"x" * size if body == b"big" else body)
            await w.drain()

    gate, up = await make_gate(sized)
    reader, writer = await connect(gate, rcvbuf=64 * 1024)
    writer.write(post(b"/api/show", b"big") + post(b"/api/show", b"small"))
    await until(lambda: client_of(gate).write_paused, "the client to fall behind")  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)
    assert len(up.heads) == 1  # the second request waits for the first answer to get through
    head = await reader.readuntil(b"\r\n\r\n")
    assert len(await reader.readexactly(_length(head))) == big
    head = await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(_length(head)) == b"small"
    assert len(up.heads) == 2
    await hang_up(writer)


# ---- framing across requests
async def test_pipelined_requests_are_answered_in_order(make_gate: MakeGate) -> None:
    gate, up = await make_gate(echo)
    reader, writer = await connect(gate)
    chunked = (b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\none\r\n4;ext=1\r\n two\r\n0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
    # three requests in one write: a plain one, a chunked one, and an inference request
    writer.write(post(b"/api/show", b"first") + chunked + post(b"/api/generate", b"third"))
    answers = []
    for _ in range(3):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        answers.append(await reader.readexactly(_length(head)))
    assert answers[0] == b"first" and answers[2] == b"third"
    assert answers[1] == b"3\r\none\r\n4;ext=1\r\n two\r\n0\r\nX-Trailer: t\r\n\r\n"
    assert up.connections == 1  # all three over one pooled upstream connection
    assert gate.control.in_flight == 0 and gate.control.last_request_at is not None
    await hang_up(writer)


async def test_head_and_body_split_across_reads(make_gate: MakeGate) -> None:
    gate, _ = await make_gate(echo)
    reader, writer = await connect(gate)
    raw = post(b"/api/generate", b'{"model": "m", "prompt": "split"}')
    for i in range(0, len(raw), 7):
        writer.write(raw[i : i + 7])
        await writer.drain()
        await asyncio.sleep(0)
    head = await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(_length(head)) == b'{"model": "m", "prompt": "split"}'
    await hang_up(writer)


async def test_expect_100_continue_is_answered_by_the_gate(make_gate: MakeGate) -> None:
    gate, up = await make_gate(echo)
    reader, writer = await connect(gate)
    writer.write(b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")  # fmt: skip
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and await reader.readexactly(5) == b"hello"
    assert b"expect" not in up.heads[0].lower()
    await hang_up(writer)


async def test_upstream_sees_the_head_rewritten(make_gate: MakeGate) -> None:
    gate, up = await make_gate(echo)
    reader, writer = await connect(gate)
    writer.write(b"GET /api/tags?x=1 HTTP/1.1\r\nHost: localhost:1\r\nConnection: keep-alive, "
                 b"X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                 b"X-Kept:  spaced  \r\nAccept: */*\r\n\r\n")  # fmt: skip
    await reader.readuntil(b"\r\n\r\n")
    port = up.url.rsplit(":", 1)[1].encode()
    assert up.heads[0] == (b"GET /api/tags?x=1 HTTP/1.1\r\nHost: 127.0.0.1:" + port + b"\r\n"
                           b"X-Kept:  spaced  \r\nAccept: */*\r\n\r\n")  # fmt: skip
    await hang_up(writer)


# ---- the upstream misbehaving
async def test_idle_connection_closed_by_the_upstream_is_retried(make_gate: MakeGate) -> None:
    async def one_then_hang_up(up: Upstream, reader: asyncio.StreamReader,
                               w: asyncio.StreamWriter) -> None:  # fmt: skip
        head = await up.read_head(reader)
        body = await reader.readexactly(_length(head))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await w.drain()
        if up.connections == 1:
            await up.read_head(reader)  # the next request arrives, and this socket closes
            return
        await echo(up, reader, w)

    gate, up = await make_gate(one_then_hang_up)
    reader, writer = await connect(gate)
    for text in (b"one", b"two"):
        writer.write(post(b"/api/generate", text))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and await reader.readexactly(3) == text
    assert up.connections == 2 and len(up.heads) == 3
    await hang_up(writer)


async def test_body_until_close_reaches_the_client(make_gate: MakeGate) -> None:
    async def unframed(up: Upstream, reader: asyncio.StreamReader,
                       w: asyncio.StreamWriter) -> None:  # fmt: skip
        await up.read_head(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await w.drain()
        w.write(b"part two")

    gate, _ = await make_gate(unframed)
    reader, writer = await connect(gate)
    writer.write(b"GET /api/ps HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = await reader.read(-1)  # the gate closes after the body, as the upstream did
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and body == b"part one, part two"
    await hang_up(writer)


async def test_upstream_cut_mid_answer_cuts_the_client(make_gate: MakeGate) -> None:
    async def cut(up: Upstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_head(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()

    gate, _ = await make_gate(cut)
    reader, writer = await connect(gate)
    writer.write(post(b"/api/generate", b"{}"))
    answer = b""
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        answer = await reader.readexactly(1000)
    await until(lambda: gate.control.in_flight == 0, "in-flight to drop")
    assert answer == b""
    assert gate._pool.idle == 0
    await hang_up(writer)


async def test_malformed_answer_gives_502(make_gate: MakeGate) -> None:
    async def garbage(up: Upstream, reader: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> None:  # fmt: skip
        await up.read_head(reader)
        w.write(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n")
        await w.drain()

    gate, _ = await make_gate(garbage)
    reader, writer = await connect(gate)
    writer.write(post(b"/api/generate", b"{}"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ")
    assert gate.control.in_flight == 0
    await hang_up(writer)


# ---- admit() run by hand for its first step
async def _steps(log: list[str], gate_future: asyncio.Future[int], fail: bool) -> int:
    log.append("start")
    try:
        await asyncio.sleep(0)  # a bare yield
        value = await gate_future
        log.append(f"got {value}")
        if fail:
            raise ValueError("boom")
        return value * 2
    finally:
        log.append("finally")


async def _run_resumed(coro: Coroutine[Any, Any, int]) -> asyncio.Task[int]:
    waiting_on = coro.send(None)  # the first step, outside any task
    return asyncio.ensure_future(_await(_Resumed(coro, waiting_on)))


async def _await(resumed: _Resumed[int]) -> int:
    return await resumed


@pytest.mark.parametrize("outcome", ["value", "error", "cancel", "future-error"])
async def test_a_coroutine_resumed_in_a_task_behaves_as_if_awaited(outcome: str) -> None:
    log: list[str] = []
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = await _run_resumed(_steps(log, future, fail=outcome == "error"))
    await asyncio.sleep(0.01)
    assert log == ["start"] and not task.done()
    if outcome == "cancel":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["start", "finally"] and future.cancelled()
        return
    if outcome == "future-error":
        future.set_exception(KeyError("k"))
        with pytest.raises(KeyError):
            await task
        assert log == ["start", "finally"]
        return
    future.set_result(21)
    if outcome == "error":
        with pytest.raises(ValueError, match="boom"):
            await task
    else:
        assert await task == 42
    assert log == ["start", "got 21", "finally"]


class _FakeTransport:
    """Records writes; flow-control calls are no-ops (the test calls the protocol's)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def test_next_request_waits_until_the_client_has_read_the_last_answer(
    clock: FakeClock,
) -> None:
    control = GateControl(clock, name="unit", max_hold=timedelta(seconds=30))
    gate = Gate(name="unit", kind="ollama", upstream="http://127.0.0.1:9", listen=("127.0.0.1", 0),
                control=control)  # fmt: skip
    client, client_side = _Client(gate), _FakeTransport()
    client.connection_made(client_side)  # type: ignore[arg-type]
    conn, upstream_side = UpstreamConnection(), _FakeTransport()
    conn.connection_made(upstream_side)  # type: ignore[arg-type]
    gate._pool.release(conn)
    client.data_received(post(b"/api/show", b"one"))
    assert len(upstream_side.out) == 1
    client.pause_writing()  # the client's send buffer went over its high mark
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    assert client_side.out[-1].endswith(b"one") and gate._pool.idle == 1
    client.data_received(post(b"/api/show", b"two"))  # pipelined, or sent right away
    assert len(upstream_side.out) == 1  # not yet: the client has not read the last answer
    client.resume_writing()
    assert len(upstream_side.out) == 2 and upstream_side.out[-1].endswith(b"two")
