"""Issue 12 at the gate, through real sockets: the Host check, timeouts, the connection cap,
and RFC 9112 strictness (every refused request gets an answer, none reaches the upstream).

The timeouts are socket timeouts on the loop's own clock, so these tests use small real
ones (0.2 s) instead of the FakeClock; each test stays well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.services.control import GateControl
from broker.services.gate import Gate

SHORT = 0.2  # the head and body timeouts of these gates, in seconds
IDLE = 0.3  # their idle keep-alive timeout


class Upstream:
    """A raw upstream: records every request head; answers each with its body echoed, or
    through `reply` (given the head and the writer) when set."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.reply: Callable[[bytes, asyncio.StreamWriter], Awaitable[None]] | None = None
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if self.reply is not None:
                    await self.reply(head, writer)
                    await writer.drain()
                    continue
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))  # fmt: skip
                await writer.drain()
        writer.close()


MakeGate = Callable[..., Awaitable[Gate]]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    yield up
    up.server.close()


@pytest.fixture
async def make_gate(upstream: Upstream, clock: FakeClock) -> AsyncIterator[MakeGate]:
    gates: list[Gate] = []

    async def make(**options: Any) -> Gate:
        settings: dict[str, Any] = {"head_timeout_s": SHORT, "body_timeout_s": SHORT,
                                    "idle_timeout_s": IDLE, "listen": ("127.0.0.1", 0),
                                    "kind": "ollama"}  # fmt: skip
        settings.update(options)
        control = GateControl(clock, name="strict", max_hold=timedelta(seconds=30))
        gate = Gate(name="strict", upstream=upstream.url, control=control, **settings)
        await gate.start()
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        await gate.aclose()


async def _open(gate: Gate, host: str = "127.0.0.1") -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    return await asyncio.open_connection(host, gate.port)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _until_closed(reader: asyncio.StreamReader, limit_s: float = 2.0) -> bytes:
    """Everything the gate sends until it closes (bounded: a hang fails the test)."""
    return await asyncio.wait_for(reader.read(), limit_s)


async def _exchange(gate: Gate, raw: bytes) -> bytes:
    reader, writer = await _open(gate)
    writer.write(raw)
    try:
        return await _until_closed(reader)
    finally:
        await _close(writer)


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One answer with a Content-Length: (head, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer[9:12])


def _error_message(answer: bytes) -> str:
    message: str = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]  # Ollama's shape
    return message


def _get(host: bytes, path: bytes = b"/api/tags") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host)


# ---------------------------------------------------------------- Host (DNS rebinding)
async def test_foreign_host_is_403_and_allowed_names_pass(
    make_gate: MakeGate, upstream: Upstream
) -> None:
    gate = await make_gate(allowed_hosts=["gpu.lan"])
    answer = await _exchange(gate, _get(b"evil.example"))
    assert _status(answer) == 403 and "evil.example" in _error_message(answer)
    assert b"Connection: close" in answer
    for host in (b"gpu.lan", b"GPU.LAN:11434", b"localhost:1", b"127.0.0.5", b"[::1]:80",
                 b"127.0.0.1:%d" % gate.port):  # fmt: skip
        assert _status(await _exchange(gate, _get(host))) == 200, host
    assert len(upstream.heads) == 6  # the refused request never reached the upstream
    assert _status(await _exchange(gate, _get(b"bad host"))) == 400  # not a host[:port]


async def test_host_check_answers_in_the_services_own_error_shape(make_gate: MakeGate) -> None:
    gate = await make_gate(kind="openai")
    answer = await _exchange(gate, _get(b"evil.example", b"/v1/models"))
    assert _status(answer) == 403
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert "evil.example" in error["message"] and error["type"] == "permission_error"


async def test_star_turns_the_host_check_off(make_gate: MakeGate) -> None:
    gate = await make_gate(allowed_hosts=["*"])
    assert _status(await _exchange(gate, _get(b"evil.example"))) == 200


def _own_non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        ip: str = s.getsockname()[0]
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


