"""[[notify]]: events to apprise channels, off the loop, rate-limited, failures logged once.

The wire test sends through the real apprise to its `json://` plugin and a local aiohttp
server; the rest use a recording sender on the FakeClock, so no test waits on a rate limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from fakes.ollama import FakeOllama
from fakes.rig import Rig, rig_config
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.config import Config, NotifySection, load_config
from broker.errors import ConfigError
from broker.notify import Notifier
from broker.scheduling.pool import PoolState


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.fail = fail
        self.calls = 0

    async def __call__(self, url: str, title: str, body: str) -> bool:
        self.calls += 1
        if self.fail:
            raise ConnectionError("connection refused")
        self.sent.append((url, title, body))
        return True


def _config(*channels: dict[str, Any]) -> Config:
    return Config.model_validate({"broker": {"timezone": "UTC"}, "notify": list(channels)})


async def settle() -> None:
    for _ in range(20):  # let the sender tasks take their queues (no clock time passes)
        await asyncio.sleep(0)


async def test_events_are_sent_and_a_burst_waits_for_min_interval_together(
    clock: FakeClock,
) -> None:
    send = Recorder()
    notifier = Notifier(_config({"url": "json://x", "min_interval": "1m"}), clock, send=send)
    notifier.start()
    try:
        notifier.state_changed(PoolState.LISTED, PoolState.DRAINING, "listed: idle 15m")
        await settle()
        assert [body for _, _, body in send.sent] == ["12:00 Listed on the marketplace: "
                                                      "listed: idle 15m"]  # fmt: skip
        notifier.state_changed(PoolState.RENTED, PoolState.LISTED, "rented: 1 rental(s)")
        notifier.state_changed(PoolState.RECLAIMING, PoolState.RENTED, "reclaiming: local")
        notifier.request_event("rejected", "ollama")
        await settle()
        assert len(send.sent) == 1  # the channel waits out its minute
        await clock.advance(60)
        await settle()
        assert len(send.sent) == 2
        body = send.sent[1][2].splitlines()
        assert [line.split(": ", 1)[0] for line in body] == [
            "12:00 Rented", "12:00 Reclaim asked", "12:00 Local request refused",
        ]  # fmt: skip
        notifier.state_changed(PoolState.LOCAL, PoolState.RECLAIMING, "reclaimed")
        notifier.state_changed(PoolState.DEGRADED, PoolState.LOCAL, "marketplace unreadable")
        notifier.state_changed(PoolState.IDLE, PoolState.LOCAL, "idle")  # not an event
        await clock.advance(60)
        await settle()
        assert send.sent[2][2].splitlines() == [
            "12:01 GPUs back for local use: reclaimed",
            "12:01 Degraded: marketplace unreadable",
        ]
    finally:
        await notifier.aclose()


async def test_a_channel_gets_only_its_events(clock: FakeClock) -> None:
    send = Recorder()
    notifier = Notifier(
        _config({"url": "json://a", "events": ["rented"]}, {"url": "json://b"}), clock, send=send
    )
    notifier.start()
    try:
        notifier.state_changed(PoolState.LISTED, PoolState.DRAINING, "listed")
        notifier.state_changed(PoolState.RENTED, PoolState.LISTED, "rented")
        await settle()
        await clock.advance(60)
        await settle()
        by_url: dict[str, list[str]] = {}
        for url, _, body in send.sent:
            by_url.setdefault(url, []).extend(body.splitlines())
        assert by_url["json://a"] == ["12:00 Rented: rented"]
        assert len(by_url["json://b"]) == 2
    finally:
        await notifier.aclose()


async def test_a_failing_channel_is_logged_once_and_its_recovery_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    send = Recorder(fail=True)
    notifier = Notifier(_config({"url": "json://x", "min_interval": "10s"}), clock, send=send)
    notifier.start()
    try:
        with caplog.at_level(logging.INFO, logger="broker.notify"):
            for minute in range(3):
                notifier.state_changed(PoolState.RENTED, PoolState.LISTED, f"rented {minute}")
                await settle()
                await clock.advance(10)
                await settle()
            assert send.calls == 3
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert "notify[0]: cannot send notifications: ConnectionError" in warnings[0].message
            send.fail = False
            notifier.state_changed(PoolState.RENTED, PoolState.LISTED, "rented again")
            await settle()
            assert any("sending works again" in r.message for r in caplog.records)
    finally:
        await notifier.aclose()


async def test_a_stuck_channel_blocks_neither_the_hooks_nor_another_channel(
    clock: FakeClock,
) -> None:
    stuck = asyncio.Event()
    sent: list[str] = []

    async def send(url: str, title: str, body: str) -> bool:
        if url == "json://stuck":
            await stuck.wait()  # a channel that never answers
        sent.append(url)
        return True

    notifier = Notifier(_config({"url": "json://stuck"}, {"url": "json://ok"}), clock, send=send)
    notifier.start()
    try:
        notifier.state_changed(PoolState.RENTED, PoolState.LISTED, "rented")
        await settle()
        notifier.state_changed(PoolState.RECLAIMING, PoolState.RENTED, "reclaim")  # returns
        await settle()
        assert sent == ["json://ok"]
    finally:
        stuck.set()
        await notifier.aclose()


async def test_the_daily_earnings_line_at_daily_at(clock: FakeClock) -> None:
    send = Recorder()
    asked: list[tuple[datetime, datetime]] = []

    async def report(start: datetime, end: datetime) -> Any:
        asked.append((start, end))
        totals = SimpleNamespace(earnings=0.0123, earnings_source="estimate",
                                 energy_cost=0.0041, net=0.0082, rented_gpu_hours=0.4)  # fmt: skip
        return SimpleNamespace(totals=totals, currency="EUR")

    config = _config({"url": "json://x", "events": ["earnings"], "daily_at": "13:30"})
    notifier = Notifier(config, clock, send=send, report=report)  # clock: 12:00 UTC
    notifier.start()
    try:
        await settle()
        await clock.advance(89 * 60)
        await settle()
        assert send.sent == []
        await clock.advance(60)
        await settle()
        assert asked == [(datetime(2026, 11, 24, tzinfo=UTC), datetime(2026, 11, 25, tzinfo=UTC))]
        assert send.sent[0][2] == (
            "13:30 Earnings: 2026-11-24: earned ~0.0123 EUR, energy cost 0.0041 EUR, "
            "net 0.0082 EUR; 0.4 GPU-h rented"
        )
        await clock.advance(timedelta(days=1).total_seconds())
        await settle()
        assert len(send.sent) == 2 and "2026-11-25: earned" in send.sent[1][2]
    finally:
        await notifier.aclose()


# -- the real apprise, to a local server --------------------------------------------------------


@pytest.fixture
async def json_sink() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def take(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", take)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"json://127.0.0.1:{port}/hook", received
    await runner.cleanup()


async def until(condition: Any, what: str) -> None:
    for _ in range(500):  # apprise sends from a worker thread: poll, bounded (~5 s)
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_apprise_json_to_a_local_server(
    clock: FakeClock, json_sink: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = json_sink
    notifier = Notifier(_config({"url_env": "NOTIFY_TEST_URL"}), clock)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOTIFY_TEST_URL", url)
        notifier.start()
        try:
            notifier.state_changed(PoolState.RENTED, PoolState.LISTED, "rented: 1 rental(s)")
            await until(lambda: received, "apprise's POST")
        finally:
            await notifier.aclose()
    assert received[0]["title"] == "gpu-broker"
    assert received[0]["message"] == "12:00 Rented: rented: 1 rental(s)"


async def test_the_daemon_notifies_its_listing(
    clock: FakeClock,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    fake_vast: FakeVast,
    monkeypatch: pytest.MonkeyPatch,
    json_sink: tuple[str, list[dict[str, Any]]],
) -> None:
    from fakes.rig import TOKEN, VAST_KEY

    monkeypatch.setenv("RIG_VAST_KEY", VAST_KEY)
    monkeypatch.setenv("RIG_API_TOKEN", TOKEN)
    url, received = json_sink
    config = rig_config(tmp_path / "state", ollama_url=fake_ollama.url, vast_url=fake_vast.url)
    config = config.model_copy(
        update={"notify": [NotifySection(url=url, events=["listed"], min_interval="0s")]}
    )
    rig = Rig(clock, config, fake_ollama, fake_vast)
    await rig.start()
    try:
        await rig.until_state(PoolState.LISTED, limit=600)
        await until(lambda: received, "the listing's notification")
    finally:
        await rig.aclose()
    assert received[0]["message"].split(": ", 1)[0].endswith("Listed on the marketplace")


def test_notify_config_errors_name_their_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[[notify]]\nurl = "ntfy://topic"\nevents = ["rentd"]\ndaily_at = "9h"\n'
        '[[notify]]\nurl = "ntfy://a"\nurl_env = "X"\nmin_intervl = "1m"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = "\n".join(caught.value.problems)
    assert "notify[0].events[0]" in text
    assert 'notify[0].daily_at: expected a time of day like "09:00"' in text
    assert "notify[1].min_intervl: unknown key (did you mean 'min_interval'?)" in text




def test_check_reads_every_notify_url_and_asks_apprise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.cli import main

    monkeypatch.delenv("NOTIFY_UNSET_T", raising=False)
    path = tmp_path / "config.toml"
    path.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\n'
        '[[notify]]\nurl = "json://127.0.0.1:9/hook"\nevents = ["rented"]\n'
        '[[notify]]\nurl_env = "NOTIFY_UNSET_T"\n'
        '[[notify]]\nurl = "nosuchservice://x"\n'
    )
    assert main(["check", "-c", str(path)], clock=FakeClock()) == 2
    out = capsys.readouterr().out
    assert "ok   notify[0]: json:// channel, events rented" in out
    assert "FAIL notify[1].url_env: environment variable NOTIFY_UNSET_T is not set" in out
    assert "FAIL notify[2].url: apprise does not understand this nosuchservice:// URL" in out
