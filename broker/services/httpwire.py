"""HTTP/1.1 framing for the gate: just enough parsing to relay bytes verbatim.

The gate does not re-encode bodies. It reads a message head, rewrites the few headers a
proxy must own (`Host`, hop-by-hop ones), and then copies body bytes as they arrive while
following the framing (`Content-Length` or chunked) only to know where the message ends.
That keeps per-chunk work to a slice and a counter, which is what keeps a Python gate close
to nginx on a streamed answer (see scripts/bench-gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

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
_WS = (0x20, 0x09)  # space and tab, as bytes items
# Header names the parsers look at; every other line is relayed as it came, untouched.
_REQUEST_WATCHED = HOP_BY_HOP | {
    b"host", b"content-length", b"transfer-encoding", b"expect", b"close"
}  # fmt: skip
_RESPONSE_WATCHED = HOP_BY_HOP | {b"content-length", b"transfer-encoding", b"close"}
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class HttpFramingError(ValueError):
    """A message head or body framing that the gate will not relay."""


@dataclass(slots=True)
class RequestHead:
    method: str
    target: bytes
    path: str
    http10: bool
    # End-to-end header lines as received, each ending in CRLF, without hop-by-hop ones and
    # without Host (the gate writes the upstream's own).
    headers: bytes
    content_length: int | None
    chunked: bool
    keep_alive: bool
    upgrade: bytes | None  # the protocol asked for (websocket), with `Connection: upgrade`
    expect_continue: bool


@dataclass(slots=True)
class ResponseHead:
    status: int
    status_line: bytes
    headers: bytes  # end-to-end header lines as received, each ending in CRLF
    content_length: int | None
    chunked: bool
    keep_alive: bool


# What one pass over the header lines found: the relayed lines (without CRLF), the
# `Connection` tokens (lowercase), the `Content-Length` values, the `Transfer-Encoding`
# codings (lowercase, in order), whether `Expect: 100-continue` came (then every Expect line
# is dropped: the gate answers it), and the first `Upgrade` value.
_Fields = tuple[list[bytes], set[bytes], list[bytes], list[bytes], bool, "bytes | None"]


def _lines(data: bytes) -> list[bytes]:
    """The head's lines, start line first; refuses a head that is not CRLF-framed."""
    if not data.endswith(b"\r\n\r\n"):
        raise HttpFramingError("incomplete head")
    lines = data.split(b"\r\n")
    separators = len(lines) - 1
    if data.count(b"\n") != separators or data.count(b"\r") != separators:
        # a bare CR or LF: some servers end a line there and others do not (smuggling)
        raise HttpFramingError("bare CR or LF in the head")
    del lines[-2:]
    return lines


def _fields(lines: list[bytes], watched: frozenset[bytes]) -> _Fields:
    """One pass over the header lines (`lines[1:]`); only watched names are looked into."""
    kept: list[bytes] = []
    connection: set[bytes] = set()
    lengths: list[bytes] = []
    codings: list[bytes] = []
    expects: list[bytes] = []
    closes: list[bytes] = []
    expect_continue = False
    upgrade: bytes | None = None
    for line in islice(lines, 1, None):
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1] in _WS or line[0] in _WS:
            # obsolete line folding or "Name :" are request-smuggling vectors: refuse them
            raise HttpFramingError(f"malformed header line {line[:60]!r}")
        lower = name.lower()
        if lower not in watched:
            kept.append(line)
            continue
        value = value.strip(b" \t")
        if lower == b"content-length":
            lengths.append(value)
            kept.append(line)
        elif lower == b"transfer-encoding":
            codings.extend(t.strip().lower() for t in value.split(b",") if t.strip())
            kept.append(line)
        elif lower == b"connection":
            connection.update(t.strip().lower() for t in value.split(b","))
        elif lower == b"expect":
            expect_continue = expect_continue or value.lower() == b"100-continue"
            expects.append(line)
        elif lower == b"upgrade":
            if upgrade is None:
                upgrade = value
        elif lower == b"close":  # a header named like the token: dropped with it
            closes.append(line)
        # other hop-by-hop headers and Host are dropped
    if closes and b"close" not in connection:
        kept += closes
    if connection:
        # Connection may name more end-to-end headers to drop (RFC 9110 section 7.6.1)
        extra = connection - watched
        if extra:
            kept = [k for k in kept if k.partition(b":")[0].lower() not in extra]
        if not connection.isdisjoint(_FRAMING):
            raise HttpFramingError("Connection lists a framing header")
        if b"expect" in connection:
            expects, expect_continue = [], False
    if expects and not expect_continue:
        kept += expects  # other expectations are the upstream's to answer
    return kept, connection, lengths, codings, expect_continue, upgrade


