"""The gate: a reverse proxy in front of one local service (SPEC section 8).

It must be invisible: bytes are relayed as they arrive (NDJSON and SSE streams chunk by
chunk, websockets after an upgrade), with `Host` rewritten for the upstream (Ollama answers
403 to a non-local Host) and hop-by-hop headers dropped. Only inference requests meet the
`GateControl`; management requests go straight through in every state.

Why protocols and a small HTTP/1.1 framer instead of aiohttp, or asyncio streams: the gate
sits on every request a team makes. aiohttp's request/response objects cost about 0.15 ms
of CPU per proxied request on a small box, more than the whole budget, and a coroutine per
connection reading through `StreamReader`s still cost about 0.17 ms, much of it waking tasks
and resolving futures; this costs about 0.12 ms on asyncio's loop and 0.105 ms on uvloop
(scripts/bench-gate; README, "The gate's figures"). Here both sides
are `asyncio.Protocol`s: a request head is parsed from the bytes `data_received` got, the
request goes out in one upstream write, and the answer is written to the client from the
upstream's own `data_received`, with the transports' write-buffer marks for flow control
(a slow client pauses the upstream's reading; a full upstream pauses the client's). Tasks
appear only where something must wait: an inference request meeting the control (it may be
held), and opening a new upstream connection. The body is never decoded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Generator, Iterable
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from broker.clock import Clock
from broker.services.classify import ServiceKind, is_inference
from broker.services.control import GateControl, ReclaimCallback, Refusal
from broker.services.hostcheck import FOREIGN, HostPolicy, local_address
from broker.services.httpwire import (
    ChunkedScanner,
    HttpFramingError,
    RequestHead,
    build_head,
    parse_request_head,
    parse_response_head,
)
from broker.services.replies import error_response
from broker.services.upstream import HIGH_WATER, UpstreamAddress, UpstreamConnection, UpstreamPool
from broker.units import parse_hostport

if TYPE_CHECKING:
    from broker.config import ServiceSection

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_HEAD_TIMEOUT_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 75.0
DEFAULT_BODY_TIMEOUT_S = 60.0
_OVER_CAP_LINGER_S = 1.0  # an over-cap connection gets this long to read its 503
_OVER_CAP_LOG_EVERY_S = 60.0  # one log line per this, however many were refused
_PREREAD_BYTES = 1024 * 1024  # bodies up to this are read whole (one upstream write, retryable)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Where a client connection stands. Anything but IDLE and CLOSED is a request in progress,
# which a client that leaves abandons (its held slot, its upstream connection).
_IDLE = 0  # waiting for (the rest of) a request head
_BODY = 1  # waiting for the rest of a body that is read whole
_ADMIT = 2  # an inference request meets the control (a task; it may be held)
_CONNECT = 3  # opening an upstream connection (a task)
_SEND_BODY = 4  # streaming a large or chunked request body upstream
_WAIT_HEAD = 5  # the request is out; waiting for the answer's head
_RELAY = 6  # copying the answer's body to the client
_TUNNEL = 7  # after 101 Switching Protocols: bytes both ways until either side closes
_CLOSED = 8
# The timeouts (head, idle keep-alive, body) apply only to _IDLE, _BODY and a _SEND_BODY
# still reading: waiting for the upstream, relaying a stream, a tunnel are never cut.

# How the answer's body ends.
_BY_LENGTH = 0
_CHUNKED = 1
_AT_CLOSE = 2

# Why the client's reading is paused (one bit each; reading resumes when none is left).
_PAUSE_UPSTREAM_FULL = 1  # the upstream's send buffer is full (a request body, a tunnel)
_PAUSE_BACKLOG = 2  # pipelined bytes pile up while a request is served


class _Resumed(Generic[T]):
    """Awaiting this finishes, inside a task, a coroutine whose first step ran elsewhere.

    The first `send(None)` ran in a protocol callback and the coroutine yielded what it
    waits for (a future, or None for a bare yield). The task awaiting this object is handed
    that same future, then sends into and throws into the coroutine exactly as `await`
    would have (cancellation included), so the coroutine cannot tell the difference, except
    that its first step saw no current task.
    """

    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting_on: Any) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, None, T]:
        coro, waiting_on = self._coro, self._waiting_on
        while True:
            try:
                yield waiting_on
            except BaseException as exc:  # the task was cancelled, or the future failed
                try:
                    waiting_on = coro.throw(exc)
                except StopIteration as done:
                    return cast(T, done.value)
            else:
                try:
                    waiting_on = coro.send(None)
                except StopIteration as done:
                    return cast(T, done.value)


class _Client(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive), relayed in callbacks."""

    transport: asyncio.Transport

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.state = _IDLE
        self.buf = b""  # received, not yet consumed: a request head, pipelined requests
        self.sink: Callable[[bytes], None] | None = None  # where client bytes go when streamed
        self.task: asyncio.Task[None] | None = None
        self.paused = 0  # _PAUSE_* bits
        self.write_paused = False  # the client's send buffer is above its high mark
        self.pump_on_resume = False
        self.pumping = False
        # the request in progress
        self.head: RequestHead | None = None
        self.body: bytes | None = None  # read whole; None: streamed after the head
        self.pieces: list[bytes] = []  # a body arriving in several reads
        self.have = 0
        self.counted = False  # request_started() was called
        # an inference request's arrival (the control's clock) and time held (< 0: none),
        # for its demand record when it ends
        self.arrival: datetime | None = None
        self.arrived: float | None = None
        self.held_s = -1.0
        self.up: UpstreamConnection | None = None
        self.up_head = b""
        self.retried = False
        self.answered = False  # the upstream sent something for this request
        self.body_left = 0
        self.body_scanner: ChunkedScanner | None = None
        # the answer in progress
        self.resp_buf = b""
        self.framing = _BY_LENGTH
        self.remaining = 0
        self.scanner: ChunkedScanner | None = None
        self.client_keep = False
        self.upstream_keep = False
        # the timeouts: when the current wait (for a head, the next request, more body)
        # began or last made progress, on the gate's coarse clock (see Gate._sweep)
        self.since = 0.0
        self.kept = False  # served a request and kept the connection: now it is idle
        self.local_ip: str | bool | None = False  # where it arrived (False: not looked up)

    # ---- asyncio callbacks: the client side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)
        gate = self.gate
        if len(gate._clients) >= gate.max_connections:
            self.state = _CLOSED
            gate._over_cap(self.transport)
            return
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        gate._clients.add(self)
        self.since = gate._watch()

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink(data)
            return
        state = self.state
        if state == _BODY:
            self.since = self.gate.now
            self.pieces.append(data)
            self.have += len(data)
            head = self.head
            assert head is not None and head.content_length is not None
            if self.have >= head.content_length:
                self._body_complete(head.content_length)
            return
        if state == _CLOSED:
            return
        if self.buf:
            self.buf += data
        else:
            self.since = self.gate.now  # the first bytes of a head: its timeout starts
            self.buf = data
        if state == _IDLE and not self.write_paused:
            self._pump()
        else:
            if state == _IDLE:
                self.pump_on_resume = True  # once the client has read the last answer
            if len(self.buf) > self.gate._backlog_limit:
                self._pause(_PAUSE_BACKLOG)

    def eof_received(self) -> bool:
        # A client that closes its side mid-request gives it up, as one that hangs up: a
        # held slot or an upstream stream must not wait for a write to notice.
        if self.state == _CLOSED:
            return False  # (an over-cap connection that read its 503): close it now
        if self.state != _IDLE:
            self._abandon()
        else:
            self._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != _IDLE and self.state != _CLOSED:
            self._abandon()
        self.state = _CLOSED
        self.gate._clients.discard(self)
        self.gate._lingering.discard(self.transport)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.up is not None:
            self.up.pause()  # a slow client: stop reading its answer from the upstream

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.up is not None:
            self.up.resume()
        if self.pump_on_resume:
            self.pump_on_resume = False
            self._pump()

    # ---- reading requests
    def _pump(self) -> None:
        """Start the requests waiting in the buffer, as long as each finishes at once."""
        if self.pumping:
            return  # an outer _pump goes on once this request is done
        self.pumping = True
        try:
            while self.state == _IDLE and self.buf and self._start():
                pass
        finally:
            self.pumping = False

    def _start(self) -> bool:
        """Begin the request at the head of the buffer; false while its head is incomplete."""
        gate = self.gate
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        limit = gate.max_header_bytes
        if end < 0:
            if len(buf) - 3 > limit:
                self._refuse("/", 431, "request head too large")
            return False
        if end > limit:
            self._refuse("/", 431, "request head too large")
            return False
        try:
            head = parse_request_head(buf[: end + 4])
            if not head.target.startswith(b"/"):
                raise HttpFramingError("only origin-form request targets are served")
        except HttpFramingError as err:
            self._refuse("/", err.status, f"bad request: {err}")
            return False
        host = head.host
        if (host is not None and (verdict := gate._hosts.check(host))
                and (verdict != FOREIGN or not gate._hosts.arrived_on(host, self._local_ip()))):
            self._refuse_host(head, verdict)
            return False
        rest = buf[end + 4 :]
        self.head = head
        length = head.content_length
        if length is not None and length > gate.max_body_bytes:
            self._refuse(head.path, 413, f"request body over {gate.max_body_bytes} bytes")
            return False
        if head.expect_continue:  # never for HTTP/1.0 (the parser drops it there)
            self.transport.write(_CONTINUE)
        if length is not None and length <= _PREREAD_BYTES:
            if len(rest) < length:
                self.buf = b""
                self.pieces = [rest]
                self.have = len(rest)
                self.state = _BODY
                self.since = gate.now  # the body's timeout starts now
                return True
            self.body = rest[:length]
            self.buf = rest[length:]
        else:
            self.body = b"" if length is None and not head.chunked else None
            self.buf = rest
        self._admit(head)
        return True

    def _local_ip(self) -> str | None:
        if self.local_ip is False:
            self.local_ip = local_address(self.transport.get_extra_info("sockname"))
        return self.local_ip if isinstance(self.local_ip, str) else None

    def _refuse_host(self, head: RequestHead, verdict: int) -> None:
        shown = head.host.decode("latin-1") if head.host is not None else ""
        if verdict == FOREIGN:
            # DNS rebinding: a page from that name reaching a local service (issue 12)
            message = (f"gpu-broker gate: Host {shown!r} is not this gate's address, "
                       f"loopback or one of services.allowed_hosts of {self.gate.name!r}")
        else:
            message = f"bad request: Host {shown[:80]!r} is not a host[:port]"
        self._refuse(head.path, verdict, message)

    def _body_complete(self, length: int) -> None:
        data = b"".join(self.pieces)
        self.pieces = []
        self.body = data[:length]
        self.buf = data[length:]
        assert self.head is not None
        self._admit(self.head)
        self._pump()

    def _admit(self, head: RequestHead) -> None:
        gate = self.gate
        if not is_inference(gate.kind, head.method, head.path):
            self._forward(head)
            return
        # admit() of an open gate returns without waiting, and that is nearly every request:
        # run its first step here rather than in a task of its own (a task per request is a
        # quarter of the gate's CPU). When it does wait (a hold), a task takes over.
        control = gate.control
        admission = control.admit()
        try:
            waiting_on = admission.send(None)
        except StopIteration as done:
            self.arrival = control.last_request_at
            self.arrived = control.last_request_monotonic
            self.held_s = -1.0
            self._admitted(head, done.value)
            return
        self.arrival = control.last_request_at
        self.arrived = control.last_request_monotonic
        self.state = _ADMIT
        self.task = asyncio.get_running_loop().create_task(
            self._held(head, _Resumed(admission, waiting_on))
        )

    async def _held(self, head: RequestHead, admission: _Resumed[Refusal | None]) -> None:
        refusal = await admission
        self.task = None
        if refusal is None and self.arrived is not None:
            self.held_s = self.gate.control.held_since(self.arrived)
        self._admitted(head, refusal)
        self._pump()

    def _admitted(self, head: RequestHead, refusal: Refusal | None) -> None:
        if refusal is not None:
            keep_alive = head.keep_alive and self.body is not None
            self._reply(head.path, 503, refusal.message, keep_alive=keep_alive,
                        retry_after_s=refusal.retry_after_s)  # fmt: skip
            self._done(keep_alive)
            return
        self.gate.control.request_started()
        self.counted = True
        self._forward(head)

    # ---- sending the request upstream
    def _forward(self, head: RequestHead) -> None:
        gate = self.gate
        self.up_head = gate._upstream_head(head)
        up = gate._pool.take()
        if up is None:
            self.state = _CONNECT
            self.task = asyncio.get_running_loop().create_task(self._connect())
        else:
            self._send(up)

    async def _connect(self) -> None:
        try:
            up = await self.gate._pool.connect()
        except (OSError, TimeoutError) as err:
            self.task = None
            self._upstream_failed(str(err) or type(err).__name__)
            self._pump()
            return
        self.task = None
        self._send(up)

    def _send(self, up: UpstreamConnection) -> None:
        self.up = up
        up.owner = self
        self.answered = False
        body = self.body
        if body is not None:
            up.transport.write(self.up_head + body if body else self.up_head)
            self.state = _WAIT_HEAD
            return
        # a large or chunked body: relay it as it comes, then wait for the answer
        up.transport.write(self.up_head)
        self.state = _SEND_BODY
        head = self.head
        assert head is not None
        if head.content_length is not None:
            self.body_left = head.content_length
            self.sink = self._body_by_length
        else:
            self.body_scanner = ChunkedScanner()
            self.sink = self._body_chunked
        self._resume(_PAUSE_BACKLOG)
        self.since = self.gate.now  # the body's timeout starts now
        pending, self.buf = self.buf, b""
        if pending:
            self.sink(pending)

    def _body_by_length(self, data: bytes) -> None:
        up = self.up
        assert up is not None
        self.since = self.gate.now
        left = self.body_left
        if len(data) < left:
            up.transport.write(data)
            self.body_left = left - len(data)
            return
        up.transport.write(data[:left] if len(data) > left else data)
        self.body_left = 0
        self.buf = data[left:]  # a pipelined next request stays put
        self._body_sent()

    def _body_chunked(self, data: bytes) -> None:
        up, scanner, head = self.up, self.body_scanner, self.head
        assert up is not None and scanner is not None and head is not None
        self.since = self.gate.now
        try:
            used = scanner.feed(data)
        except HttpFramingError as err:
            # nothing of an answer has reached the client yet: tell it why, then close
            self._drop_upstream()
            self._refuse(head.path, 400, f"bad request: {err}")
            return
        if scanner.size > self.gate.max_body_bytes:
            self._drop_upstream()
            self._reply(head.path, 413, f"request body over {self.gate.max_body_bytes} bytes",
                        keep_alive=False)  # fmt: skip
            self._done(False)
            return
        up.transport.write(data[:used] if used < len(data) else data)
        if scanner.done:
            self.buf = data[used:]  # read exactly to the end: a pipelined request stays put
            self._body_sent()

    def _body_sent(self) -> None:
        self.sink = None
        self.body_scanner = None
        self._resume(_PAUSE_UPSTREAM_FULL)
        self.state = _WAIT_HEAD
        early, self.resp_buf = self.resp_buf, b""
        if early:
            self._response_head(early)

    # ---- the upstream side (UpstreamOwner)
    def upstream_data(self, data: bytes) -> None:
        state = self.state
        if state == _RELAY:
            self._relay(data)
        elif state == _WAIT_HEAD:
            self.answered = True
            self._response_head(data)
        elif state == _TUNNEL:
            self.transport.write(data)
        elif state == _SEND_BODY:
            # an answer before the whole body went out: read it once the body is sent
            self.answered = True
            self.resp_buf += data
            if len(self.resp_buf) > self.gate._backlog_limit and self.up is not None:
                self.up.pause()

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if conn is not self.up:
            return
        state = self.state
        if state == _RELAY:
            if self.framing == _AT_CLOSE and exc is None:
                self._response_done()  # this body ends when the upstream closes
            else:
                self._broke("the upstream closed mid-answer" if exc is None else exc)
        elif state in (_WAIT_HEAD, _SEND_BODY):
            if (exc is None and not self.answered and conn.reused and self.body is not None
                    and not self.retried):  # fmt: skip
                # the upstream had just closed this idle connection: retry once, on a new one
                self.retried = True
                self._drop_upstream()
                self.state = _CONNECT
                self.task = asyncio.get_running_loop().create_task(self._connect())
                return
            reason = "connection closed before an answer" if exc is None else str(exc)
            self._upstream_failed(reason or type(exc).__name__)
            self._pump()
        elif state == _TUNNEL:
            self._abandon()

    def upstream_full(self, full: bool) -> None:
        if full:
            self._pause(_PAUSE_UPSTREAM_FULL)
        else:
            self._resume(_PAUSE_UPSTREAM_FULL)

    # ---- relaying the answer
    def _response_head(self, data: bytes) -> None:
        buf = self.resp_buf + data if self.resp_buf else data
        limit = self.gate.max_header_bytes
        head = self.head
        assert head is not None
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0 or end > limit:
                if end > limit or len(buf) - 3 > limit:
                    self._upstream_failed("answer head too large")
                    self._pump()
                else:
                    self.resp_buf = buf
                return
            raw = buf[: end + 4]
            try:
                response = parse_response_head(raw, request_method=head.method)
            except HttpFramingError as err:
                self._upstream_failed(str(err))
                self._pump()
                return
            buf = buf[end + 4 :]
            if response.status == 101 or response.status >= 200:
                break
            # interim answers (103 Early Hints) are not forwarded: the gate already answered
            # any Expect itself, and clients do not need them
        self.resp_buf = b""
        if response.status == 101:
            self._tunnel(raw, buf)
            return
        framed = response.chunked or response.content_length is not None
        self.client_keep = client_keep = head.keep_alive and framed and not head.http10
        self.upstream_keep = response.keep_alive and framed and not head.http10
        out = build_head(response.status_line, response.headers,
                         b"" if client_keep else b"Connection: close\r\n")  # fmt: skip
        self.state = _RELAY
        length = response.content_length
        if length is not None:
            self.framing = _BY_LENGTH
            if len(buf) >= length:
                # a small answer arrives with its head: send both in one write
                if len(buf) > length:
                    buf = buf[:length]
                    self.upstream_keep = False  # bytes after the end: do not trust this socket
                self.transport.write(out + buf)
                self._response_done()
                return
            self.remaining = length - len(buf)
            self.transport.write(out + buf if buf else out)
        elif response.chunked:
            self.framing = _CHUNKED
            scanner = self.scanner = ChunkedScanner()
            if not buf:
                self.transport.write(out)
                return
            # a stream's first chunk often comes with the head: send both in one write
            try:
                used = scanner.feed(buf)
            except HttpFramingError as err:
                self.transport.write(out)
                self._broke(err)
                return
            if used < len(buf):
                buf = buf[:used]
                self.upstream_keep = False
            self.transport.write(out + buf)
            if scanner.done:
                self._response_done()
        else:
            self.framing = _AT_CLOSE
            self.transport.write(out + buf if buf else out)

    def _relay(self, data: bytes) -> None:
        framing = self.framing
        if framing == _BY_LENGTH:
            left = self.remaining - len(data)
            if left > 0:
                self.transport.write(data)
                self.remaining = left
                return
            if left < 0:
                data = data[: self.remaining]
                self.upstream_keep = False
            self.transport.write(data)
            self._response_done()
        elif framing == _CHUNKED:
            scanner = self.scanner
            assert scanner is not None
            try:
                used = scanner.feed(data)
            except HttpFramingError as err:
                self._broke(err)
                return
            if used < len(data):
                data = data[:used]
                self.upstream_keep = False
            self.transport.write(data)
            if scanner.done:
                self._response_done()
        else:
            self.transport.write(data)

    def _response_done(self) -> None:
        up = self.up
        self.up = None
        if up is not None:
            if self.upstream_keep:
                self.gate._pool.release(up)
            else:
                up.abort()
        self._done(self.client_keep)
        if self.state == _IDLE and self.buf:
            if self.write_paused:
                self.pump_on_resume = True  # the next request once the client has read this
            else:
                self._pump()

    def _tunnel(self, raw: bytes, rest: bytes) -> None:
        """After a 101 answer: copy both ways until either side closes."""
        up = self.up
        assert up is not None
        self.state = _TUNNEL
        self.transport.write(raw + rest if rest else raw)
        self.sink = up.transport.write
        self._resume(_PAUSE_BACKLOG)
        pending, self.buf = self.buf, b""
        if pending:
            up.transport.write(pending)

    # ---- endings
    def _timed_out(self) -> None:
        """A wait that has a timeout ran out (see Gate._sweep for which waits do)."""
        head = self.head
        if self.state == _IDLE:
            if self.buf:  # part of a head came, the rest did not (slowloris)
                self._refuse("/", 408, "request head not received in time")
            else:  # an idle keep-alive connection, or one that never sent anything
                self._close()
        elif head is not None:  # a body stalled: nothing of an answer was relayed yet
            self._drop_upstream()
            self._refuse(head.path, 408, "request body not received in time")

    def _reply(
        self,
        path: str,
        status: int,
        message: str,
        *,
        keep_alive: bool,
        retry_after_s: int | None = None,
    ) -> None:
        self.transport.write(error_response(self.gate.kind, path, status, message,
                                            keep_alive=keep_alive,
                                            retry_after_s=retry_after_s))  # fmt: skip

    def _refuse(self, path: str, status: int, message: str) -> None:
        """Answer a request the gate will not relay, and close the connection."""
        self._reply(path, status, message, keep_alive=False)
        self._done(False)

    def _upstream_failed(self, reason: str) -> None:
        """The upstream broke before the client was sent anything: answer 502."""
        gate = self.gate
        log.warning("gate %s: upstream %s failed: %s", gate.name, gate._upstream_url, reason)
        self._drop_upstream()
        head = self.head
        assert head is not None
        message = (f"gpu-broker gate: the {gate.kind} service at {gate._upstream_url} "
                   f"is not answering ({reason})")  # fmt: skip
        keep_alive = head.keep_alive and self.body is not None
        self._reply(head.path, 502, message, keep_alive=keep_alive)
        self._done(keep_alive)

    def _broke(self, err: object) -> None:
        # The head is already out: all the client can be told is a cut connection.
        log.warning("gate %s: upstream broke mid-response: %s", self.gate.name, err)
        self._drop_upstream()
        self._end_request()
        self.state = _CLOSED
        self.transport.abort()

    def _abandon(self) -> None:
        """The client left mid-request: free its held slot, its upstream connection."""
        task = self.task
        if task is not None:
            self.task = None
            task.cancel()
        self._drop_upstream()
        self._end_request()
        self._close()

    def _drop_upstream(self) -> None:
        up = self.up
        if up is not None:
            self.up = None
            up.abort()

    def _end_request(self) -> None:
        if self.counted:
            self.counted = False
            self.gate.control.request_finished(self.arrival, self.arrived, self.held_s)
        self.sink = None
        self.head = None
        self.body = None
        self.body_scanner = None
        self.scanner = None
        self.resp_buf = b""
        self.retried = False
        if self.paused:
            self._resume(_PAUSE_UPSTREAM_FULL)

    def _done(self, keep_alive: bool) -> None:
        """The request is over; the connection carries the next one or closes."""
        self._end_request()
        if keep_alive and self.state != _CLOSED:
            self.state = _IDLE
            self.kept = True
            self.since = self.gate.now
            if self.paused:
                self._resume(_PAUSE_BACKLOG)
        else:
            self._close()

    def _close(self) -> None:
        if self.state != _CLOSED:
            self.state = _CLOSED
            self.sink = None
            self.buf = b""
            self.transport.close()  # after what is queued has been sent

    def _pause(self, reason: int) -> None:
        if not self.paused and self.state != _CLOSED:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.state != _CLOSED:
                self.since = self.gate.now  # time paused by the gate is not the client's
                self.transport.resume_reading()


