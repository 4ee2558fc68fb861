"""HTTP/1.1 framing for the gate: just enough parsing to relay bytes verbatim.

The gate does not re-encode bodies. It reads a message head, rewrites the few headers a
proxy must own (`Host`, hop-by-hop ones), and then copies body bytes as they arrive while
following the framing (`Content-Length` or chunked) only to know where the message ends.
That keeps per-chunk work to a slice and a counter, which is what keeps a Python gate close
to nginx on a streamed answer (see scripts/bench-gate).
"""

from __future__ import annotations

from dataclasses import dataclass

# Headers that describe one connection, not the message (RFC 9110 section 7.6.1). The gate
# owns its two connections, so it drops these and adds its own `Connection` when needed.
# `Transfer-Encoding` and `Content-Length` stay: the body is relayed with its framing intact.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    }
)

_MAX_CHUNK_LINE = 4096  # a chunk-size line longer than this is an attack, not a size


class HttpFramingError(ValueError):
    """A message head or body framing that the gate will not relay."""


@dataclass(slots=True)
class RequestHead:
    method: str
    target: bytes
    path: str
    http10: bool
    headers: list[tuple[bytes, bytes]]  # end-to-end headers only, as received
    content_length: int | None
    chunked: bool
    keep_alive: bool
    upgrade: bytes | None  # the protocol asked for (websocket), with `Connection: upgrade`
    expect_continue: bool


@dataclass(slots=True)
class ResponseHead:
    status: int
    status_line: bytes
    headers: list[tuple[bytes, bytes]]  # end-to-end headers only
    content_length: int | None
    chunked: bool
    keep_alive: bool


def _split_head(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], set[bytes], list[bytes]]:
    """Start line, end-to-end headers, `Connection` tokens and `Transfer-Encoding` codings."""
    lines = data.rstrip(b"\r\n").split(b"\r\n")
    headers: list[tuple[bytes, bytes]] = []
    connection: set[bytes] = set()
    codings: list[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
            # obsolete line folding or "Name :" are request-smuggling vectors: refuse them
            raise HttpFramingError(f"malformed header line {line[:60]!r}")
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


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    values = {v for n, v in headers if n.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise HttpFramingError("conflicting Content-Length headers")
    value = values.pop()
    if not value.isdigit():
        raise HttpFramingError(f"bad Content-Length {value[:20]!r}")
    return int(value)


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request head (up to and including the blank line)."""
    start, headers, connection, codings = _split_head(data)
    parts = start.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpFramingError(f"bad request line {start[:80]!r}")
    method, target, version = parts
    http10 = version == b"HTTP/1.0"
    content_length = _content_length(headers)
    chunked = False
    if codings:
        # Only a final "chunked" tells where the body ends; anything else cannot be relayed
        # safely, and a request carrying both framings is the classic smuggling attempt.
        if codings[-1] != b"chunked" or content_length is not None or http10:
            raise HttpFramingError("unsupported Transfer-Encoding")
        chunked = True
    upgrade_value = None
    if b"upgrade" in connection:
        upgrade_value = next((v for n, v in _raw_headers(data) if n == b"upgrade"), None)
    expect = any(n.lower() == b"expect" and v.lower() == b"100-continue" for n, v in headers)
    keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
    path = target.split(b"?", 1)[0].decode("latin-1")
    return RequestHead(
        method=method.decode("latin-1"),
        target=target,
        path=path,
        http10=http10,
        headers=[(n, v) for n, v in headers if not (expect and n.lower() == b"expect")],
        content_length=content_length,
        chunked=chunked,
        keep_alive=keep_alive,
        upgrade=upgrade_value,
        expect_continue=expect,
    )


def _raw_headers(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in data.rstrip(b"\r\n").split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out.append((name.lower(), value.strip(b" \t")))
    return out


def parse_response_head(data: bytes, *, request_method: str) -> ResponseHead:
    """Parse a response head; framing depends on the request (HEAD has no body)."""
    start, headers, connection, codings = _split_head(data)
    parts = start.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpFramingError(f"bad status line {start[:80]!r}")
    status = int(parts[1])
    http10 = parts[0] == b"HTTP/1.0"
    keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
    no_body = request_method == "HEAD" or status < 200 or status in (204, 304)
    chunked = bool(codings) and codings[-1] == b"chunked" and not no_body
    content_length = None if (chunked or no_body) else _content_length(headers)
    if no_body:
        content_length = 0
    elif codings and not chunked:
        keep_alive = False  # body runs until the upstream closes
    return ResponseHead(status, start, headers, content_length, chunked, keep_alive)


def build_head(start_line: bytes, headers: list[tuple[bytes, bytes]], extra: bytes = b"") -> bytes:
    """Serialise a head; `extra` is raw header lines (each ending in CRLF) the gate adds."""
    parts = [start_line, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (extra, b"\r\n")
    return b"".join(parts)


class ChunkedScanner:
    """Follows chunked framing across arbitrary slices of a body to find where it ends.

    `feed()` returns how many bytes of the slice belong to the body; fewer than given only
    once the final chunk and trailers have passed, after which `done` is true. `size` is the
    sum of the chunk sizes announced so far (a body limit can be checked before relaying).
    """

    __slots__ = ("_line", "_remaining", "_state", "done", "size")

    _SIZE, _DATA, _TRAILER = 0, 1, 2

    def __init__(self) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self.done = False
        self.size = 0

    def feed(self, data: bytes) -> int:
        pos, end = 0, len(data)
        while pos < end:
            if self._state == self._DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._SIZE
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                if len(self._line) > _MAX_CHUNK_LINE:
                    raise HttpFramingError("chunk line too long")
                return end
            line = (self._line + data[pos:newline]).rstrip(b"\r")
            self._line = b""
            pos = newline + 1
            if self._state == self._SIZE:
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HttpFramingError(f"bad chunk size {size_text[:20]!r}") from None
                if size < 0:
                    raise HttpFramingError("negative chunk size")
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self.size += size
                    self._remaining = size + 2  # the data and its CRLF
                    self._state = self._DATA
            elif not line:  # the blank line after the (usually empty) trailers
                self.done = True
                return pos
        return pos
