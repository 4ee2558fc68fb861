"""Issue 12: a second start, weak tokens, foreign Hosts, an exposed API, open connections,
file modes and a ledger that refuses writes (the real-process cases are in
test_daemon_process.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.ollama import FakeOllama
from fakes.rig import TOKEN, Rig, free_port, rig_config
from fakes.vast import FakeVast

import broker.daemon
from broker.api import ApiServer
from broker.cli import main
from broker.clock import FakeClock
from broker.config import Config
from broker.errors import LedgerError
from broker.gpu.base import GpuDevice, GpuSample, Snapshot
from broker.gpu.energy import MAX_HELD, EnergyAccountant
from broker.instance_lock import InstanceLock, InstanceLocked
from broker.ledger import SqliteLedger, open_ledger

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def config_file(tmp_path: Path, broker: str = "", token_env: str = "SAFETY_TOKEN") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[broker]
state_dir = "{tmp_path / "state"}"
timezone = "UTC"
sample_interval = "100ms"
api_listen = "127.0.0.1:{free_port()}"
{f'api_token_env = "{token_env}"' if token_env else ""}
{broker}

[gpus]
backend = "fake"
fake = [{{ uuid = "GPU-safety-0" }}]

[provider]
kind = "paper"
arrivals_per_hour = 0
"""
    )
    return path


# ---- tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [("   ", "environment variable SAFETY_TOKEN is blank"), ("short-token", "11 characters")],
)
def test_a_blank_or_short_token_is_refused_by_check_and_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
    why: str,
) -> None:
    monkeypatch.setenv("SAFETY_TOKEN", value)
    config = config_file(tmp_path)
    assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 2
    out = capsys.readouterr().out
    assert "FAIL broker.api_token_env: " in out and why in out, out
    assert "token is set" not in out

    assert main(["run", "-c", str(config)], clock=FakeClock(T0)) == 2
    err = capsys.readouterr().err
    assert "broker.api_token_env: " in err and why in err, err
    assert not (tmp_path / "state").exists(), "run touched the state directory"


def test_a_token_file_readable_by_others_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "api-token"
    token.write_text("a-long-enough-token-0123456789\n")
    token.chmod(0o640)
    config = config_file(tmp_path, f'api_token_file = "{token}"', token_env="")
    assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 2
    out = capsys.readouterr().out
    assert f"FAIL broker.api_token_file: {token} is readable by group or others" in out
    assert f"chmod 600 {token}" in out
    assert main(["run", "-c", str(config)], clock=FakeClock(T0)) == 2
    assert f"chmod 600 {token}" in capsys.readouterr().err

    token.chmod(0o600)
    assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 0
    assert "ok   broker.api_token is set (30 characters)" in capsys.readouterr().out


# ---- the API: tokens, Host, exposure ------------------------------------------------------


async def start_rig(
    clock: FakeClock, tmp_path: Path, ollama: FakeOllama, vast: FakeVast, **broker: Any
) -> Rig:
    config = rig_config(tmp_path / "state", ollama_url=ollama.url, vast_url=vast.url)
    data = config.model_dump()
    data["broker"] |= broker
    rig = Rig(clock, Config.model_validate(data), ollama, vast)
    return await rig.start()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("RIG_VAST_KEY", "rig-vast-key")
    monkeypatch.setenv("RIG_API_TOKEN", TOKEN)
    return monkeypatch