class Gate:
    """A reverse proxy for one service; `control` is what the scheduler drives."""

    def __init__(
        self,
        *,
        name: str,
        kind: ServiceKind,
        upstream: str,
        listen: str | tuple[str, int],
        control: GateControl,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        allowed_hosts: Iterable[str] = (),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.name = name
        self.kind: ServiceKind = kind
        self.control = control
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.head_timeout_s = head_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.body_timeout_s = body_timeout_s
        # a (host, 0) tuple lets tests and the bench take any free port
        self._listen = parse_hostport(listen) if isinstance(listen, str) else listen
        self._hosts = HostPolicy(self._listen[0], allowed_hosts)
        # The timeouts run on a coarse clock: one timer per gate, ticking only while it has
        # connections, checks each connection's `since` (an attribute store per request:
        # no timer armed or cancelled per request, nothing that shows on scripts/bench-gate).
        # A wait runs out between its timeout and that plus two ticks.
        self._tick = max(0.05, min(1.0, head_timeout_s / 4, idle_timeout_s / 4,
                                   body_timeout_s / 4))  # fmt: skip
        self.now = 0.0  # loop time of the last tick
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lingering: set[asyncio.Transport] = set()  # over the cap, reading their 503
        self._over_cap_count = 0
        self._over_cap_logged_at = -_OVER_CAP_LOG_EVERY_S
        self._over_cap_answer = error_response(
            kind, "/", 503,
            f"gpu-broker gate: {name} has {max_connections} open connections "
            "(services.max_connections); retry shortly",
            keep_alive=False, retry_after_s=1,
        )  # fmt: skip
        self._upstream = UpstreamAddress.parse(upstream)
        self._upstream_url = upstream
        self._pool = UpstreamPool(self._upstream)
        self._server: asyncio.Server | None = None
        self._clients: set[_Client] = set()
        self._host_line = b"Host: " + self._upstream.host_header + b"\r\n"
        self._backlog_limit = 2 * max_header_bytes  # pipelined bytes kept before pausing

    @classmethod
    def from_section(
        cls,
        section: ServiceSection,
        clock: Clock,
        *,
        on_reclaim: ReclaimCallback | None = None,
        display_tz: tzinfo | None = None,
    ) -> Gate:
        if section.gate_listen is None:
            raise ValueError(f"service {section.name} has no gate_listen")
        control = GateControl(
            clock,
            name=section.name,
            max_hold=section.max_hold,
            on_reclaim=on_reclaim,
            display_tz=display_tz,
        )
        return cls(
            name=section.name,
            kind=section.kind,
            upstream=section.upstream,
            listen=section.gate_listen,
            control=control,
            max_header_bytes=section.max_header_bytes,
            max_body_bytes=section.max_body_bytes,
            allowed_hosts=section.allowed_hosts,
            max_connections=section.max_connections,
            head_timeout_s=section.head_timeout.total_seconds(),
            idle_timeout_s=section.idle_timeout.total_seconds(),
            body_timeout_s=section.body_timeout.total_seconds(),
        )

    # ---- lifecycle
    async def start(self) -> None:
        host, port = self._listen
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self), host, port, backlog=1024, reuse_address=True
        )
        log.info("gate %s: listening on %s, forwarding to %s", self.name, self.url,
                 self._upstream_url)  # fmt: skip

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("gate not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        host = self._listen[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for transport in list(self._lingering):
            transport.abort()
        clients = list(self._clients)
        tasks = [c.task for c in clients if c.task is not None]
        for client in clients:
            client._abandon()
            if client.transport.get_write_buffer_size():
                client.transport.abort()  # a client that does not read must not stall this
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._pool.close()
        await self.control.aclose()

    async def __aenter__(self) -> Gate:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- timeouts and the connection cap
    def _watch(self) -> float:
        """A connection opened: make sure the sweep runs; the loop's time now."""
        loop = self._loop
        if loop is None:  # a connection made by hand (a test), not by start()
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        if self._sweeper is None:
            self.now = now
            self._sweeper = loop.call_later(self._tick, self._sweep)
        return now

    def _sweep(self) -> None:
        """Close the connections whose head, idle or body wait ran out; tick again while any
        connection is open."""
        loop = self._loop
        assert loop is not None
        now = self.now = loop.time()
        if not self._clients:
            self._sweeper = None
            return
        slack = self._tick  # `since` is read from a clock up to one tick stale
        head_limit, idle_limit = self.head_timeout_s + slack, self.idle_timeout_s + slack
        body_limit = self.body_timeout_s + slack
        for client in tuple(self._clients):
            if client.paused or client.pump_on_resume:
                continue  # the gate stopped reading it, or it has an answer to read
            state = client.state
            if state == _IDLE:
                limit = head_limit if client.buf or not client.kept else idle_limit
            elif state == _BODY or (state == _SEND_BODY and client.sink is not None):
                limit = body_limit
            else:
                continue
            if now - client.since > limit:
                client._timed_out()
        self._sweeper = loop.call_later(self._tick, self._sweep)

    def _over_cap(self, transport: asyncio.Transport) -> None:
        """Answer a connection over `max_connections` with 503 and let it go; the ones
        already open are not touched. Logged once a minute, not once per connection."""
        loop = asyncio.get_running_loop()
        self._over_cap_count += 1
        now = loop.time()
        if now - self._over_cap_logged_at >= _OVER_CAP_LOG_EVERY_S:
            log.warning("gate %s: %d connection(s) refused with 503: %d open is the cap "
                        "(services.max_connections)", self.name, self._over_cap_count,
                        self.max_connections)  # fmt: skip
            self._over_cap_logged_at = now
            self._over_cap_count = 0
        # write, then half-close and read what the client sends until it closes: closing
        # with its request unread would reset the connection and lose the 503. In a flood
        # (as many lingering as the cap) they are closed at once: the descriptors matter more.
        transport.write(self._over_cap_answer)
        if len(self._lingering) >= self.max_connections or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._lingering.add(transport)
        loop.call_later(_OVER_CAP_LINGER_S, self._drop_lingering, transport)

    def _drop_lingering(self, transport: asyncio.Transport) -> None:
        if transport in self._lingering:
            self._lingering.discard(transport)
            transport.abort()

    # ---- the request line and headers the upstream gets
    def _upstream_head(self, head: RequestHead) -> bytes:
        if head.upgrade is not None:
            extra = b"Connection: Upgrade\r\nUpgrade: " + head.upgrade + b"\r\n"
        elif head.http10:
            extra = b"Connection: close\r\n"
        else:
            extra = b""
        return b"".join((
            head.method.encode("latin-1"), b" ", self._upstream.prefix, head.target,
            b" HTTP/1.0\r\n" if head.http10 else b" HTTP/1.1\r\n",
            self._host_line, head.headers, extra, b"\r\n",
        ))  # fmt: skip
