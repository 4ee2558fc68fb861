"""Message heads on the gate's wire, byte for byte: what is relayed, dropped and answered.

Fast unit tests of `broker.services.httpwire` (no socket): each pins one behaviour that a
mutant of the parser could change without the generated-head tests noticing (issue 21).
"""

from __future__ import annotations

import pytest

from broker.services.httpwire import (
    HttpFramingError,
    build_head,
    parse_request_head,
    parse_response_head,
)


def request(*lines: bytes, start: bytes = b"GET /x HTTP/1.1") -> bytes:
    return b"\r\n".join([start, *lines]) + b"\r\n\r\n"


def response(*lines: bytes, start: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return b"\r\n".join([start, *lines]) + b"\r\n\r\n"


# -- Upgrade ---------------------------------------------------------------------------------


def test_upgrade_is_offered_only_with_connection_upgrade_and_never_relayed() -> None:
    head = parse_request_head(
        request(b"Host: h", b"Connection: Upgrade", b"Upgrade:  websocket ", b"Upgrade: h2c")
    )
    assert head.upgrade == b"websocket"  # the first one, its value stripped
    assert head.headers == b""  # both hop-by-hop lines are the gate's
    plain = parse_request_head(request(b"Host: h", b"Upgrade: websocket"))
    assert plain.upgrade is None and plain.headers == b""


# -- Expect: 100-continue ----------------------------------------------------------------------


def test_expect_100_continue_is_answered_by_the_gate_and_not_relayed() -> None:
    head = parse_request_head(
        request(b"Host: h", b"Expect: 100-Continue", b"Content-Length: 3", start=b"POST / HTTP/1.1")
    )
    assert head.expect_continue is True
    assert head.headers == b"Content-Length: 3\r\n"


def test_other_expectations_go_to_the_upstream() -> None:
    head = parse_request_head(request(b"Host: h", b"Expect: something-else", b"X: 1"))
    assert head.expect_continue is False
    assert head.headers == b"X: 1\r\nExpect: something-else\r\n"


def test_expect_named_by_connection_is_dropped_and_not_answered() -> None:
    head = parse_request_head(request(b"Host: h", b"Connection: expect", b"Expect: 100-continue"))
    assert head.expect_continue is False and head.headers == b""


def test_an_http10_client_is_never_promised_100_continue() -> None:
    head = parse_request_head(request(b"Expect: 100-continue", start=b"GET / HTTP/1.0"))
    assert head.expect_continue is False and head.headers == b""


# -- Connection-named headers ----------------------------------------------------------------


def test_headers_named_by_connection_are_dropped_even_with_a_colon_in_their_value() -> None:
    head = parse_request_head(
        request(
            b"Host: h",
            b"Connection: X-Hop, keep-alive",
            b"X-Hop: a:b",
            b"X-Hop-Not: c:d",
            b"X-Keep: e",
        )
    )
    assert head.headers == b"X-Hop-Not: c:d\r\nX-Keep: e\r\n"
    answer = parse_response_head(
        response(b"Connection: x-trace", b"X-Trace: t:1", b"Content-Length: 0"),
        request_method="GET",
    )
    assert answer.headers == b"Content-Length: 0\r\n"


def test_a_header_named_close_goes_with_the_close_token_only() -> None:
    kept = parse_request_head(request(b"Host: h", b"Close: 1"))
    assert kept.headers == b"Close: 1\r\n" and kept.keep_alive
    dropped = parse_request_head(request(b"Host: h", b"Connection: close", b"Close: 1"))
    assert dropped.headers == b"" and not dropped.keep_alive


@pytest.mark.parametrize("name", [b"Content-Length", b"Transfer-Encoding"])
def test_connection_may_not_name_a_framing_header(name: bytes) -> None:
    with pytest.raises(HttpFramingError, match=r"^Connection lists a framing header$"):
        parse_request_head(request(b"Host: h", b"Connection: " + name.lower()))


# -- keep-alive, HTTP/1.0 and 1.1 --------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "connection", "keep_alive"),
    [
        (b"GET / HTTP/1.0", None, False),
        (b"GET / HTTP/1.0", b"Connection: Keep-Alive", True),
        (b"GET / HTTP/1.1", None, True),
        (b"GET / HTTP/1.1", b"Connection: close", False),
        (b"GET / HTTP/1.1", b"Connection: keep-alive", True),
    ],
)
def test_request_keep_alive_by_version(
    start: bytes, connection: bytes | None, keep_alive: bool
) -> None:
    lines = [b"Host: h"] + ([connection] if connection else [])
    head = parse_request_head(request(*lines, start=start))
    assert head.keep_alive is keep_alive
    assert head.http10 is start.endswith(b"1.0")


