"""Chunked bodies on the gate's wire: where a body ends, what is refused, at which limits.

Fast unit tests of `ChunkedScanner` (no socket). Each stream is fed whole, one byte at a
time and in two halves, so both the one-chunk fast path and the line-by-line way are held
to the same answer (issue 21).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.services.httpwire import ChunkedScanner, HttpFramingError, whole_chunk

LINE_LIMIT = 4096  # a chunk-size line, CRLF included, may be this long and no longer


def splits(stream: bytes) -> Iterator[list[bytes]]:
    yield [stream]
    yield [stream[i : i + 1] for i in range(len(stream))]
    half = len(stream) // 2
    yield [stream[:half], stream[half:]]


def scan(slices: list[bytes]) -> tuple[int, bool, int]:
    """(bytes taken as body, done, announced size) after feeding the slices until done."""
    scanner, taken = ChunkedScanner(), 0
    for piece in slices:
        taken += scanner.feed(piece)
        if scanner.done:
            break
    return taken, scanner.done, scanner.size


def test_chunk_extensions_with_several_parameters() -> None:
    body = (
        b'5;name=value;quoted="a;b\\"c" ; flag\t;x = y\r\nhello\r\n'
        b"3;a;b;c\r\nabc\r\n0;last=1;end\r\n\r\n"
    )
    for slices in splits(body + b"NEXT"):
        assert scan(slices) == (len(body), True, 8)


@pytest.mark.parametrize(
    "line",
    [b"5;\r\n", b"5;a=\r\n", b"5;a=b c\r\n", b'5;a="b\r\n', b"5;=b\r\n", b"5 \r\n", b"5;a;\r\n"],
)
def test_malformed_chunk_extensions_are_refused(line: bytes) -> None:
    for slices in splits(line + b"hello\r\n0\r\n\r\n"):
        with pytest.raises(HttpFramingError, match=r"^bad chunk size line "):
            scan(slices)


def _line_of(length: int) -> bytes:
    """A valid chunk-size line of exactly `length` bytes (CRLF included), size 1."""
    return b"1;x=" + b"a" * (length - 6) + b"\r\n"


@pytest.mark.parametrize("cut", [None, 1, LINE_LIMIT - 1, LINE_LIMIT])
def test_a_chunk_line_at_the_limit_passes_and_one_byte_more_is_refused(cut: int | None) -> None:
    for length, ok in [(LINE_LIMIT, True), (LINE_LIMIT + 1, False)]:
        line = _line_of(length)
        assert len(line) == length
        stream = line + b"z\r\n0\r\n\r\n"
        slices = [stream] if cut is None else [stream[:cut], stream[cut:]]
        if ok:
            assert scan(slices) == (len(stream), True, 1)
        else:
            with pytest.raises(HttpFramingError, match=r"^chunk line too long$"):
                scan(slices)


def test_a_chunk_line_without_its_newline_is_refused_once_past_the_limit() -> None:
    scanner = ChunkedScanner()
    assert scanner.feed(b"1;x=" + b"a" * (LINE_LIMIT - 4)) == LINE_LIMIT
    with pytest.raises(HttpFramingError, match=r"^chunk line too long$"):
        scanner.feed(b"a")


def test_trailers_are_part_of_the_body_up_to_their_limit() -> None:
    body = b"2\r\nhi\r\n0\r\nX-Sum: 1\r\nX-More: a:b\r\n\r\n"
    for slices in splits(body + b"GET"):
        assert scan(slices) == (len(body), True, 2)
    # 16 KiB of trailer lines in all: exactly the limit passes, a byte more does not
    line = b"T: " + b"v" * 3995 + b"\r\n"  # 4000 bytes each, under the line limit
    last = b"U: " + b"v" * 379 + b"\r\n"  # 384: 16384 in all
    at_limit = b"0\r\n" + line * 4 + last + b"\r\n"
    assert scan([at_limit]) == (len(at_limit), True, 0)
    over = b"0\r\n" + line * 4 + b"U: " + b"v" * 380 + b"\r\n\r\n"
    with pytest.raises(HttpFramingError, match=r"^trailers too large$"):
        scan([over])


@pytest.mark.parametrize("trailer", [b"bad trailer\r\n", b" folded\r\n", b"X: \x01\r\n"])
def test_malformed_trailer_lines_are_refused(trailer: bytes) -> None:
    for slices in splits(b"0\r\n" + trailer + b"\r\n"):
        with pytest.raises(HttpFramingError, match=r"^bad trailer line "):
            scan(slices)


@pytest.mark.parametrize("after", [b"xx", b"\rx", b"\n\r", b"\n"])
def test_chunk_data_must_end_in_crlf(after: bytes) -> None:
    for slices in splits(b"3\r\nabc" + after + b"0\r\n\r\n"):
        with pytest.raises(HttpFramingError, match=r"^chunk data not followed by CRLF$"):
            scan(slices)


@pytest.mark.parametrize(
    "size", [b"0x5", b"+5", b"-5", b"5_0", b" 5", b"g", b"", b"00000000000000005" + b"0"]
)
def test_chunk_sizes_are_hex_digits_only(size: bytes) -> None:
    stream = size + b"\r\n" + b"a" * 5 + b"\r\n0\r\n\r\n"
    for slices in splits(stream):
        with pytest.raises(HttpFramingError, match=r"^bad chunk size line "):
            scan(slices)


@pytest.mark.parametrize(
    ("size", "length"), [(b"A", 10), (b"f", 15), (b"0010", 16), (b"1" + b"0" * 15, None)]
)
def test_chunk_sizes_in_hex(size: bytes, length: int | None) -> None:
    if length is None:  # 16 hex digits are allowed; the body just never arrives here
        scanner = ChunkedScanner()
        assert scanner.feed(size + b"\r\nab") == len(size) + 4
        assert scanner.size == 16**15 and not scanner.done
        return
    stream = size + b"\r\n" + b"a" * length + b"\r\n0\r\n\r\n"
    for slices in splits(stream + b"tail"):
        assert scan(slices) == (len(stream), True, length)


def test_one_whole_chunk_per_slice_is_taken_whole() -> None:
    scanner = ChunkedScanner()
    chunk = b"c\r\n" + b"x" * 12 + b"\r\n"
    assert scanner.feed(chunk) == len(chunk) and not scanner.done
    assert scanner.feed(b"1\r\ny\r\n") == 6
    assert scanner.feed(b"0\r\n\r\nGET / HTTP/1.1\r\n") == 5 and scanner.done
    assert scanner.size == 13


def test_a_slice_with_a_chunk_and_more_is_not_taken_whole() -> None:
    # right size line, but the slice holds the next chunk line too
    scanner = ChunkedScanner()
    assert scanner.feed(b"2\r\nab\r\n0\r\n\r\nnext") == 12 and scanner.done
    # a chunk cut short of its CRLF is followed across slices
    scanner = ChunkedScanner()
    assert scanner.feed(b"2\r\nab\r") == 6
    with pytest.raises(HttpFramingError, match=r"^chunk data not followed by CRLF$"):
        scanner.feed(b"x")


def test_a_zero_size_chunk_ends_the_data_even_through_the_fast_path() -> None:
    scanner = ChunkedScanner()
    assert scanner.feed(b"0\r\n\r\n") == 5 and scanner.done and scanner.size == 0
    scanner = ChunkedScanner()
    assert scanner.feed(b"00\r\n\r\n") == 6 and scanner.done


def test_fast_path_does_not_take_a_slice_ending_in_something_else_than_crlf() -> None:
    # the right length for one chunk, but its data is followed by "xy", not CRLF
    with pytest.raises(HttpFramingError, match=r"^chunk data not followed by CRLF$"):
        ChunkedScanner().feed(b"3\r\nabcxy")


def test_fast_path_rejects_size_lines_int_would_forgive() -> None:
    for size in (b"0x3", b"0X3"):
        with pytest.raises(HttpFramingError, match=r"^bad chunk size line "):
            ChunkedScanner().feed(size + b"\r\nabc\r\n")


def test_the_scanner_starts_not_done() -> None:
    scanner = ChunkedScanner()
    assert scanner.done is False and scanner.size == 0


def test_chunk_data_that_looks_like_a_chunk_is_data() -> None:
    """Mid-chunk, a slice shaped like a whole chunk is data, not a new chunk."""
    scanner = ChunkedScanner()
    assert scanner.feed(b"a\r\n12") == 5 and scanner.size == 10
    assert scanner.feed(b"1\r\nx\r\n") == 6 and scanner.size == 10
    assert scanner.feed(b"yz\r\n0\r\n\r\n") == 9 and scanner.done


def test_a_slice_that_continues_a_size_line_is_not_a_whole_chunk() -> None:
    scanner = ChunkedScanner()
    assert scanner.feed(b"1") == 1
    assert scanner.feed(b"0\r\n" + b"a" * 16 + b"\r\n") == 21 and scanner.size == 16
    assert scanner.feed(b"0\r\n\r\n") == 5 and scanner.done


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (b"5\r\nhello\r\n", 5),
        (b"A\r\n" + b"a" * 10 + b"\r\n", 10),
        (b"ff\r\n" + b"b" * 255 + b"\r\n", 255),
        (b"0000000000000010\r\n" + b"c" * 16 + b"\r\n", 16),  # 16 digits: the most
        (b"5\r\nhello\r\nX", 0),  # more than one chunk
        (b"5\r\nhell\r\n", 0),  # less
        (b"5\r\nhelloxy", 0),  # no CRLF after the data
        (b"0x5\r\nhello\r\n", 0),
        (b"0X5\r\nhello\r\n", 0),
        (b"+5\r\nhello\r\n", 0),
        (b"5;a\r\nhello\r\n", 0),  # extensions go the long way
        (b"\r\nhello\r\n", 0),
        (b"0\r\n\r\n", 0),  # the last chunk goes the long way
        (b"g\r\nhello\r\n", 0),
        (b"5\nhello\r\n", 0),
    ],
)
def test_whole_chunk_recognises_exactly_one_whole_chunk(data: bytes, size: int) -> None:
    """The fast path: the common slice is taken in one step, anything else is left alone."""
    assert whole_chunk(data) == size


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"5;" + b"x" * 60 + b" \r\n", "bad chunk size line " + repr(b"5;" + b"x" * 38)),
        (b"0\r\n" + b"bad" * 20 + b"\r\n", "bad trailer line " + repr(b"bad" * 13 + b"b")),
    ],
)
def test_refusals_quote_the_first_40_bytes_of_the_line(stream: bytes, message: str) -> None:
    with pytest.raises(HttpFramingError) as raised:
        scan([stream])
    assert str(raised.value) == message
