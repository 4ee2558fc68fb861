"""Which `Host` a gate answers: its own address, loopback, or a configured name.

Ollama refuses a foreign Host on loopback so that a web page cannot reach it through DNS
rebinding (a name the attacker controls, re-pointed at 127.0.0.1 after the page loaded).
The gate rewrites Host for its upstream, so it must make that check itself, or the upstream's
protection is lost (issue 12). Only the host part is compared: rebinding changes the name a
browser uses, never the port, and a client may or may not write the default port.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

OK, BAD, FOREIGN = 0, 400, 403  # what `check()` returns: relay, 400, 403

# RFC 9110 section 7.2: Host = uri-host [ ":" port ]; uri-host is an IP literal in
# brackets, an IPv4 address or a reg-name (unreserved, pct-encoded, sub-delims)
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_WILDCARD_LISTEN = ("0.0.0.0", "::", "")
_CACHE_LIMIT = 256  # distinct Host values remembered; a flood of new ones just re-parses


def host_part(value: bytes) -> str | None:
    """The normalised host of a Host value (lowercase, IP literals canonical), or None."""
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    host = match[1].decode("ascii").lower()
    if host.startswith("["):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.removesuffix(".")  # "localhost." is the same name as "localhost"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Checks each request's Host for one gate; answers are cached per distinct value."""

    def __init__(self, listen_host: str, allowed: Iterable[str] = ()) -> None:
        names = {n.strip().lower() for n in allowed}
        self.any = "*" in names  # the protection is off: every Host is relayed
        self.wildcard = listen_host in _WILDCARD_LISTEN
        # An IPv6 listen address comes without brackets; a Host value carries them.
        literal = f"[{listen_host}]" if ":" in listen_host else listen_host
        own = host_part(literal.encode()) if not self.wildcard else None
        self._names = {host_part(n.encode()) or n for n in names} | ({own} if own else set())
        self._cache: dict[bytes, int] = {}

    def check(self, value: bytes) -> int:
        """OK, BAD (not a Host value) or FOREIGN (then see `arrived_on`)."""
        verdict = self._cache.get(value)
        if verdict is None:
            verdict = self._judge(value)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[value] = verdict
        return verdict

    def arrived_on(self, value: bytes, local_ip: str | None) -> bool:
        """A gate listening on every address does not know its own names, but it does know
        the address a connection arrived on: a Host naming that literal IP is its own."""
        return self.wildcard and local_ip is not None and host_part(value) == local_ip

    def _judge(self, value: bytes) -> int:
        host = host_part(value)
        if host is None:
            return BAD
        if self.any or _is_loopback(host) or host in self._names:
            return OK
        return FOREIGN


def local_address(sockname: object) -> str | None:
    """The IP a connection arrived on, as `host_part` writes it (IPv4-mapped unwrapped)."""
    if not isinstance(sockname, tuple) or not sockname or not isinstance(sockname[0], str):
        return None
    try:
        address = ipaddress.ip_address(sockname[0].partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