@pytest.mark.parametrize(
    ("start", "connection", "keep_alive"),
    [
        (b"HTTP/1.0 200 OK", None, False),
        (b"HTTP/1.0 200 OK", b"Connection: keep-alive", True),
        (b"HTTP/1.1 200 OK", None, True),
        (b"HTTP/1.1 200 OK", b"Connection: Close", False),
    ],
)
def test_response_keep_alive_by_version(
    start: bytes, connection: bytes | None, keep_alive: bool
) -> None:
    lines = [b"Content-Length: 0"] + ([connection] if connection else [])
    head = parse_response_head(response(*lines, start=start), request_method="GET")
    assert head.keep_alive is keep_alive
    assert head.headers == b"Content-Length: 0\r\n"


# -- Host ----------------------------------------------------------------------------------------


def test_host_is_taken_out_of_the_relayed_lines_with_its_value_stripped() -> None:
    head = parse_request_head(request(b"HOST: \tgpu.example:11434 ", b"Accept: */*"))
    assert head.host == b"gpu.example:11434" and head.headers == b"Accept: */*\r\n"


@pytest.mark.parametrize(
    ("start", "hosts", "message"),
    [
        (b"GET / HTTP/1.1", [], "an HTTP/1.1 request needs a Host header"),
        (b"GET / HTTP/1.1", [b"Host: a", b"Host: a"], "a request needs exactly one Host header"),
        (b"GET / HTTP/1.0", [b"Host: a", b"Host: b"], "a request needs exactly one Host header"),
    ],
)
def test_host_count_is_enforced(start: bytes, hosts: list[bytes], message: str) -> None:
    with pytest.raises(HttpFramingError, match=r"^" + message + "$") as raised:
        parse_request_head(request(*hosts, start=start))
    assert raised.value.status == 400


def test_an_http10_request_may_come_without_host() -> None:
    head = parse_request_head(request(start=b"GET /a?b=c HTTP/1.0"))
    assert head.host is None and head.method == "GET"
    assert head.target == b"/a?b=c" and head.path == "/a"


# -- request framing ---------------------------------------------------------------------------


def test_chunked_request() -> None:
    head = parse_request_head(
        request(b"Host: h", b"Transfer-Encoding:  Chunked ", start=b"POST / HTTP/1.1")
    )
    assert head.chunked is True and head.content_length is None
    assert head.headers == b"Transfer-Encoding:  Chunked \r\n"