async def test_an_empty_bearer_never_authorizes(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("RIG_API_TOKEN", "   ")  # refused by run; the API must not treat it as ""
    rig = await start_rig(clock, tmp_path, fake_ollama, fake_vast)
    try:
        async with aiohttp.ClientSession() as session:
            for given in ("Bearer", "Bearer ", "Bearer    ", "bearer"):
                async with session.post(
                    rig.api_url + "/api/pause", headers={"Authorization": given}
                ) as response:
                    assert response.status == 401, given
        assert not rig.daemon.scheduler.paused
    finally:
        await rig.aclose()


async def test_a_foreign_host_gets_403_on_every_route(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    env: pytest.MonkeyPatch,
) -> None:
    rig = await start_rig(
        clock, tmp_path, fake_ollama, fake_vast, api_allowed_hosts=["gpu-box.lan"]
    )
    port = rig.daemon.api.port if rig.daemon.api else None
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/api/status", "/metrics", "/", "/api/timeline", "/nowhere"):
                async with session.get(
                    rig.api_url + path, headers={"Host": "evil.example"}
                ) as response:
                    assert response.status == 403, path
                    assert "Host" in (await response.json())["error"]
            async with session.post(
                rig.api_url + "/api/pause",
                headers={"Host": f"evil.example:{port}", "Authorization": f"Bearer {TOKEN}"},
            ) as response:
                assert response.status == 403
            assert not rig.daemon.scheduler.paused
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", "gpu-box.lan", "[::1]"):
                async with session.get(
                    rig.api_url + "/api/status", headers={"Host": host}
                ) as response:
                    assert response.status == 200, host
    finally:
        await rig.aclose()


async def test_an_api_beyond_loopback_needs_the_token_for_every_route_and_warns(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    with caplog.at_level(logging.WARNING):
        rig = await start_rig(
            clock, tmp_path, fake_ollama, fake_vast, api_listen=f"0.0.0.0:{port}"
        )
    assert any("beyond this machine" in r.getMessage() for r in caplog.records)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/api/status", "/metrics", "/", "/api/report"):
                for given in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer x"}):
                    async with session.get(base + path, headers=given) as response:
                        assert response.status == 401, (path, given)
                async with session.get(
                    base + path, headers={"Authorization": f"Bearer {TOKEN}"}
                ) as response:
                    assert response.status == 200, path
    finally:
        await rig.aclose()


def test_check_and_run_refuse_an_exposed_api_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SAFETY_TOKEN", raising=False)
    config = config_file(tmp_path)
    text = config.read_text()
    config.write_text(text.replace('api_listen = "127.0.0.1:', 'api_listen = "0.0.0.0:'))
    assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 2
    out = capsys.readouterr().out
    assert "FAIL broker.api_listen: 0.0.0.0:" in out and "every route needs the API token" in out
    assert main(["run", "-c", str(config)], clock=FakeClock(T0)) == 2
    assert "broker.api_listen: 0.0.0.0:" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()

    monkeypatch.setenv("SAFETY_TOKEN", "a-long-enough-token-0123456789")
    assert main(["check", "-c", str(config)], clock=FakeClock(T0)) == 0
    out = capsys.readouterr().out
    assert "warn broker.api_listen: 0.0.0.0:" in out and "reachable from other machines" in out


# ---- the API listener's bounds ------------------------------------------------------------


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )  # fmt: skip
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head


async def test_over_the_connection_cap_new_ones_get_503_and_held_ones_go_on(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = await start_rig(clock, tmp_path, fake_ollama, fake_vast)
    broker_section = rig.config.broker.model_copy(update={"api_listen": f"127.0.0.1:{free_port()}"})
    api = ApiServer(rig.daemon, broker_section, max_connections=3)
    await api.start()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(3):
            held.append(await asyncio.open_connection("127.0.0.1", api.port))
        assert (await _get(*held[0])).startswith(b"HTTP/1.1 200")
        with caplog.at_level(logging.WARNING):
            reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
            writer.write(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b'"error"' in answer
        assert any("refused with 503" in r.getMessage() for r in caplog.records)
        for conn in held:  # the established ones keep working
            assert (await _get(*conn)).startswith(b"HTTP/1.1 200")
        held.pop()[1].close()
        for _ in range(200):  # the server sees the close
            if api.limit.open < 3:
                break
            await asyncio.sleep(0.01)
        held.append(await asyncio.open_connection("127.0.0.1", api.port))
        assert (await _get(*held[-1])).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in held:
            writer.close()
        await api.aclose()
        await rig.aclose()


async def test_a_slow_or_silent_connection_is_closed(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    env: pytest.MonkeyPatch,
) -> None:
    rig = await start_rig(clock, tmp_path, fake_ollama, fake_vast)
    broker_section = rig.config.broker.model_copy(update={"api_listen": f"127.0.0.1:{free_port()}"})
    api = ApiServer(rig.daemon, broker_section, keepalive_timeout=0.3)
    await api.start()
    try:
        silent = await asyncio.open_connection("127.0.0.1", api.port)
        slow = await asyncio.open_connection("127.0.0.1", api.port)
        slow[1].write(b"GET /api/status HTTP/1.1\r\nHo")  # a head that never ends
        idle = await asyncio.open_connection("127.0.0.1", api.port)
        assert (await _get(*idle)).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        for reader, _ in (silent, slow, idle):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        assert time.monotonic() - started < 3
        for _, writer in (silent, slow, idle):
            writer.close()
    finally:
        await api.aclose()
        await rig.aclose()


# ---- files ------------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def test_state_dir_is_0700_and_the_ledger_0600_under_umask_022(
    tmp_path: Path, umask_022: None
) -> None:
    state = tmp_path / "deep" / "state"
    lock = InstanceLock.acquire(state)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        config = config_file(tmp_path).read_text()
        from broker.config import load_config

        (tmp_path / "config.toml").write_text(config.replace(str(tmp_path / "state"), str(state)))
        ledger = await open_ledger(load_config(tmp_path / "config.toml").broker, host="t")
        try:
            await ledger.record_state("pool", "main", "local", T0)
            for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
                assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        finally:
            await ledger.close()
    finally:
        lock.release()


def test_the_lock_names_its_holder_and_is_free_again_after_release(tmp_path: Path) -> None:
    lock = InstanceLock.acquire(tmp_path / "state")
    with pytest.raises(InstanceLocked, match=rf"another gpu-broker \(pid {os.getpid()}\) is using"):
        InstanceLock.acquire(tmp_path / "state")
    lock.release()
    InstanceLock.acquire(tmp_path / "state").release()


# ---- a ledger that refuses writes ---------------------------------------------------------


class RefusingLedger(SqliteLedger):
    """A full disk, as the broker sees it: every write raises LedgerError while `refuse`."""

    refuse = False

    def _write(self, statements: Any) -> Any:
        if self.refuse:
            raise LedgerError("ledger write failed: database or disk is full")
        return super()._write(statements)

    def _write_many(self, sql: str, rows: Any) -> None:
        if self.refuse:
            raise LedgerError("ledger write failed: database or disk is full")
        super()._write_many(sql, rows)


async def test_energy_a_flush_could_not_write_is_kept_merged_and_written_later(
    tmp_path: Path,
) -> None:
    clock = FakeClock(T0)
    ledger = await RefusingLedger.open(tmp_path / "ledger.sqlite3", "t")
    device = GpuDevice(0, "GPU-e", "fake", 80_000, 300.0, 300.0)
    energy = EnergyAccountant([device], clock, ledger=ledger, pool_state="listed")
    ledger.refuse = True
    seconds = 3 * 3600  # three hours of a full disk, a flush a minute
    for t in range(0, seconds + 1, 10):
        at = float(t)
        snap = Snapshot(
            at, T0 + timedelta(seconds=t), (GpuSample(0, "GPU-e", power_w=100.0,
            energy_mj=t * 100_000),), {}, None,
        )  # fmt: skip
        energy.observe(snap)
        if t % 60 == 0 and t:
            assert await energy.flush() == 0
    held = energy.pending()
    assert sum(r.joules for r in held) == pytest.approx(100.0 * seconds)
    # Merged to one record per 15 minutes, not one a minute.
    assert len(held) <= seconds // 900 + 1 < seconds // 60
    assert all(r.end - r.start <= timedelta(minutes=15) for r in held)
    assert energy.unflushed() is not None

    ledger.refuse = False
    assert await energy.flush() == len(held)
    written = await ledger.energy(T0, T0 + timedelta(seconds=seconds))
    assert sum(r.joules for r in written) == pytest.approx(100.0 * seconds)
    assert energy.unflushed() is None
    await ledger.close()
    assert MAX_HELD >= 1000


def test_a_stop_that_could_not_write_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAFETY_TOKEN", "a-long-enough-token-0123456789")
    config = config_file(tmp_path)
    port = int(config.read_text().split('api_listen = "127.0.0.1:')[1].split('"')[0])
    opened: list[RefusingLedger] = []

    async def refusing_ledger(section: Any, host: str | None = None) -> RefusingLedger:
        ledger = await RefusingLedger.open(section.state_dir / "ledger.sqlite3", "t")
        opened.append(ledger)
        return ledger

    monkeypatch.setattr(broker.daemon, "open_ledger", refusing_ledger)
    failed: list[BaseException] = []

    def disk_fills_then_sigterm() -> None:
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            opened[0].refuse = True
            time.sleep(0.5)  # energy accumulates that can no longer be written
        except BaseException as err:  # reported by the test below
            failed.append(err)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=disk_fills_then_sigterm)
    thread.start()
    try:
        code = main(["run", "-c", str(config)])
    finally:
        thread.join()
    assert not failed, failed
    err = capsys.readouterr().err
    assert code == 1, err
    assert "gpu-broker: the stop could not finish" in err
    assert "energy not written to the ledger, lost: " in err
    assert "clean shutdown incomplete" in err
