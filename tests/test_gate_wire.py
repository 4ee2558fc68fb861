"""The gate's HTTP/1.1 framing: what it refuses, and bodies relayed byte-exact."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from broker.clock import FakeClock
from broker.services.classify import is_inference
from broker.services.control import GateControl
from broker.services.gate import Gate
from broker.services.httpwire import ChunkedScanner, HttpFramingError, parse_request_head


@pytest.mark.parametrize(
    ("kind", "method", "path", "inference"),
    [
        ("ollama", "POST", "/api/chat", True),
        ("ollama", "POST", "/api/generate/", True),
        ("ollama", "POST", "/api/embed", True),
        ("ollama", "POST", "/v1/chat/completions", True),
        ("ollama", "GET", "/v1/models", False),
        ("ollama", "GET", "/api/tags", False),
        ("ollama", "POST", "/api/show", False),
        ("ollama", "POST", "/api/pull", False),
        ("comfyui", "POST", "/prompt", True),
        ("comfyui", "POST", "/api/prompt", True),
        ("comfyui", "GET", "/prompt", False),
        ("comfyui", "POST", "/free", False),
        ("openai", "POST", "/v1/completions", True),
        ("openai", "POST", "/completion", True),
        ("openai", "POST", "/tokenize", False),
        ("openai", "GET", "/health", False),
    ],
)
def test_classification(kind: str, method: str, path: str, inference: bool) -> None:
    assert is_inference(kind, method, path) is inference  # type: ignore[arg-type]


def _chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_chunked_scanner_finds_the_end_however_the_bytes_are_split(
    pieces: list[bytes], cuts: list[int]
) -> None:
    body = _chunked(pieces)
    stream = body + b"NEXT"
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    scanner, consumed = ChunkedScanner(), 0
    for start, end in itertools.pairwise(points):
        consumed += scanner.feed(stream[start:end])
        if scanner.done:
            break
    assert scanner.done and consumed == len(body)


def test_chunked_scanner_rejects_garbage() -> None:
    with pytest.raises(HttpFramingError):
        ChunkedScanner().feed(b"zz\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET /\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
    ],
)
def test_ambiguous_or_malformed_heads_are_refused(head: bytes) -> None:
    with pytest.raises(HttpFramingError):
        parse_request_head(head)


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """An upstream that answers with what it received, chunked or with a length."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.query.get("chunked"):
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(0, len(body), 1000):
                await response.write(body[i : i + 1000])
            await response.write_eof()
            return response
        return web.Response(body=body, headers={"X-Method": request.method,
                                                "X-Host": request.host})  # fmt: skip

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.fixture
async def gate(echo: str, clock: FakeClock) -> AsyncIterator[Gate]:
    control = GateControl(clock, name="echo", max_hold=timedelta(seconds=30))
    async with Gate(name="echo", kind="ollama", upstream=echo, listen=("127.0.0.1", 0),
                    control=control, max_header_bytes=2048,
                    max_body_bytes=4 * 1024 * 1024) as g:  # fmt: skip
        yield g


async def _exchange(gate: Gate, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
    writer.write(raw)
    data = await reader.read()  # every request here asks for Connection: close
    writer.close()
    await writer.wait_closed()
    return data


async def test_oversized_head_gets_431(gate: Gate) -> None:
    raw = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    assert (await _exchange(gate, raw)).startswith(b"HTTP/1.1 431 ")


async def test_oversized_body_gets_413_before_it_is_read(gate: Gate) -> None:
    raw = b"POST /api/chat HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 99999999\r\n\r\n"
    answer = await _exchange(gate, raw)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"error"' in answer


async def test_malformed_request_gets_400(gate: Gate) -> None:
    answer = await _exchange(gate, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_large_and_chunked_bodies_stream_through_byte_exact(gate: Gate) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: above the read-whole size, so streamed
    raw = (b"POST /api/show?chunked=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
           b"Connection: close\r\n\r\n" % len(payload)) + payload  # fmt: skip
    answer = await _exchange(gate, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    scanner = ChunkedScanner()
    assert scanner.feed(body) == len(body) and scanner.done
    # de-chunk and compare
    out, rest = bytearray(), body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    assert bytes(out) == payload
    chunked_request = _chunked([b"hello ", b"world"])
    raw = (b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n") + chunked_request  # fmt: skip
    answer = await _exchange(gate, raw)
    assert answer.endswith(b"\r\n\r\nhello world")
    assert b"X-Host: 127.0.0.1:" in answer


async def test_keep_alive_serves_several_requests_on_one_connection(gate: Gate) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
    try:
        for i in range(3):
            body = b"n=%d" % i
            writer.write(b"POST /api/show HTTP/1.1\r\nHost: [::1]\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))  # fmt: skip
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
            assert await reader.readexactly(len(body)) == body
    finally:
        writer.close()
        await writer.wait_closed()


async def test_http10_client_gets_a_closed_connection(gate: Gate) -> None:
    answer = await _exchange(gate, b"GET /api/tags HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.") and b"Connection: close" in answer