@pytest.mark.parametrize(
    ("lines", "message", "status"),
    [
        ([b"Transfer-Encoding: gzip, chunked"], "unsupported Transfer-Encoding", 501),
        (
            [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
            "unsupported Transfer-Encoding",
            501,
        ),
        (
            [b"Transfer-Encoding: chunked", b"Content-Length: 3"],
            "both Content-Length and Transfer-Encoding",
            400,
        ),
    ],
)
def test_request_framing_the_gate_cannot_follow_is_refused(
    lines: list[bytes], message: str, status: int
) -> None:
    with pytest.raises(HttpFramingError, match=r"^" + message + "$") as raised:
        parse_request_head(request(b"Host: h", *lines, start=b"POST / HTTP/1.1"))
    assert raised.value.status == status


def test_transfer_encoding_in_http10_is_refused() -> None:
    with pytest.raises(HttpFramingError, match=r"^Transfer-Encoding in an HTTP/1.0 request$"):
        parse_request_head(request(b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.0"))


@pytest.mark.parametrize(
    ("values", "length"),
    [([b"5"], 5), ([b"7", b"7"], 7), ([b"0"], 0), ([b"9" * 18], 10**18 - 1)],
)
def test_content_length_values(values: list[bytes], length: int) -> None:
    lines = [b"Content-Length: " + v for v in values]
    head = parse_request_head(request(b"Host: h", *lines, start=b"POST / HTTP/1.1"))
    assert head.content_length == length and not head.chunked


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([b"5", b"6"], "conflicting Content-Length headers"),
        ([b"1" * 19], "bad Content-Length b.1111111111111111111."),
        ([b"5, 5"], "bad Content-Length b.5, 5."),
        ([b"9+5"], "bad Content-Length b.9\\+5."),
        ([b""], "bad Content-Length b.."),
    ],
)
def test_content_length_that_is_not_one_number_is_refused(
    values: list[bytes], message: str
) -> None:
    lines = [b"Content-Length: " + v for v in values]
    with pytest.raises(HttpFramingError, match=r"^" + message + "$"):
        parse_request_head(request(b"Host: h", *lines, start=b"POST / HTTP/1.1"))


# -- response framing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "method", "length"),
    [
        (204, "GET", 0),
        (304, "GET", 0),
        (199, "GET", 0),
        (200, "HEAD", 0),
        (200, "GET", 5),
        (205, "GET", 5),
        (303, "GET", 5),
    ],
)
def test_responses_without_a_body(status: int, method: str, length: int) -> None:
    start = b"HTTP/1.1 %d X" % status
    head = parse_response_head(response(b"Content-Length: 5", start=start), request_method=method)
    assert head.status == status and head.status_line == start
    assert head.content_length == length and not head.chunked


def test_response_with_transfer_encoding_drops_its_content_length() -> None:
    head = parse_response_head(
        response(
            b"Content-Length: 9",
            b"Transfer-Encoding: gzip, ",
            b"Transfer-Encoding: Chunked",
            b"X: y",
        ),
        request_method="GET",
    )
    assert head.chunked and head.content_length is None and head.keep_alive
    assert head.headers == (b"Transfer-Encoding: gzip, \r\nTransfer-Encoding: Chunked\r\nX: y\r\n")


def test_response_not_ending_in_chunked_runs_until_close() -> None:
    head = parse_response_head(response(b"Transfer-Encoding: gzip"), request_method="GET")
    assert not head.chunked and head.content_length is None and not head.keep_alive
    empty = parse_response_head(response(b"Transfer-Encoding: ,"), request_method="GET")
    assert not empty.chunked and not empty.keep_alive


def test_response_to_head_with_transfer_encoding_has_no_body() -> None:
    head = parse_response_head(response(b"Transfer-Encoding: chunked"), request_method="HEAD")
    assert not head.chunked and head.content_length == 0 and head.keep_alive


def test_response_without_framing_headers_runs_until_close_or_length() -> None:
    head = parse_response_head(response(b"X: 1"), request_method="GET")
    assert head.content_length is None and not head.chunked and head.headers == b"X: 1\r\n"
    bare = parse_response_head(response(), request_method="GET")
    assert bare.headers == b""


