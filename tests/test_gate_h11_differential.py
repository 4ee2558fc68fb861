"""Differential test: the gate's request parser against h11, on generated requests.

Each generated request (a head, then a Content-Length or chunked body, then the bytes of a
next request) is read by the gate's own code (`parse_request_head`, then `ChunkedScanner`
fed in random slices, as the socket would cut it) and by h11, a reference implementation
of RFC 9112. They must agree on accept / reject, on where the body ends, and on the body's
bytes.

Where they differ on purpose, the generator tags the request with what makes it differ,
and the test allows exactly that difference, in the stated direction:

Gate stricter than h11 (h11 accepts, the gate refuses, as RFC 9112 allows or asks):
  ctl_value      a control character (other than NUL and whitespace) in a field value:
                 not field-vchar (RFC 9110 section 5.5); h11's value pattern lets it through
  obs_fold       obsolete line folding: RFC 9112 section 5.2 lets a server refuse it (400),
                 h11 unfolds it
  bare_lf        a line ended by LF alone: RFC 9112 section 2.2 lets a recipient accept it,
                 a proxy that does is a smuggling vector
  version        HTTP/1.2, HTTP/2.0 on an HTTP/1 connection: h11 takes any "d.d"
  cl_list        "Content-Length: 5, 5": h11 folds the list, the gate wants one number
  cl_te          Content-Length with Transfer-Encoding: RFC 9112 section 6.3 lets TE win;
                 a proxy that refuses cannot be desynchronised by the pair
  te_http10      Transfer-Encoding in an HTTP/1.0 request: RFC 9112 section 6.1 says the
                 framing is faulty; h11 reads it chunked
  conn_framing   Connection naming Content-Length or Transfer-Encoding (the gate would drop
                 the framing header it names)
  ext_syntax     a chunk extension that is not `;name[=token|quoted]` (h11 takes ";.*")
  long_ext       a chunk line over 4 KiB: the gate bounds it, h11 only at 16 KiB
  size_ows       whitespace after a chunk size with no extension ("5 "): not in the grammar
Gate laxer than h11 (the gate accepts what RFC 9112 allows and h11 does not):
  ext_bws        whitespace before ";" of a chunk extension (BWS, RFC 9112 section 7.1.1)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.services.httpwire import ChunkedScanner, HttpFramingError, parse_request_head

GATE_STRICTER = {"ctl_value", "obs_fold", "bare_lf", "version", "cl_list", "cl_te",
                 "te_http10", "conn_framing", "ext_syntax", "long_ext", "size_ows"}  # fmt: skip
GATE_LAXER = {"ext_bws"}
NEXT = b"GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n"


@dataclass(frozen=True)
class Accepted:
    end: int  # where the message ends in the stream (the next request starts there)
    body: bytes  # the body's content (de-chunked)


REJECTED = "rejected"
INCOMPLETE = "incomplete"
Outcome = Accepted | str


# ---------------------------------------------------------------- generation
@dataclass
class Generated:
    stream: bytes
    tags: set[str]
    cuts: list[int]


_METHODS = [(b"GET", ""), (b"POST", ""), (b"PUT", ""), (b"M-SEARCH", ""), (b"PO\x00ST", ""),
            (b"P(ST", ""), (b"", "")]  # fmt: skip
_TARGETS = [b"/", b"/api/chat?x=1&y=%20", b"/a\x00b", b"/a\x01b", b"/\x7f", b"/\xff", b"*"]
_VERSIONS = [(b"HTTP/1.1", ""), (b"HTTP/1.0", ""), (b"HTTP/1.2", "version"),
             (b"HTTP/2.0", "version"), (b"http/1.1", ""), (b"HTTP/1.1 ", "")]  # fmt: skip
_NAMES = [(b"X-A", ""), (b"Accept", ""), (b"X A", ""), (b"X(A)", ""), (b"X\x00A", ""),
          (b"X-A ", ""), (b"\xe9t\xe9", "")]  # fmt: skip
_VALUES = [(b"v", ""), (b"", ""), (b"  spaced  ", ""), (b"a\tb", ""), (b"\x80\xff", ""),
           (b"a\x00b", ""), (b"a\x01b", "ctl_value"), (b"a\x1bb", "ctl_value"),
           (b"a\x7fb", "ctl_value"), (b"a\x0bb", "")]  # fmt: skip


@st.composite
def _chunk(draw: st.DrawFn, tags: set[str], last: bool) -> bytes:
    data = b"" if last else draw(st.binary(min_size=1, max_size=12))
    size = len(data)
    if draw(st.booleans()):  # half the chunks are well-formed, so whole bodies often are
        ext = draw(st.sampled_from([b"", b";a=b"]))
        return (b"%x%s\r\n\r\n" % (size, ext)) if last else b"%x%s\r\n%s\r\n" % (size, ext, data)
    form = draw(st.sampled_from(["lower", "upper", "zeros", "0x", "plus", "underscore",
                                 "lead_sp", "trail_sp", "empty"]))  # fmt: skip
    text = {"lower": b"%x" % size, "upper": b"%X" % size, "zeros": b"00%x" % size,
            "0x": b"0x%x" % size, "plus": b"+%x" % size, "underscore": b"0_%x" % size,
            "lead_sp": b" %x" % size, "trail_sp": b"%x " % size, "empty": b""}[form]  # fmt: skip
    ext = draw(st.sampled_from(["", ";a", ";a=b", ';a="q \\" q"', " ;a=b", ";", ";a=\x00",
                                ";a b", "long"]))  # fmt: skip
    ext_bytes = b";" + b"x" * 5000 if ext == "long" else ext.encode()
    if ext_bytes:
        text += ext_bytes
        if ext == " ;a=b":
            tags.add("ext_bws")
        elif ext in (";", ";a=\x00", ";a b"):
            tags.add("ext_syntax")
        elif ext == "long":
            tags.add("long_ext")
    if form == "trail_sp":  # "5 ;a" is BWS before an extension, "5 " alone is not
        tags.add("ext_bws" if ext_bytes else "size_ows")
    ending = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    if ending == b"\n":
        tags.add("bare_lf")  # the gate refuses; h11 waits for a CRLF that never comes
    if last:
        trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"X T: 1\r\n", b"X-T: a\x01\r\n"]))
        if trailer == b"X-T: a\x01\r\n":
            tags.add("ctl_value")
        return text + ending + trailer + b"\r\n"
    after = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"", b"\n", b"XX"]))
    return text + ending + data + after


@st.composite
def requests(draw: st.DrawFn) -> Generated:
    tags: set[str] = set()

    def pick(options: list[tuple[bytes, str]]) -> bytes:
        value, tag = draw(st.sampled_from(options))
        if tag:
            tags.add(tag)
        return value

    # half the heads are well-formed, so that the bodies behind them get read
    clean = draw(st.booleans())
    if clean:
        method, target, version = b"POST", b"/api/chat", b"HTTP/1.1"
    else:
        method, target = pick(_METHODS), draw(st.sampled_from(_TARGETS))
        version = pick(_VERSIONS)
    http10 = version == b"HTTP/1.0"
    lines = [b"%s %s %s" % (method, target, version)]
    lines += [b"Host: localhost"] * (1 if clean else draw(st.sampled_from([0, 1, 1, 2])))
    for _ in range(draw(st.integers(0, 2))):
        lines.append(pick(_NAMES[:2] if clean else _NAMES) + b":"
                     + pick(_VALUES[:5] if clean else _VALUES))  # fmt: skip
    if not clean and draw(st.booleans()) and len(lines) > 1:
        lines.append(b" folded")
        tags.add("obs_fold")
    body = draw(st.binary(max_size=10))
    framing = draw(st.sampled_from(["none", "length", "length", "two_lengths", "other_length",
                                    "length_list", "length_plus", "chunked", "chunked",
                                    "Chunked", "chunked_identity", "gzip_chunked", "two_te",
                                    "empty_te", "length_and_chunked", "conn_framing"]))  # fmt: skip
    chunked = framing in ("chunked", "Chunked", "length_and_chunked", "conn_framing")
    length = b"Content-Length: %d" % len(body)
    lines += {
        "none": [], "length": [length], "two_lengths": [length, length],
        "other_length": [length, b"Content-Length: %d" % (len(body) + 1)],
        "length_list": [length + b", %d" % len(body)],
        "length_plus": [b"Content-Length: +%d" % len(body)],
        "chunked": [b"Transfer-Encoding: chunked"], "Chunked": [b"Transfer-Encoding: Chunked"],
        "chunked_identity": [b"Transfer-Encoding: chunked, identity"],
        "gzip_chunked": [b"Transfer-Encoding: gzip, chunked"],
        "two_te": [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
        "empty_te": [b"Transfer-Encoding:"],
        "length_and_chunked": [length, b"Transfer-Encoding: chunked"],
        "conn_framing": [b"Connection: transfer-encoding", b"Transfer-Encoding: chunked"],
    }[framing]  # fmt: skip
    if framing == "length_list":
        tags.add("cl_list")
    if framing in ("length_and_chunked", "conn_framing"):
        tags.add("cl_te" if framing == "length_and_chunked" else "conn_framing")
    if chunked and http10:
        tags.add("te_http10")
    separator = b"\r\n"
    if not clean and draw(st.integers(0, 4)) == 0:
        separator = b"\n"
        tags.add("bare_lf")
    head = separator.join(lines) + separator + separator
    if chunked:
        content = b"".join(draw(_chunk(tags, last=False)) for _ in range(draw(st.integers(0, 3))))
        content += draw(_chunk(tags, last=True))
    elif framing in ("none", "chunked_identity", "gzip_chunked", "two_te", "empty_te"):
        content = b""
    else:
        content = body
    stream = head + content + NEXT
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=6))
    return Generated(stream, tags, cuts)


# ---------------------------------------------------------------- the two readers
def _dechunk(raw: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        newline = raw.index(b"\r\n", pos)
        size = int(raw[pos:newline].split(b";")[0].strip(b" \t"), 16)
        if size == 0:
            return out
        out += raw[newline + 2 : newline + 2 + size]
        pos = newline + 2 + size + 2


def gate_read(stream: bytes, cuts: list[int]) -> Outcome:
    end = stream.find(b"\r\n\r\n")
    if end < 0:
        return REJECTED if b"\n\n" in stream or b"\n\r\n" in stream else INCOMPLETE
    try:
        head = parse_request_head(stream[: end + 4])
    except HttpFramingError:
        return REJECTED
    start = end + 4
    if head.chunked:
        scanner, used = ChunkedScanner(), 0
        points = sorted({start, len(stream), *(c for c in cuts if c > start)})
        try:
            for a, b in itertools.pairwise(points):
                used += scanner.feed(stream[a:b])
                if scanner.done:
                    break
        except HttpFramingError:
            return REJECTED
        if not scanner.done:
            return INCOMPLETE
        return Accepted(start + used, _dechunk(stream[start : start + used]))
    length = head.content_length or 0
    if len(stream) - start < length:
        return INCOMPLETE
    return Accepted(start + length, stream[start : start + length])


def h11_read(stream: bytes) -> Outcome:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return INCOMPLETE
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
    except h11.RemoteProtocolError:
        return REJECTED
    trailing, _ = conn.trailing_data
    return Accepted(len(stream) - len(trailing), body)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_the_gate_and_h11_agree_on_every_request(request: Generated) -> None:
    gate = gate_read(request.stream, request.cuts)
    reference = h11_read(request.stream)
    if isinstance(gate, Accepted) and isinstance(reference, Accepted):
        assert gate == reference  # the same end, the same bytes
        return
    gate_ok, reference_ok = isinstance(gate, Accepted), isinstance(reference, Accepted)
    if reference_ok and not gate_ok:
        assert gate == REJECTED, "the gate must refuse, never wait on, what it will not read"
        assert request.tags & GATE_STRICTER, f"the gate refused a request h11 accepts: {gate}"
    elif gate_ok and not reference_ok:
        assert request.tags & GATE_LAXER, f"the gate accepted a request h11 {reference}"
    elif not request.tags & (GATE_STRICTER | GATE_LAXER):
        assert gate == reference  # both refuse, or both wait for more


def test_the_generator_reaches_both_verdicts() -> None:
    """Guards the test itself: valid and invalid requests both come out, chunked ones too."""
    seen: set[tuple[bool, bool]] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(requests())
    def collect(request: Generated) -> None:
        chunked = b"chunked" in request.stream.split(b"\r\n\r\n")[0].lower()
        seen.add((isinstance(h11_read(request.stream), Accepted), chunked))

    collect()
    assert seen == {(True, True), (True, False), (False, True), (False, False)}