async def test_a_gate_on_every_address_answers_to_the_ip_it_was_reached_on(
    make_gate: MakeGate,
) -> None:
    ip = _own_non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    gate = await make_gate(listen=("0.0.0.0", 0))
    reader, writer = await _open(gate, ip)
    writer.write(_get(b"%s:%d" % (ip.encode(), gate.port)))
    assert _status(await _until_closed(reader)) == 200
    await _close(writer)
    reader, writer = await _open(gate, ip)
    writer.write(_get(b"192.0.2.77"))  # another machine's address: a rebinding target
    assert _status(await _until_closed(reader)) == 403
    await _close(writer)


# ---------------------------------------------------------------- timeouts
async def test_a_head_that_never_completes_gets_408_within_the_timeout(
    make_gate: MakeGate, upstream: Upstream
) -> None:
    gate = await make_gate()
    reader, writer = await _open(gate)
    started = time.monotonic()
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")  # slowloris
    answer = await _until_closed(reader)
    elapsed = time.monotonic() - started
    assert _status(answer) == 408 and b"Connection: close" in answer
    assert SHORT <= elapsed < SHORT + 0.5, elapsed  # a tick or two late at most
    assert upstream.heads == []
    await _close(writer)


async def test_an_idle_keep_alive_connection_is_closed_quietly(make_gate: MakeGate) -> None:
    gate = await make_gate()
    reader, writer = await _open(gate)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head, _ = await _answer(reader)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
    started = time.monotonic()
    assert await _until_closed(reader) == b""  # closed, nothing said
    assert IDLE <= time.monotonic() - started < IDLE + 0.5
    assert not gate._clients
    await _close(writer)


@pytest.mark.parametrize("length", [10, 2 * 1024 * 1024])  # read whole / streamed upstream
async def test_a_stalled_body_gets_408(make_gate: MakeGate, length: int) -> None:
    gate = await make_gate(max_body_bytes=4 * 1024 * 1024)
    reader, writer = await _open(gate)
    writer.write(b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\nabc"
                 % length)  # fmt: skip
    started = time.monotonic()
    answer = await _until_closed(reader)
    assert _status(answer) == 408 and "body" in _error_message(answer)
    assert time.monotonic() - started < SHORT + 0.5
    await _close(writer)


