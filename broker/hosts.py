"""Which `Host` the API answers to: the defence against DNS rebinding.

A web page on evil.example can point its own name at 127.0.0.1 and then talk to a loopback
service as "same origin"; the only trace is the `Host` header, which still says
evil.example. The API shares the gates' rules (`broker.services.hostcheck`): its listen
address, loopback and the names its owner configured.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.services.hostcheck import OK, HostPolicy


class HostCheck:
    """The gates' `HostPolicy` for a `str` header. A request without `Host` (HTTP/1.0)
    passes: no browser sends one."""

    def __init__(self, listen_host: str, allowed: Iterable[str] = ()) -> None:
        # "*" switches a gate's check off; the API's check cannot be switched off.
        self._policy = HostPolicy(listen_host, [a for a in allowed if a.strip() != "*"])

    def allows(self, header: str | None) -> bool:
        if header is None:
            return True
        return self._policy.check(header.encode("utf-8", "replace")) == OK
