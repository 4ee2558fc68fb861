"""RunPod, observe only, against a fake GraphQL endpoint; and `check` for both platforms."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fakes.runpod import KEY, FakeRunpod
from fakes.vast import FakeVast, ServerThread, drive

from broker.cli import main
from broker.clock import FakeClock
from broker.config import RunpodProvider
from broker.errors import ProviderAuthError, ProviderRejected, ProviderUnavailable
from broker.providers import Offer
from broker.providers.runpod import NOTE, QUERY, RunpodMarket


@pytest.fixture
async def fake() -> AsyncIterator[FakeRunpod]:
    server = FakeRunpod()
    await server.start()
    yield server
    await server.close()


def config(fake: FakeRunpod, **overrides: Any) -> RunpodProvider:
    data = {"kind": "runpod", "base_url": fake.url, "request_spacing": "0s"} | overrides
    return RunpodProvider.model_validate(data)


async def test_status_of_an_idle_listed_machine(fake: FakeRunpod, clock: FakeClock) -> None:
    async with RunpodMarket(config(fake), clock, api_key=KEY) as runpod:
        status = await runpod.status()
    assert fake.queries == [QUERY]
    assert status.machine_id == "m-1"
    assert status.listed is True
    assert status.gpu_occupancy == ("free",) * 4
    assert status.rentals.total == 0 and status.locked_until is None
    assert status.note == NOTE
    assert "dashboard" in NOTE and "hold local requests while pods run" in NOTE


async def test_running_pods_count_and_unknown_gpus_stay_unknown(
    fake: FakeRunpod, clock: FakeClock
) -> None:
    fake.machines[0]["gpuReserved"] = 2
    fake.machines[0]["pods"] = [
        {"id": "p1", "desiredStatus": "RUNNING", "costPerHr": 0.5, "gpuCount": 2},
        {"id": "p2", "desiredStatus": "EXITED", "costPerHr": 0.25, "gpuCount": 1},
    ]
    async with RunpodMarket(config(fake, machine_id="m-1"), clock, api_key=KEY) as runpod:
        status = await runpod.status()
    assert status.rentals.unknown_kind == 1 and status.rented
    # RunPod does not say which two GPUs the pod holds: none of the four is known free.
    assert status.gpu_occupancy == ("unknown",) * 4
    assert status.locked_until is None  # pods have no end date


async def test_it_cannot_list_and_says_where_to(fake: FakeRunpod, clock: FakeClock) -> None:
    async with RunpodMarket(config(fake), clock, api_key=KEY) as runpod:
        assert runpod.capabilities.can_list is False
        with pytest.raises(ProviderRejected, match="RunPod's dashboard"):
            await runpod.list(Offer(price_gpu=0.3, end_date=None))
        with pytest.raises(ProviderRejected, match="RunPod's dashboard"):
            await runpod.unlist()
    assert fake.queries == []


async def test_earnings_per_day_for_this_machine(fake: FakeRunpod, clock: FakeClock) -> None:
    async with RunpodMarket(config(fake), clock, api_key=KEY) as runpod:
        records = await runpod.earnings(date(2026, 11, 25), date(2026, 11, 30))
    assert [(r.day, r.amount, r.machine_id, r.source) for r in records] == [
        (date(2026, 11, 25), 4.5, "m-1", "provider")
    ]


async def test_a_refused_key_names_its_variable(fake: FakeRunpod, clock: FakeClock) -> None:
    async with RunpodMarket(config(fake), clock, api_key="wrong") as runpod:
        with pytest.raises(ProviderAuthError, match="RUNPOD_API_KEY"):
            await runpod.status()


async def test_several_machines_need_a_machine_id(fake: FakeRunpod, clock: FakeClock) -> None:
    fake.machines.append(dict(fake.machines[0], id="m-2"))
    async with RunpodMarket(config(fake), clock, api_key=KEY) as runpod:
        with pytest.raises(ProviderRejected, match=r"found: m-1, m-2"):
            await runpod.status()


async def test_a_502_is_retried(fake: FakeRunpod, clock: FakeClock) -> None:
    fake.failures = [502]
    async with RunpodMarket(config(fake), clock, api_key=KEY) as runpod:
        assert (await drive(clock, runpod.status())).listed is True
        fake.failures = [503, 503]
        runpod._api._attempts = 2
        with pytest.raises(ProviderUnavailable, match="503"):
            await drive(clock, runpod.status())


# -- gpu-broker check ------------------------------------------------------------------


def write_config(tmp_path: Path, provider: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[broker]\nstate_dir = "{tmp_path}"\n[provider]\n{provider}')
    return path


CHECK_CLOCK = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_check_vast_verifies_key_and_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(CHECK_CLOCK)
    fake = FakeVast(clock, api_keys={"good"})
    fake.machine().book.list_offer(clock.now(), 0.3, clock.now() + timedelta(hours=2))
    with ServerThread(fake.start, fake.close):
        monkeypatch.setenv("VAST_API_KEY", "good")
        base = f'kind = "vast"\nprice_gpu = 0.3\nbase_url = "{fake.url}"\ndocker_socket = ""\n'
        assert main(["check", "-c", str(write_config(tmp_path, base + "machine_id = 4242\n"))],
                    clock=clock) == 0  # fmt: skip
        out = capsys.readouterr().out
        assert "ok   provider.vast: API key accepted" in out
        assert "ok   provider.vast: machine 4242: 4x RTX 3090, online, listed at 0.3" in out

        assert main(["check", "-c", str(write_config(tmp_path, base + "machine_id = 99\n"))],
                    clock=clock) == 2  # fmt: skip
        out = capsys.readouterr().out
        assert "FAIL provider.machine_id: machine 99 is not among this account's machines " \
               "(found: 4242)" in out  # fmt: skip

        monkeypatch.setenv("VAST_API_KEY", "bad")
        assert main(["check", "-c", str(write_config(tmp_path, base + "machine_id = 4242\n"))],
                    clock=clock) == 2  # fmt: skip
        out = capsys.readouterr().out
        refused = (
            "FAIL provider.vast: Vast.ai refused the API key from the environment variable "
            "VAST_API_KEY (provider.api_key_env) (401: Invalid user key)"
        )
        assert refused in out
        assert "bad" not in out.replace("refused", "")


def test_check_runpod_says_listing_is_manual(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRunpod()
    with ServerThread(fake.start, fake.close):
        monkeypatch.setenv("RUNPOD_API_KEY", KEY)
        path = write_config(tmp_path, f'kind = "runpod"\nbase_url = "{fake.url}"\n')
        assert main(["check", "-c", str(path)], clock=FakeClock(CHECK_CLOCK)) == 0
    out = capsys.readouterr().out
    assert (
        "note provider.runpod: RunPod is observe only: listing and unlisting are done in "
        "RunPod's dashboard, and gpu-broker will hold local requests while pods run"
    ) in out
    assert "ok   provider.runpod: machine m-1: 4 GPUs, listed, 0 pod(s) running" in out
