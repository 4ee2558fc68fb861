"""HTTP/1.1 framing for the gate: just enough parsing to relay bytes verbatim.

The gate does not re-encode bodies. It reads a message head, rewrites the few headers a
proxy must own (`Host`, hop-by-hop ones), and then copies body bytes as they arrive while
following the framing (`Content-Length` or chunked) only to know where the message ends.
That keeps per-chunk work to a slice and a counter, which is what keeps a Python gate close
to nginx on a streamed answer (see scripts/bench-gate).
"""

from __future__ import annotations

import re
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

_MAX_CHUNK_LINE = 4096  # a chunk-size line (with its extensions) longer than this is an attack
_MAX_TRAILERS = 16 * 1024  # all trailer lines of one chunked body together
_MAX_LENGTH_DIGITS = 18  # a Content-Length that does not fit in 63 bits is not a length

# RFC 9110/9112 grammar, as whole-head regular expressions: one C-level pass validates the
# start line, every header name (a token) and every value (no control character but HTAB;
# bare CR or LF cannot appear, so no line is split two ways), and refuses obs-fold (a line
# starting with whitespace is not a token). Possessive quantifiers keep each pass linear.
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_FIELD_LINE = _TCHAR + rb"++:[\t\x20-\x7e\x80-\xff]*+\r\n"
_REQUEST_HEAD = re.compile(
    _TCHAR + rb"++ [\x21-\x7e]++ HTTP/1\.[01]\r\n(?:" + _FIELD_LINE + rb")*+\r\n"
)
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.[0-9] [0-9]{3}(?: [\t\x20-\x7e\x80-\xff]*+)?\r\n(?:" + _FIELD_LINE + rb")*+\r\n"
)
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*+"'
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] )
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*+;[ \t]*+" + _TCHAR + rb"++(?:[ \t]*+=[ \t]*+(?:"
    + _TCHAR + rb"++|" + _QUOTED + rb"))?)*+\r\n"
)
_TRAILER_LINE = re.compile(_FIELD_LINE)
# Header names the parsers look at; every other line is relayed as it came, untouched.
_REQUEST_WATCHED = HOP_BY_HOP | {
    b"host", b"content-length", b"transfer-encoding", b"expect", b"close"
}  # fmt: skip
_RESPONSE_WATCHED = HOP_BY_HOP | {b"content-length", b"transfer-encoding", b"close"}
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class HttpFramingError(ValueError):
    """A message head or body framing that the gate will not relay; `status` is the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
    host: bytes | None  # the Host value (OWS stripped); None only for HTTP/1.0 without one


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
# codings (lowercase, in order; None when no such header came), whether
# `Expect: 100-continue` came (then every Expect line is dropped: the gate answers it), the
# first `Upgrade` value, and the Host values.
_Fields = tuple[
    list[bytes], set[bytes], list[bytes], "list[bytes] | None", bool, "bytes | None", list[bytes]
]


def _request_lines(data: bytes) -> list[bytes]:
    """The head's lines, request line first, once the whole head obeys the grammar."""
    if _REQUEST_HEAD.fullmatch(data) is None:
        raise HttpFramingError(_why_not(data, _START_LINE, "request"))
    lines = data.split(b"\r\n")
    del lines[-2:]
    return lines


def _response_lines(data: bytes) -> list[bytes]:
    if _RESPONSE_HEAD.fullmatch(data) is None:
        raise HttpFramingError(_why_not(data, _STATUS_LINE, "status"))
    lines = data.split(b"\r\n")
    del lines[-2:]
    return lines


_START_LINE = re.compile(_TCHAR + rb"++ [\x21-\x7e]++ HTTP/1\.[01]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] [0-9]{3}(?: [\t\x20-\x7e\x80-\xff]*+)?")
_FIELD = re.compile(_TCHAR + rb"++:[\t\x20-\x7e\x80-\xff]*+")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _why_not(data: bytes, start_line: re.Pattern[bytes], what: str) -> str:
    """A readable reason for a head the grammar refused (only refused heads come here)."""
    if not data.endswith(b"\r\n\r\n"):
        return "incomplete head"
    body = data[:-4]
    if body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n"):
        # a bare CR or LF: some servers end a line there and others do not (smuggling)
        return "bare CR or LF in the head"
    lines = body.split(b"\r\n")
    if start_line.fullmatch(lines[0]) is None:
        return f"bad {what} line {lines[0][:80]!r}"
    for line in lines[1:]:
        if _FIELD.fullmatch(line) is None:
            if line[:1] in (b" ", b"\t"):
                return f"obsolete line folding {line[:60]!r}"
            if _CTL.search(line) is not None:
                return f"control character in header line {line[:60]!r}"
            return f"malformed header line {line[:60]!r}"
    return "malformed head"


def _fields(lines: list[bytes], watched: frozenset[bytes]) -> _Fields:
    """One pass over the header lines (`lines[1:]`); only watched names are looked into."""
    kept: list[bytes] = []
    connection: set[bytes] = set()
    lengths: list[bytes] = []
    codings: list[bytes] | None = None
    expects: list[bytes] = []
    closes: list[bytes] = []
    hosts: list[bytes] = []
    expect_continue = False
    upgrade: bytes | None = None
    for line in islice(lines, 1, None):
        # the grammar already checked the line: a token, a colon, a value without CTLs
        name, _, value = line.partition(b":")
        lower = name.lower()
        if lower not in watched:
            kept.append(line)
            continue
        # strip() takes SP and HTAB: the grammar let no other whitespace through
        value = value.strip()
        if lower == b"content-length":
            lengths.append(value)
            kept.append(line)
        elif lower == b"transfer-encoding":
            if codings is None:
                codings = []
            codings.extend(t.strip().lower() for t in value.split(b","))
            kept.append(line)
        elif lower == b"host":
            hosts.append(value)
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
        # other hop-by-hop headers are dropped
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
    return kept, connection, lengths, codings, expect_continue, upgrade, hosts


def _content_length(lengths: list[bytes]) -> int | None:
    if not lengths:
        return None
    value = lengths[0]
    if any(v != value for v in lengths[1:]):
        raise HttpFramingError("conflicting Content-Length headers")
    # digits only: no sign, no list ("5, 5"), nothing int() would forgive ("0_5", " 5")
    if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
        raise HttpFramingError(f"bad Content-Length {value[:20]!r}")
    return int(value)


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request head (up to and including the blank line), as RFC 9112 asks."""
    lines = _request_lines(data)
    method, target, version = lines[0].split()  # single spaces: the grammar checked
    http10 = version == b"HTTP/1.0"
    kept, connection, lengths, codings, expect_continue, upgrade, hosts = _fields(
        lines, _REQUEST_WATCHED
    )
    # RFC 9112 section 3.2: exactly one Host in HTTP/1.1, never two in any version
    if len(hosts) > 1 or (not hosts and not http10):
        raise HttpFramingError("a request needs exactly one Host header"
                               if hosts else "an HTTP/1.1 request needs a Host header")  # fmt: skip
    content_length = _content_length(lengths)
    chunked = False
    if codings is not None:
        # A request carrying both framings is the classic smuggling attempt, and HTTP/1.0
        # has no chunked framing; anything but a single "chunked" is a body whose end the
        # gate cannot find (RFC 9112 section 6.1: 501 for a coding it does not understand).
        if lengths:
            raise HttpFramingError("both Content-Length and Transfer-Encoding")
        if http10:
            raise HttpFramingError("Transfer-Encoding in an HTTP/1.0 request")
        if codings != [b"chunked"]:
            raise HttpFramingError("unsupported Transfer-Encoding", 501)
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
        expect_continue and not http10,  # an HTTP/1.0 client never gets 100 Continue
        hosts[0] if hosts else None,
    )


def parse_response_head(data: bytes, *, request_method: str) -> ResponseHead:
    """Parse a response head; framing depends on the request (HEAD has no body)."""
    lines = _response_lines(data)
    start = lines[0]
    version, status_text = start.split(b" ", 2)[:2]  # pragma: no mutate (see below)
    # The grammar leaves exactly one way to split: neither the version nor the status code
    # holds a space, so another separator or maxsplit gives the same two fields.
    status = int(status_text)
    http10 = version == b"HTTP/1.0"
    kept, connection, lengths, codings, _, _, _ = _fields(lines, _RESPONSE_WATCHED)
    keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
    no_body = request_method == "HEAD" or status < 200 or status in (204, 304)
    content_length: int | None
    if codings is not None:
        # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, and a proxy
        # must drop the Content-Length before relaying (a client trusting it would desync)
        if lengths:
            kept = [k for k in kept if k.partition(b":")[0].lower() != b"content-length"]
        codings = [c for c in codings if c]
        chunked = bool(codings) and codings[-1] == b"chunked" and not no_body
        content_length = 0 if no_body else None
        if not chunked and not no_body:
            keep_alive = False  # body runs until the upstream closes
    else:
        chunked = False
        content_length = 0 if no_body else _content_length(lengths)
    headers = b"\r\n".join(kept) + b"\r\n" if kept else b""
    return ResponseHead(status, start, headers, content_length, chunked, keep_alive)


def build_head(start_line: bytes, headers: bytes, extra: bytes = b"") -> bytes:
    """Serialise a head; `extra` is raw header lines (each ending in CRLF) the gate adds."""
    return b"".join((start_line, b"\r\n", headers, extra, b"\r\n"))


def whole_chunk(data: bytes) -> int:
    """The chunk size when `data` is exactly one whole chunk, "<hex>\r\n<data>\r\n", else 0.

    The usual slice of a stream is one whole chunk: `ChunkedScanner` takes it in one step.
    Anything else (extensions, several chunks, the last chunk, a chunk cut across slices,
    garbage) is 0 here and goes the long way.
    """
    # 16 hex digits and CRLF at most; the bound only shortens the search (a longer size
    # line fails the length check below), so its exact value is not behaviour.
    newline = data.find(b"\r\n", 0, 18)  # pragma: no mutate (the bound only saves time)
    digits = data[:newline]
    # alphanumeric and no "0x" prefix: then int() takes hex digits and nothing else
    # (it forgives "+", "_", spaces and "0x", which RFC 9112 does not)
    # (no CRLF found: `digits` then ends before the last byte, so it cannot end in CRLF)
    if not digits.isalnum() or digits[1:2] in (b"x", b"X"):
        return 0
    try:
        size = int(digits, 16)
    except ValueError:
        return 0
    if newline + size + 4 != len(data) or not data.endswith(b"\r\n"):
        return 0
    return size


class ChunkedScanner:
    """Follows chunked framing across arbitrary slices of a body to find where it ends.

    `feed()` returns how many bytes of the slice belong to the body; fewer than given only
    once the final chunk and trailers have passed, after which `done` is true. `size` is the
    sum of the chunk sizes announced so far (a body limit can be checked before relaying).
    Every chunk line is checked against RFC 9112 section 7.1 (hex digits only, extensions
    well-formed, CRLF after each chunk's data), and a chunk line or the trailers are
    bounded however the bytes are split.
    """

    __slots__ = ("_crlf", "_line", "_remaining", "_state", "_trailers", "done", "size")
    _remaining: int  # data bytes left in the current chunk; set with each chunk line

    _SIZE, _DATA, _CRLF, _TRAILER = 0, 1, 2, 3

    def __init__(self) -> None:
        self._state = self._SIZE
        self._crlf = 0  # bytes of the CRLF after a chunk's data seen so far
        self._line = b""
        self._trailers = 0
        self.done = False
        self.size = 0

    def feed(self, data: bytes) -> int:
        if self._state == self._SIZE and not self._line:
            size = whole_chunk(data)
            if size:
                self.size += size
                return len(data)
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._CRLF
                continue
            if state == self._CRLF:
                if data[pos] != b"\r\n"[self._crlf]:
                    raise HttpFramingError("chunk data not followed by CRLF")
                pos += 1
                self._crlf += 1
                if self._crlf == 2:
                    self._crlf = 0
                    self._state = self._SIZE
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                self._check_length(len(self._line))
                return end
            line = self._line + data[pos : newline + 1] if self._line else data[pos : newline + 1]
            self._line = b""
            pos = newline + 1
            self._check_length(len(line))
            if state == self._SIZE:
                match = _CHUNK_LINE.fullmatch(line)
                if match is None:
                    raise HttpFramingError(f"bad chunk size line {line[:40]!r}")
                size = int(match[1], 16)
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self.size += size
                    self._remaining = size
                    self._state = self._DATA
            elif line == b"\r\n":  # the blank line after the (usually empty) trailers
                self.done = True
                return pos
            elif _TRAILER_LINE.fullmatch(line) is None:
                raise HttpFramingError(f"bad trailer line {line[:40]!r}")
            else:
                self._trailers += len(line)
                if self._trailers > _MAX_TRAILERS:
                    raise HttpFramingError("trailers too large")
        return pos

    def _check_length(self, length: int) -> None:
        if length > _MAX_CHUNK_LINE:
            raise HttpFramingError("chunk line too long")
