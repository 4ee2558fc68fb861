"""The gate's issue-12 keys under [[services]]: defaults, parsing, and what reaches the gate."""

from __future__ import annotations

import tomllib
from datetime import timedelta

import pytest

from broker.clock import FakeClock
from broker.config import parse_config
from broker.errors import ConfigError
from broker.services.gate import Gate

SERVICE = '[[services]]\nname = "o"\nkind = "ollama"\nupstream = "http://127.0.0.1:11435"\n'


def test_defaults_and_values_reach_the_gate(clock: FakeClock) -> None:
    default = parse_config(tomllib.loads(SERVICE)).services[0]
    assert default.allowed_hosts == [] and default.max_connections == 1024
    assert (default.head_timeout, default.idle_timeout, default.body_timeout) == (
        timedelta(seconds=10), timedelta(seconds=75), timedelta(seconds=60))  # fmt: skip
    section = parse_config(tomllib.loads(
        SERVICE + 'gate_listen = "0.0.0.0:11434"\nallowed_hosts = ["GPU.lan", "[::1]", "*"]\n'
        'max_connections = 8\nhead_timeout = "250ms"\nidle_timeout = "2s"\n'
        'body_timeout = "1m"\n'
    )).services[0]  # fmt: skip
    gate = Gate.from_section(section, clock)
    assert gate.max_connections == 8
    assert (gate.head_timeout_s, gate.idle_timeout_s, gate.body_timeout_s) == (0.25, 2.0, 60.0)
    assert gate._hosts.any and gate._hosts.wildcard


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('allowed_hosts = ["http://gpu.lan"]', "services[0].allowed_hosts: expected host names"),
        ('allowed_hosts = ["gpu.lan:80"]', "services[0].allowed_hosts: expected host names"),
        ('allowed_hosts = "gpu.lan"', "services[0].allowed_hosts: "),
        ("max_connections = 0", "services[0].max_connections: "),
        ('head_timeout = "0s"', "services[0].head_timeout: expected a duration longer"),
        ("idle_timeout = 75", "services[0].idle_timeout: expected a duration"),
        ('body_timeout = "soon"', "services[0].body_timeout: expected a duration"),
    ],
)
def test_each_mistake_names_its_key(lines: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(SERVICE + lines + "\n"))
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems
