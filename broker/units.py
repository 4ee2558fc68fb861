"""Parsing and printing of the human units the config uses: durations and listen addresses."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(
    r"(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m(?!s))?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?"
)


def parse_duration(text: str) -> timedelta:
    """`"90s"`, `"15m"`, `"2h"`, `"1h30m"`, `"1d"`, `"250ms"` -> timedelta.

    Bare numbers are refused on purpose: `idle_window = 15` could mean seconds or minutes.
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match or not any(match.groupdict().values()):
        raise ValueError(f'expected a duration like "15m", got {text!r}'.replace("'", '"'))
    parts = {k: int(v) for k, v in match.groupdict().items() if v}
    return timedelta(
        days=parts.get("d", 0),
        hours=parts.get("h", 0),
        minutes=parts.get("m", 0),
        seconds=parts.get("s", 0),
        milliseconds=parts.get("ms", 0),
    )


def format_duration(value: timedelta) -> str:
    """The inverse of `parse_duration`, shortest form: `timedelta(minutes=90)` -> `"1h30m"`."""
    total_ms = round(value.total_seconds() * 1000)
    if total_ms == 0:
        return "0s"
    sign = "-" if total_ms < 0 else ""
    total_ms = abs(total_ms)
    seconds, ms = divmod(total_ms, 1000)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    out = "".join(
        f"{n}{unit}"
        for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s"), (ms, "ms"))
        if n
    )
    return sign + out


def parse_hostport(text: str) -> tuple[str, int]:
    """`"127.0.0.1:9477"`, `"[::1]:9477"`, `"localhost:80"` -> (host, port)."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f'expected "host:port" like "127.0.0.1:9477", got {text!r}')
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'an IPv6 address needs brackets, like "[::1]:9477", got {text!r}')
    if not host:
        raise ValueError(f'expected "host:port" with a host, got {text!r}')
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected a port between 1 and 65535, got {port_text!r}")
    return host, int(port_text)


def describe_duration(value: timedelta) -> str:
    """A duration as a person writes it, to the two largest units: "51s", "4m 10s",
    "1h 20m", "2d 3h". For messages; `format_duration` is the config's exact form."""
    total = round(value.total_seconds())
    if total <= 0:
        return "0s" if total == 0 else "-" + describe_duration(-value)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    while parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n}{unit}" for n, unit in parts[:2] if n)
