"""What the commands say around the work: `check` that matches `run`, messages a user can
act on (token mismatch, not running, durations, windows), log timestamps at a terminal."""

from __future__ import annotations

import io
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from fakes.rig import free_port
from rich.console import Console

from broker.api import ApiServer
from broker.cli import log_format, main, window_line
from broker.client import ServiceClient, show_status
from broker.clock import FakeClock
from broker.config import BrokerSection, PolicySection, load_config
from broker.errors import BrokerError
from broker.instance_lock import InstanceLock
from broker.scheduling.pool import (
    DrainStatus,
    Observation,
    PoolMachine,
    PoolState,
    ProviderView,
)
from broker.units import describe_duration

T0 = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)


# -- durations and the pool's reasons --------------------------------------------------------


def test_durations_read_as_a_person_writes_them() -> None:
    assert describe_duration(timedelta(seconds=50.984)) == "51s"
    assert describe_duration(timedelta(minutes=80)) == "1h 20m"
    assert describe_duration(timedelta(minutes=4, seconds=10)) == "4m 10s"
    assert describe_duration(timedelta(hours=2)) == "2h"
    assert describe_duration(timedelta(days=2, hours=3, minutes=59)) == "2d 3h"
    assert describe_duration(timedelta(0)) == "0s"


def _machine_story(window_end: datetime) -> tuple[PoolMachine, Observation]:
    # The timings below were written for a 15 min idle window and a 10 min local hold.
    machine = PoolMachine(
        PolicySection(idle_window=timedelta(minutes=15), local_hold=timedelta(minutes=10))
    )
    obs = Observation(
        now=T0,
        monotonic=0.0,
        window_end=window_end,
        gpus_idle=True,
        local_demand=False,
        provider=ProviderView(listed=False, rentals_running=0),
    )
    return machine, obs


def _at(machine: PoolMachine, obs: Observation, seconds: float, **changes: Any) -> tuple[
    Observation, Any
]:
    obs = replace(obs, now=T0 + timedelta(seconds=seconds), monotonic=seconds, **changes)
    return obs, machine.step(obs)


def test_local_hold_reason_has_no_milliseconds() -> None:
    machine, obs = _machine_story(T0 + timedelta(hours=9))
    obs, _ = _at(machine, obs, 0)
    obs, _ = _at(machine, obs, 15 * 60)
    obs, listed = _at(machine, obs, 17 * 60, drain=DrainStatus.VERIFIED)
    assert listed.state is PoolState.LISTED
    view = ProviderView(listed=True, rentals_running=0)
    obs, _ = _at(machine, obs, 30 * 60, drain=DrainStatus.NONE, provider=view, local_demand=True)
    free = ProviderView(listed=False, rentals_running=0)
    obs, back = _at(machine, obs, 30 * 60 + 6, provider=free)
    assert back.state is PoolState.LOCAL
    # 10 min hold from 30:06; at 39:15.016 there are 50.984 s left.
    obs, held = _at(machine, obs, 39 * 60 + 15.016, local_demand=False)
    assert held.reason.endswith("local hold after a reclaim (51s left)"), held.reason


def test_an_always_open_window_is_not_given_an_end_date() -> None:
    # A window merged past the calendar's 31-day horizon: its "end" is only where the
    # calendar stopped looking.
    machine, obs = _machine_story(T0 + timedelta(days=31, hours=2))
    obs, _ = _at(machine, obs, 0)
    obs, _ = _at(machine, obs, 15 * 60)
    obs, listed = _at(machine, obs, 17 * 60, drain=DrainStatus.VERIFIED)
    assert listed.reason == "listed: idle 15m, window always open, offer ends 00:17"


# -- status: when the next window opens ------------------------------------------------------


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[broker]\nstate_dir = "{tmp_path / "state"}"\ntimezone = "UTC"\n{body}')
    return path


def test_status_says_when_the_next_window_opens(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, '[[windows]]\ncron = "0 22 * * *"\nduration = "9h"\n'))
    noon = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    line = window_line(config, noon)
    assert line == "window: closed, next opens Wed 2026-11-25 22:00 UTC (in 10h)"
    night = window_line(config, datetime(2026, 11, 25, 23, 30, tzinfo=UTC))
    assert night == "window: open until Thu 2026-11-26 07:00 UTC (7h 30m left)"
    status = {
        "pools": [{"name": "machine", "state": "LOCAL", "since": noon.isoformat(),
                   "reason": "outside every window"}],
    }  # fmt: skip
    out = Console(file=io.StringIO(), width=200)
    show_status(status, config.broker.tz, out, window=line)
    assert "next opens Wed 2026-11-25 22:00 UTC" in cast(io.StringIO, out.file).getvalue()


