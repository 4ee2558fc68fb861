"""The head parsers against the reference they replaced, on generated heads.

`_reference_request` is the gate's first parser (split every line, build lists, filter
them), kept here as the specification: the faster parser must agree with it on every head
both accept, and refuse what it refused. It refuses more in two places on purpose: a bare
CR or LF inside the head, and a `Connection` header naming Content-Length or
Transfer-Encoding (both request-smuggling vectors).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.services.httpwire import (
    HOP_BY_HOP,
    ChunkedScanner,
    HttpFramingError,
    parse_request_head,
    parse_response_head,
)

Fields = list[tuple[bytes, bytes]]


def _reference_split(data: bytes) -> tuple[bytes, Fields, set[bytes], list[bytes]]:
    lines = data.rstrip(b"\r\n").split(b"\r\n")
    headers: list[tuple[bytes, bytes]] = []
    connection: set[bytes] = set()
    codings: list[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
            raise HttpFramingError("malformed header line")
        value = value.strip(b" \t")
        lower = name.lower()
        if lower == b"connection":
            connection.update(t.strip().lower() for t in value.split(b","))
            continue
        if lower == b"transfer-encoding":
            codings.extend(t.strip().lower() for t in value.split(b",") if t.strip())
        headers.append((name, value))
    drop = HOP_BY_HOP | connection
    kept = [(n, v) for n, v in headers if n.lower() not in drop]
    return lines[0], kept, connection, codings


def _reference_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    values = {v for n, v in headers if n.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise HttpFramingError("conflicting Content-Length headers")
    value = values.pop()
    if not value.isdigit():
        raise HttpFramingError("bad Content-Length")
    return int(value)


def _reference_request(data: bytes) -> dict[str, Any]:
    start, headers, connection, _ = _reference_split(data)
    parts = start.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpFramingError("bad request line")
    method, target, version = parts
    http10 = version == b"HTTP/1.0"
    # issue 12, RFC 9112 section 3.2: one Host in HTTP/1.1, never two
    hosts = sum(1 for line in data.split(b"\r\n")[1:] if line.lower().startswith(b"host:"))
    if hosts > 1 or (hosts == 0 and not http10):
        raise HttpFramingError("Host")
    content_length = _reference_length(headers)
    chunked = False
    if any(n.lower() == b"transfer-encoding" for n, _ in headers):
        # issue 12: a request's only transfer coding is a single "chunked"
        raw = [v.strip(b" \t").lower() for n, value in headers
               if n.lower() == b"transfer-encoding" for v in value.split(b",")]  # fmt: skip
        if raw != [b"chunked"] or content_length is not None or http10:
            raise HttpFramingError("unsupported Transfer-Encoding")
        chunked = True
    upgrade = None
    if b"upgrade" in connection:
        for line in data.rstrip(b"\r\n").split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"upgrade":
                upgrade = value.strip(b" \t")
                break
    expect = any(n.lower() == b"expect" and v.lower() == b"100-continue" for n, v in headers)
    expect_continue = expect and not http10  # issue 12: never 100 Continue to HTTP/1.0
    keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
    kept = [(n, v) for n, v in headers if not (expect and n.lower() == b"expect")]
    return {
        "method": method.decode("latin-1"),
        "target": target,
        "path": target.split(b"?", 1)[0].decode("latin-1"),
        "http10": http10,
        # the gate dropped Host when it built the upstream head; the new parser already does
        "headers": sorted((n.lower(), v) for n, v in kept if n.lower() != b"host"),
        "content_length": content_length,
        "chunked": chunked,
        "keep_alive": keep_alive,
        "upgrade": upgrade,
        "expect_continue": expect_continue,
    }


def _reference_response(data: bytes, method: str) -> dict[str, Any]:
    start, headers, connection, codings = _reference_split(data)
    parts = start.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpFramingError("bad status line")
    status = int(parts[1])
    http10 = parts[0] == b"HTTP/1.0"
    keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
    no_body = method == "HEAD" or status < 200 or status in (204, 304)
    chunked = bool(codings) and codings[-1] == b"chunked" and not no_body
    # issue 12, RFC 9112 section 6.3: any Transfer-Encoding (even an empty one) overrides
    # Content-Length, which is dropped; without a final "chunked" the body ends at close
    te = any(n.lower() == b"transfer-encoding" for n, _ in headers)
    if te:
        headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    content_length = None if (chunked or no_body or te) else _reference_length(headers)
    if no_body:
        content_length = 0
    elif te and not chunked:
        keep_alive = False
    return {
        "status": status,
        "status_line": start,
        "headers": sorted((n.lower(), v) for n, v in headers),
        "content_length": content_length,
        "chunked": chunked,
        "keep_alive": keep_alive,
    }


def _fields_of(block: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        out.append((name.lower(), value.strip(b" \t")))
    return sorted(out)


def _parsed_request(data: bytes) -> dict[str, Any]:
    head = parse_request_head(data)
    return {
        "method": head.method,
        "target": head.target,
        "path": head.path,
        "http10": head.http10,
        "headers": _fields_of(head.headers),
        "content_length": head.content_length,
        "chunked": head.chunked,
        "keep_alive": head.keep_alive,
        "upgrade": head.upgrade,
        "expect_continue": head.expect_continue,
    }


def _parsed_response(data: bytes, method: str) -> dict[str, Any]:
    head = parse_response_head(data, request_method=method)
    return {
        "status": head.status,
        "status_line": head.status_line,
        "headers": _fields_of(head.headers),
        "content_length": head.content_length,
        "chunked": head.chunked,
        "keep_alive": head.keep_alive,
    }


def _outcome(parse: Any, *args: Any) -> object:
    try:
        return parse(*args)
    except HttpFramingError:
        return HttpFramingError


_NAMES = [b"Host", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection",
          b"connection", b"Keep-Alive", b"Upgrade", b"Expect", b"Close", b"X-Secret", b"Accept",
          b"Name ", b"", b" Folded"]  # fmt: skip
_VALUES = [b"", b"0", b"12", b"12 ", b"-1", b"chunked", b"gzip, chunked", b"close",
           b"keep-alive", b"Upgrade", b"x-secret, close", b"expect", b"100-continue",
           b"100-Continue", b"websocket", b"a:b", b" spaced\t", b"te, trailer"]  # fmt: skip
_header = st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)).map(
    lambda nv: nv[0] + b":" + (b" " if nv[1][:1] != b" " else b"") + nv[1]
)
_request_line = st.sampled_from([
    b"POST /api/chat HTTP/1.1", b"GET /api/tags?x=1 HTTP/1.1", b"GET / HTTP/1.0",
    b"POST /v1/chat/completions HTTP/1.1", b"GET /ws HTTP/1.1", b"GET / HTTP/2.0",
    b"GET /  HTTP/1.1", b"HEAD / HTTP/1.1",
])  # fmt: skip
_status_line = st.sampled_from([
    b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 101 Up",
    b"HTTP/1.1 304", b"HTTP/1.1 100 Continue", b"HTTP/1.1 20x", b"HTTP/2 200", b"HTTP/1.1 500 ",
])  # fmt: skip


def _head(start: bytes, lines: list[bytes]) -> bytes:
    return b"\r\n".join([start, *lines]) + b"\r\n\r\n"


def _framing_in_connection(lines: list[bytes]) -> bool:
    for line in lines:
        name, _, value = line.partition(b":")
        if name.lower() == b"connection" and any(
            t.strip().lower() in (b"content-length", b"transfer-encoding")
            for t in value.split(b",")
        ):
            return True
    return False


@settings(max_examples=500)
@given(start=_request_line, lines=st.lists(_header, max_size=6))
def test_request_parser_agrees_with_the_reference(start: bytes, lines: list[bytes]) -> None:
    data = _head(start, lines)
    expected = _outcome(_reference_request, data)
    got = _outcome(_parsed_request, data)
    if _framing_in_connection(lines) and expected is not HttpFramingError:
        assert got is HttpFramingError  # refused on purpose
    else:
        assert got == expected


@settings(max_examples=500)
@given(start=_status_line, lines=st.lists(_header, max_size=6),
       method=st.sampled_from(["GET", "POST", "HEAD"]))  # fmt: skip
def test_response_parser_agrees_with_the_reference(
    start: bytes, lines: list[bytes], method: str
) -> None:
    data = _head(start, lines)
    expected = _outcome(_reference_response, data, method)
    got = _outcome(_parsed_response, data, method)
    if _framing_in_connection(lines) and expected is not HttpFramingError:
        assert got is HttpFramingError
    else:
        assert got == expected


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nX: a\nB: c\r\n\r\n",  # bare LF: a second header to some servers
        b"GET / HTTP/1.1\r\nX: a\rB: c\r\n\r\n",  # bare CR
        b"POST / HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n",  # incomplete
    ],
)
def test_heads_refused_beyond_the_reference(head: bytes) -> None:
    with pytest.raises(HttpFramingError):
        parse_request_head(head)


def test_relayed_lines_are_kept_byte_for_byte() -> None:
    head = parse_request_head(
        b"POST /api/chat?stream=1 HTTP/1.1\r\nHost: gpu.example\r\nX-Odd:  two  spaces \r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 2\r\n\r\n"
    )
    assert head.headers == b"X-Odd:  two  spaces \r\nContent-Length: 2\r\n"
    assert head.path == "/api/chat" and head.content_length == 2 and head.keep_alive


@given(
    pieces=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    upper=st.booleans(),
    extension=st.booleans(),
)
def test_chunked_scanner_on_one_chunk_per_slice(
    pieces: list[bytes], upper: bool, extension: bool
) -> None:
    """How streams arrive: each slice one whole chunk, the end possibly with the last one."""
    slices = []
    for piece in pieces:
        size = b"%X" % len(piece) if upper else b"%x" % len(piece)
        slices.append(size + (b";x=1" if extension else b"") + b"\r\n" + piece + b"\r\n")
    slices.append(b"0\r\n\r\nNEXT")
    scanner = ChunkedScanner()
    consumed = [scanner.feed(s) for s in slices]
    assert consumed[:-1] == [len(s) for s in slices[:-1]] and consumed[-1] == 5
    assert scanner.done and scanner.size == sum(map(len, pieces))


@pytest.mark.parametrize(
    "stream",
    [b"zz\r\nabc\r\n", b"-3\r\nabc\r\n", b"3 \r\nabc\r\n0\r\n\r\n", b"3\nabc\r\n0\r\n\r\n"],
)
def test_chunked_scanner_fast_path_leaves_odd_slices_to_the_long_way(stream: bytes) -> None:
    scanner, reference = ChunkedScanner(), ChunkedScanner()
    outcome: object
    try:
        outcome = scanner.feed(stream), scanner.done
    except HttpFramingError:
        outcome = HttpFramingError
    # byte by byte never takes the fast path
    try:
        reference_outcome: object = sum(reference.feed(stream[i : i + 1])
                                        for i in range(len(stream))), reference.done  # fmt: skip
    except HttpFramingError:
        reference_outcome = HttpFramingError
    assert outcome == reference_outcome
