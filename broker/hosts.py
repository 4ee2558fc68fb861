"""Which `Host` a local listener answers to: the defence against DNS rebinding.

A web page on evil.example can point its own name at 127.0.0.1 and then talk to a loopback
service as "same origin"; the only trace is the `Host` header, which still says
evil.example. A listener that answers only to its listen address, loopback and the names
its owner configured is out of that page's reach.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


def host_name(header: str) -> str | None:
    """The host part of a `Host` header, lower case, without port or brackets; None when
    it is not a host (empty, or garbage)."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not _is_port(text[end + 1 :])):
            return None
        return text[1:end] or None
    name, sep, port = text.rpartition(":")
    if not sep:
        name = text
    elif ":" in name or not _is_port(sep + port):
        return None  # an IPv6 address without brackets, or a bad port
    name = name.rstrip(".")
    return name or None


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and len(text) <= 6


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostCheck:
    """Allowed: loopback (localhost, 127.0.0.0/8, ::1), the listen address unless it is a
    wildcard, and the configured names. A request without `Host` (HTTP/1.0) passes: no
    browser sends one."""

    def __init__(self, listen_host: str, allowed: Iterable[str] = ()) -> None:
        names = {n for n in (host_name(a) for a in allowed) if n is not None}
        listen = host_name(listen_host if ":" not in listen_host else f"[{listen_host}]")
        if listen is not None and listen not in ("0.0.0.0", "::"):
            names.add(listen)
        self._names = frozenset(names)

    def allows(self, header: str | None) -> bool:
        if header is None:
            return True
        name = host_name(header)
        if name is None:
            return False
        return name in self._names or _is_loopback(name)