def _content_length(lengths: list[bytes]) -> int | None:
    if not lengths:
        return None
    value = lengths[0]
    if len(lengths) > 1 and any(v != value for v in lengths):
        raise HttpFramingError("conflicting Content-Length headers")
    if not value.isdigit():
        raise HttpFramingError(f"bad Content-Length {value[:20]!r}")
    return int(value)


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request head (up to and including the blank line)."""
    lines = _lines(data)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpFramingError(f"bad request line {lines[0][:80]!r}")
    method, target, version = parts
    http10 = version == b"HTTP/1.0"
    kept, connection, lengths, codings, expect_continue, upgrade = _fields(
        lines, _REQUEST_WATCHED
    )
    content_length = _content_length(lengths)
    chunked = False
    if codings:
        # Only a final "chunked" tells where the body ends; anything else cannot be relayed
        # safely, and a request carrying both framings is the classic smuggling attempt.
        if codings[-1] != b"chunked" or content_length is not None or http10:
            raise HttpFramingError("unsupported Transfer-Encoding")
        chunked = True
    keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
    return RequestHead(
        method.decode("latin-1"),
        target,
        target.partition(b"?")[0].decode("latin-1"),
        http10,
        b"\r\n".join(kept) + b"\r\n" if kept else b"",
        content_length,
        chunked,
        keep_alive,
        upgrade if b"upgrade" in connection else None,
        expect_continue,
    )


def parse_response_head(data: bytes, *, request_method: str) -> ResponseHead:
    """Parse a response head; framing depends on the request (HEAD has no body)."""
    lines = _lines(data)
    start = lines[0]
    parts = start.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpFramingError(f"bad status line {start[:80]!r}")
    status = int(parts[1])
    http10 = parts[0] == b"HTTP/1.0"
    kept, connection, lengths, codings, _, _ = _fields(lines, _RESPONSE_WATCHED)
    keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
    no_body = request_method == "HEAD" or status < 200 or status in (204, 304)
    chunked = bool(codings) and codings[-1] == b"chunked" and not no_body
    content_length = None if (chunked or no_body) else _content_length(lengths)
    if no_body:
        content_length = 0
    elif codings and not chunked:
        keep_alive = False  # body runs until the upstream closes
    headers = b"\r\n".join(kept) + b"\r\n" if kept else b""
    return ResponseHead(status, start, headers, content_length, chunked, keep_alive)


def build_head(start_line: bytes, headers: bytes, extra: bytes = b"") -> bytes:
    """Serialise a head; `extra` is raw header lines (each ending in CRLF) the gate adds."""
    return b"".join((start_line, b"\r\n", headers, extra, b"\r\n"))


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
        if self._state == self._SIZE and not self._line:
            # The usual slice of a stream is one whole chunk, "<hex>\r\n<data>\r\n": take it
            # in one step. Anything else (extensions, several chunks, the last chunk, a chunk
            # cut across slices, garbage) goes the long way below.
            newline = data.find(b"\n", 0, 18)
            if newline > 1 and data[newline - 1] == 0x0D and data[: newline - 1].isalnum():
                try:
                    size = int(data[: newline - 1], 16)
                except ValueError:
                    size = 0
                if size and newline + size + 3 == len(data):
                    self.size += size
                    return len(data)
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
