"""Which GPUs renters hold, from a fake Docker Engine API on a unix socket."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes.docker import FakeDocker
from fakes.vast import FakeVast

from broker.clock import FakeClock
from broker.config import Config, VastProvider
from broker.providers import create_provider
from broker.providers.docker import DockerRenters, contract_id
from broker.providers.vast import VastMarket


@pytest.fixture
async def docker(tmp_path: Path) -> AsyncIterator[FakeDocker]:
    server = FakeDocker(tmp_path / "docker.sock")
    await server.start()
    yield server
    await server.close()


def test_renter_names() -> None:
    assert contract_id("/C.123456") == 123456
    assert contract_id("C.7") == 7
    assert contract_id("/ollama") is None and contract_id("/C.abc") is None


async def test_device_requests_and_visible_devices_name_the_gpus(docker: FakeDocker) -> None:
    docker.add("C.1001", device_ids=["0", "1"])
    docker.add("C.1002", env=["NVIDIA_VISIBLE_DEVICES=GPU-abc"])
    docker.add("ollama", device_ids=["2"])  # the owner's own container is not a renter
    renters = await DockerRenters(docker.socket_path).snapshot()
    assert renters is not None
    assert renters.containers == ("C.1001", "C.1002")
    assert renters.held(0) is True and renters.held(1) is True
    assert renters.held(2, "GPU-x") is False
    assert renters.held(3, "GPU-abc") is True
    assert all(path.startswith("/containers/") for path in docker.requests)


async def test_a_renter_whose_gpus_cannot_be_named_makes_the_rest_unknown(
    docker: FakeDocker,
) -> None:
    docker.add("C.1001", device_ids=["0"])
    docker.add("C.1003", count=2)  # two GPUs, Docker picked which
    renters = await DockerRenters(docker.socket_path).snapshot()
    assert renters is not None
    assert renters.held(0) is True
    assert renters.held(1) is None  # never guessed free


async def test_all_gpus(docker: FakeDocker) -> None:
    docker.add("C.1004", count=-1)
    renters = await DockerRenters(docker.socket_path).snapshot()
    assert renters is not None and renters.held(3) is True


async def test_no_docker_is_unknown_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader = DockerRenters(tmp_path / "absent.sock")
    assert await reader.snapshot() is None
    assert await reader.snapshot() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stays unknown" in warnings[0].getMessage()


async def test_vast_status_carries_the_renter_gpus(
    docker: FakeDocker, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAST_API_KEY", "test-key")
    docker.add("C.2001", device_ids=["GPU-1111"])
    fake = FakeVast(clock)
    await fake.start()
    try:
        config = VastProvider.model_validate(
            {"kind": "vast", "machine_id": 4242, "price_gpu": 0.3, "base_url": fake.url,
             "request_spacing": "0s", "docker_socket": str(docker.socket_path)}
        )  # fmt: skip
        provider = create_provider(Config(provider=config), clock)
        assert isinstance(provider, VastMarket)
        async with provider:
            status = await provider.status()
    finally:
        await fake.close()
    assert status.renter_gpus is not None
    assert status.renter_gpus.held(1, "GPU-1111") is True
    assert status.renter_gpus.held(0, "GPU-0000") is False
