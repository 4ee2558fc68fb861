"""Claim every listening address before the broker touches anything.

The gates and the API start serving only after reconcile and a first step (so a gate opens
in the right mode), but a taken port must fail the start *before* reconcile withdraws an
offer or resumes a service. `reserve` binds a socket on each address (SO_REUSEADDR, not
listening): a port another process listens on fails here, naming its config key, and the
reservation is kept until the real server has bound the same address (Linux lets a second
SO_REUSEADDR socket bind and listen beside one that does not listen), then released.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable

from broker.errors import BrokerError
from broker.units import parse_hostport


class Reservation:
    def __init__(self) -> None:
        self._sockets: dict[str, list[socket.socket]] = {}

    def release(self, key: str | None = None) -> None:
        """Close the sockets held for `key` (all of them when None)."""
        keys = [key] if key is not None else list(self._sockets)
        for k in keys:
            for sock in self._sockets.pop(k, []):
                sock.close()


def reserve(addresses: Iterable[tuple[str, str, str]]) -> Reservation:
    """`addresses`: (config key, "host:port", hint). Raises `BrokerError` naming the key of
    the first address that cannot be bound; nothing stays bound then."""
    held = Reservation()
    try:
        for key, listen, hint in addresses:
            host, port = parse_hostport(listen)
            try:
                held._sockets[key] = _bind(host, port)
            except OSError as err:
                why = "the address is in use" if err.errno == errno.EADDRINUSE else err.strerror
                raise BrokerError(f"{key}: cannot listen on {listen}: {why}{hint}") from None
    except BaseException:
        held.release()
        raise
    return held


def _bind(host: str, port: int) -> list[socket.socket]:
    # The addresses asyncio's create_server would bind for the same host and port.
    infos = socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out