def test_status_of_an_always_open_window(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, '[[windows]]\ncron = "0 0 * * *"\nduration = "24h"\n'))
    assert window_line(config, T0) == "window: always open"


# -- logs ------------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_foreground_logs_carry_timestamps_at_a_terminal_only() -> None:
    assert log_format(_Tty(), {}).startswith("%(asctime)s ")
    assert "asctime" not in log_format(io.StringIO(), {})
    # journald stamps each line itself
    assert "asctime" not in log_format(_Tty(), {"JOURNAL_STREAM": "8:1234"})


# -- the API client's messages ---------------------------------------------------------------


def _section(port: int, env: str) -> BrokerSection:
    return BrokerSection.model_validate(
        {"api_listen": f"127.0.0.1:{port}", "api_token_env": env}
    )


async def _post_with(
    monkeypatch: pytest.MonkeyPatch, service_token: str | None, client_token: str
) -> str:
    port = free_port()
    if service_token is None:
        monkeypatch.delenv("SERVICE_TOKEN_T", raising=False)
    else:
        monkeypatch.setenv("SERVICE_TOKEN_T", service_token)
    api = ApiServer(cast(Any, object()), _section(port, "SERVICE_TOKEN_T"))
    await api.start()
    monkeypatch.setenv("CLIENT_TOKEN_T", client_token)
    try:
        with pytest.raises(BrokerError) as caught:
            await ServiceClient(_section(port, "CLIENT_TOKEN_T")).post("pause")
    finally:
        await api.aclose()
    return str(caught.value)


async def test_a_service_without_a_token_is_named_as_the_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = await _post_with(monkeypatch, None, "client-token-0123456789")
    assert "the running gpu-broker" in message and "has no API token" in message
    assert "restart it" in message
    assert not message.startswith("environment variable")
    assert "client-token-0123456789" not in message


async def test_another_token_is_called_another_token(monkeypatch: pytest.MonkeyPatch) -> None:
    message = await _post_with(monkeypatch, "service-token-0123456789", "client-token-0123456789")
    assert "has another API token" in message
    assert "CLIENT_TOKEN_T" in message
    assert "service-token" not in message and "client-token-0123456789" not in message


async def test_not_running_says_how_to_start_it_without_aiohttp_noise() -> None:
    client = ServiceClient(_section(free_port(), "X"), Path("/etc/gpu-broker/config.toml"))
    with pytest.raises(BrokerError) as caught:
        await client.status()
    message = str(caught.value)
    assert "is not running" in message
    assert "gpu-broker run -c /etc/gpu-broker/config.toml" in message
    assert "systemctl start gpu-broker" in message
    assert "ssl:default" not in message and "Connect call failed" not in message


# -- check matches run -----------------------------------------------------------------------


def _service_config(tmp_path: Path, gate_port: int, api_port: int, gpus: str = "[0, 1]") -> Path:
    return _config(
        tmp_path,
        f'api_listen = "127.0.0.1:{api_port}"\n'
        '[gpus]\nbackend = "auto"\n'  # no driver here: the two simulated GPUs
        '[[services]]\nname = "ollama"\nkind = "ollama"\n'
        f'upstream = "http://127.0.0.1:{free_port()}"\ngate_listen = "127.0.0.1:{gate_port}"\n'
        f"gpus = {gpus}\n",
    )


def test_check_fails_on_a_gpu_index_the_machine_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _service_config(tmp_path, free_port(), free_port(), gpus="[0, 3]")
    assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 2
    out = capsys.readouterr().out
    assert "FAIL services[0].gpus: GPU 3 does not exist (GPUs found: 0, 1)" in out


def test_check_fails_on_a_taken_gate_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _service_config(tmp_path, port, free_port())
        assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 2
    out = capsys.readouterr().out
    assert f"FAIL services[0].gate_listen: cannot listen on 127.0.0.1:{port}" in out
    assert "OLLAMA_HOST" in out


def test_check_says_a_service_already_runs_on_the_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _service_config(tmp_path, free_port(), free_port())
    lock = InstanceLock.acquire(tmp_path / "state")
    try:
        assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 0
    finally:
        lock.release()
    out = capsys.readouterr().out
    assert "already runs on" in out and "pid " in out
    assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 0
    again = capsys.readouterr().out
    assert "already runs" not in again and "ok   listening addresses free" in again


def test_check_of_an_always_open_window_and_a_stopped_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _service_config(tmp_path, free_port(), free_port())
    with config.open("a") as f:
        f.write('[[windows]]\ncron = "0 0 * * *"\nduration = "24h"\n')
    assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 0
    out = capsys.readouterr().out
    assert "ok   windows: open now, and always open" in out
    assert "is not reachable at http://127.0.0.1:" in out and "(nothing listens there)" in out
    assert "ssl:default" not in out