# -- refusal reasons (what the gate's 400 says) ------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\n", "incomplete head"),
        (b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", "bare CR or LF in the head"),
        (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", "bare CR or LF in the head"),
        (b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n", "bad request line b'GET /  HTTP/1.1'"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", "obsolete line folding b' folded'"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n\tfolded\r\n\r\n", "obsolete line folding"),
        (b"GET / HTTP/1.1\r\nX: \x01\r\n\r\n", "control character in header line b'X: \\x01'"),
        (b"GET / HTTP/1.1\r\nX: \x7f\r\n\r\n", "control character in header line"),
        (b"GET / HTTP/1.1\r\nX : y\r\n\r\n", "malformed header line b'X : y'"),
    ],
)
def test_a_refused_head_says_why(data: bytes, reason: str) -> None:
    with pytest.raises(HttpFramingError) as raised:
        parse_request_head(data)
    assert str(raised.value) == reason or str(raised.value).startswith(reason)
    assert raised.value.status == 400


def test_a_refused_status_line_says_why() -> None:
    with pytest.raises(HttpFramingError, match=r"^bad status line b'HTTP/1.1 20 OK'$"):
        parse_response_head(b"HTTP/1.1 20 OK\r\n\r\n", request_method="GET")
    with pytest.raises(HttpFramingError, match=r"^bare CR or LF in the head$"):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n", request_method="GET")


def test_a_control_character_in_a_long_line_is_named_by_its_first_60_bytes() -> None:
    line = b"X-Long: " + b"a" * 100 + b"\x00"
    with pytest.raises(HttpFramingError) as raised:
        parse_request_head(request(b"Host: h", line))
    assert str(raised.value) == f"control character in header line {line[:60]!r}"


# -- build_head ----------------------------------------------------------------------------------


def test_build_head_puts_crlf_after_the_start_line_and_a_blank_line_at_the_end() -> None:
    assert build_head(b"HTTP/1.1 200 OK", b"A: 1\r\n", b"B: 2\r\n") == (
        b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n"
    )
    assert build_head(b"GET / HTTP/1.1", b"") == b"GET / HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize(
    ("line", "reason", "keep"),
    [
        (b"X-Long: " + b"a" * 70 + b"\x01", "control character in header line", 60),
        (b" folded" + b"a" * 70, "obsolete line folding", 60),
        (b"X-Long " + b"a" * 70 + b": v", "malformed header line", 60),
    ],
)
def test_a_refused_header_line_is_quoted_by_its_first_60_bytes(
    line: bytes, reason: str, keep: int
) -> None:
    with pytest.raises(HttpFramingError) as raised:
        parse_request_head(request(b"Host: h", line))
    assert str(raised.value) == f"{reason} {line[:keep]!r}"


def test_a_refused_start_line_is_quoted_by_its_first_80_bytes() -> None:
    start = b"GET /" + b"p" * 100 + b" HTTP/1.2"
    with pytest.raises(HttpFramingError) as raised:
        parse_request_head(request(b"Host: h", start=start))
    assert str(raised.value) == f"bad request line {start[:80]!r}"


def test_a_bad_content_length_is_quoted_by_its_first_20_bytes() -> None:
    value = b"1" * 25
    with pytest.raises(HttpFramingError) as raised:
        parse_request_head(request(b"Host: h", b"Content-Length: " + value))
    assert str(raised.value) == f"bad Content-Length {value[:20]!r}"


def test_transfer_encoding_lists_are_split_on_commas_without_spaces() -> None:
    head = parse_response_head(response(b"Transfer-Encoding: gzip,chunked"), request_method="GET")
    assert head.chunked and head.keep_alive
    with pytest.raises(HttpFramingError, match=r"^unsupported Transfer-Encoding$"):
        parse_request_head(request(b"Host: h", b"Transfer-Encoding: chunkedX"))
    with pytest.raises(HttpFramingError, match=r"^unsupported Transfer-Encoding$"):
        parse_request_head(request(b"Host: h", b"Transfer-Encoding: gzip,chunked"))


def test_a_content_length_with_a_colon_is_dropped_when_transfer_encoding_wins() -> None:
    head = parse_response_head(
        response(b"Content-Length: 1:2", b"Transfer-Encoding: chunked"), request_method="GET"
    )
    assert head.headers == b"Transfer-Encoding: chunked\r\n"


def test_a_request_line_and_a_status_line_are_read_field_by_field() -> None:
    head = parse_request_head(request(b"Host: h", start=b"OPTIONS * HTTP/1.1"))
    assert (head.method, head.target, head.path, head.http10) == ("OPTIONS", b"*", "*", False)
    answer = parse_response_head(
        response(b"Content-Length: 0", start=b"HTTP/1.0 404 Not  Found"), request_method="GET"
    )
    assert answer.status == 404 and answer.status_line == b"HTTP/1.0 404 Not  Found"
    assert not answer.keep_alive