async def test_slow_answers_and_streams_outlive_every_timeout(
    make_gate: MakeGate, upstream: Upstream
) -> None:
    """A long generation (a late head, then chunks far apart) is never cut."""

    async def slow(head: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(IDLE + 0.1)  # thinking, before the head
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(IDLE + 0.1)  # then chunks further apart than any timeout
        writer.write(b"2\r\n00\r\n")
        await writer.drain()
        writer.write(b"2\r\n01\r\n")
        writer.write(b"0\r\n\r\n")

    upstream.reply = slow
    gate = await make_gate()
    reader, writer = await _open(gate)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200")
    body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
    assert body == b"2\r\n00\r\n2\r\n01\r\n0\r\n\r\n"
    await _close(writer)


# ---------------------------------------------------------------- the connection cap
async def test_over_the_cap_new_connections_get_503_and_open_ones_are_served(
    make_gate: MakeGate, caplog: pytest.LogCaptureFixture
) -> None:
    gate = await make_gate(max_connections=1, head_timeout_s=5.0, idle_timeout_s=5.0)
    first_reader, first = await _open(gate)
    first.write(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await _answer(first_reader))[0].startswith(b"HTTP/1.1 200")
    with caplog.at_level(logging.WARNING, logger="broker.services.gate"):
        for _ in range(3):
            answer = await _exchange(gate, _get(b"localhost"))
            assert _status(answer) == 503 and b"Connection: close" in answer
            assert "max_connections" in _error_message(answer)
    over_cap = [r for r in caplog.records if "max_connections" in r.getMessage()]
    assert len(over_cap) == 1  # one line, not one per connection
    first.write(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n")  # still served
    assert (await _answer(first_reader))[0].startswith(b"HTTP/1.1 200")
    await _close(first)


# ---------------------------------------------------------------- RFC 9112 strictness
def _chunked_post(body: bytes) -> bytes:
    return (b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n") + body  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # chunk sizes: hex digits only (Python's int() forgave all of these)
        (_chunked_post(b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
        (_chunked_post(b"0_5\r\nhello\r\n0\r\n\r\n"), 400),
        (_chunked_post(b"+5\r\nhello\r\n0\r\n\r\n"), 400),
        (_chunked_post(b" 5\r\nhello\r\n0\r\n\r\n"), 400),
        (_chunked_post(b"5 \r\nhello\r\n0\r\n\r\n"), 400),
        (_chunked_post(b"\r\nhello\r\n0\r\n\r\n"), 400),  # empty size
        (_chunked_post(b"zz\r\nhello\r\n0\r\n\r\n"), 400),  # was a dropped connection
        (_chunked_post(b"5\r\nhelloXX0\r\n\r\n"), 400),  # no CRLF after the data
        (_chunked_post(b"5\nhello\r\n0\r\n\r\n"), 400),  # bare LF after the size
        (_chunked_post(b"5;" + b"x" * 5000 + b"\r\nhello\r\n0\r\n\r\n"), 400),  # one read
        (_chunked_post(b"5;a=\x00\r\nhello\r\n0\r\n\r\n"), 400),  # NUL in an extension
        (_chunked_post(b"5\r\nhello\r\n0\r\nX\x01: y\r\n\r\n"), 400),  # a bad trailer
        # control characters and non-tokens in the head
        (b"GE\x00T / HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
        (b"GET /a\x00b HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
        (b"GET /a\x7fb HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nX\x00Y: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: a\x01b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: a\x1bb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nX(A): 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        # Host: one, exactly, in HTTP/1.1 (RFC 9112 section 3.2)
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nHost: localhost\r\nHost: evil.example\r\n\r\n", 400),
        # smuggling classics
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
         b"\r\nhello!", 400),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: +5\r\n\r\nhello", 400),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, identity\r\n"
         b"\r\n0\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding:\r\n\r\n", 501),
        (b"POST / HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\n", 400),
    ],
)  # fmt: skip
async def test_what_rfc_9112_refuses_is_answered_not_relayed(
    make_gate: MakeGate, upstream: Upstream, raw: bytes, status: int
) -> None:
    gate = await make_gate()
    answer = await _exchange(gate, raw)
    assert _status(answer) == status
    assert b"Connection: close" in answer and "bad request" in _error_message(answer)
    # a refused head never reaches the upstream (a chunked body is refused at its first
    # bad chunk, after its head went up: the gate relays a body as it comes)
    if not raw.startswith(b"POST /api/show"):
        assert upstream.heads == []


async def test_http10_clients_never_get_100_continue(make_gate: MakeGate) -> None:
    gate = await make_gate()
    for version, interim in ((b"1.0", False), (b"1.1", True)):
        reader, writer = await _open(gate)
        writer.write(b"POST /api/show HTTP/%s\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\n\r\n" % version)  # fmt: skip
        early = b""
        with contextlib.suppress(TimeoutError):
            early = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.1)
        assert (early == b"HTTP/1.1 100 Continue\r\n\r\n") is interim
        writer.write(b"hello")
        head, body = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 200") and body == b"hello"
        await _close(writer)


async def test_upstream_length_and_chunked_together_relay_chunked_without_the_length(
    make_gate: MakeGate, upstream: Upstream
) -> None:
    """RFC 9112 section 6.3: Transfer-Encoding wins; a proxy drops the Content-Length."""

    async def both(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Kept: 1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")  # fmt: skip

    upstream.reply = both
    gate = await make_gate()
    reader, writer = await _open(gate)
    for _ in range(2):  # the connection stays in step: the second answer reads the same
        writer.write(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert b"Transfer-Encoding: chunked" in head and b"X-Kept: 1" in head
        assert b"content-length" not in head.lower()
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
        assert body == b"5\r\nhello\r\n0\r\n\r\n"
    await _close(writer)
