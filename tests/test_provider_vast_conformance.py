"""Our Vast.ai adapter sends what the official `vastai` client sends.

The official CLI (PyPI `vastai`, in the test extra) and our adapter both talk to the same
recording fake; for each operation the method, path, raw query string and body bytes must
be identical. The CLI runs as real subprocesses, all at once (they are the slow part),
each with its own HOME and its own API key so its requests can be told apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fakes.vast import FakeVast, Recorded

from broker.clock import FakeClock
from broker.config import VastProvider
from broker.errors import ProviderError
from broker.pricing.market import Machine, VastMarketReader
from broker.pricing.settings import PricingSection
from broker.providers import Offer
from broker.providers.vast import VastMarket

VASTAI = Path(sys.executable).parent / "vastai"
END = 1795644000  # 2026-11-25 22:00 UTC, ten hours after the test clock's start
NOV_1, NOV_8 = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 8, tzinfo=UTC)

Operation = Callable[[VastMarket], Awaitable[Any]]
OURS = Machine(4242, "RTX 3090", 4, verified=True, listed=True, listed_gpu_cost=0.3)


def _reader(vast: VastMarket) -> VastMarketReader:
    return VastMarketReader(vast._api, vast._clock, PricingSection(), lambda: OURS)


CASES: dict[str, tuple[list[str], Operation]] = {
    "list, no end date": (
        ["list", "machine", "4242", "-g", "0.3", "-s", "0.1"],
        lambda v: v.list(Offer(price_gpu=0.3, end_date=None, price_disk=0.1)),
    ),
    "list, end date, min bid, min chunk": (
        ["list", "machine", "4242", "-g", "0.3", "-s", "0.1", "-b", "0.12", "-m", "2",
         "-e", str(END)],
        lambda v: v.list(
            Offer(
                price_gpu=0.3,
                end_date=datetime.fromtimestamp(END, UTC),
                min_bid=0.12,
                min_chunk=2,
                price_disk=0.1,
            )
        ),
    ),
    "unlist": (["unlist", "machine", "4242"], lambda v: v.unlist()),
    "show machines": (["show", "machines"], lambda v: v.machines()),
    "show machine": (["show", "machine", "4242"], lambda v: v.machine()),
    "earnings, one machine": (
        ["show", "earnings", "-s", "2026-11-01", "-e", "2026-11-08", "-m", "4242"],
        lambda v: v.machine_earnings(NOV_1, NOV_8),
    ),
    "earnings, all machines": (
        ["show", "earnings", "-s", "2026-11-01", "-e", "2026-11-08"],
        lambda v: v.machine_earnings(NOV_1, NOV_8, machine_id=None),
    ),
    # Displacement by self-rental (the calls VastMarket.displace_interruptible and
    # end_displacement make).
    "search our own offer": (
        ["search", "offers", "-n", "machine_id=4242", "-o", "num_gpus-", "--storage", "1"],
        lambda v: v.own_offer(),
    ),
    "self-rental": (
        ["create", "instance", "74242", "--image", "alpine:latest", "--disk", "1", "--label",
         "gpu-broker-displace", "--entrypoint", "sleep", "--args", "infinity"],
        lambda v: v.create_instance(74242),
    ),
    "show instance": (["show", "instance", "555"], lambda v: v.instance(555)),
    "show our self-rentals": (
        ["show", "instances", "--label", "gpu-broker-displace"],
        lambda v: v.self_rentals(),
    ),
    # price_gpu = "market" (broker/pricing/market.py): the market reads.
    "search comparable offers": (
        ["search", "offers", "gpu_name=RTX_3090 num_gpus=4", "-o", "dph_total", "--limit", "256"],
        lambda v: _reader(v).read(),
    ),
    "search our own offer's price": (
        ["search", "offers", "-n", "machine_id=4242", "-o", "dph_total"],
        lambda v: _reader(v)._own_offer(OURS),
    ),
    "market metrics": (
        ["show", "gpu-metrics", "--verified", "true", "--num-gpus", "4"],
        lambda v: _reader(v)._metrics(OURS),
    ),
    "destroy instance": (
        ["destroy", "instance", "555", "-y"],
        lambda v: v.destroy_instance(555),
    ),
}


async def run_cli(url: str, key: str, args: list[str], home: Path) -> tuple[int, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "XDG_"))
    } | {
        "HOME": str(home),
        "VASTAI_NO_UPDATE_CHECK": "1",
        "TZ": "UTC",  # the CLI reads --start_date as local time
    }
    process = await asyncio.create_subprocess_exec(
        str(VASTAI), "--url", url, "--api-key", key, "--raw", "--retry", "1", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode(errors="replace")


def first_call(fake: FakeVast, key: str) -> Recorded:
    calls = [
        r
        for r in fake.requests
        if r.authorization == f"Bearer {key}" and not r.path.startswith("/api/v0/users/current")
    ]
    assert calls, f"no request with key {key}"
    return calls[0]


def shape(r: Recorded) -> tuple[str, str, str, bytes, str | None]:
    return (r.method, r.path, r.query, r.raw_body, r.content_type if r.raw_body else None)


@pytest.mark.skipif(not shutil.which(str(VASTAI)), reason="the vastai CLI is in the test extra")
async def test_adapter_sends_what_the_official_client_sends(
    clock: FakeClock, tmp_path: Path
) -> None:
    names = list(CASES)
    cli_keys = {name: f"cli-{i}" for i, name in enumerate(names)}
    our_keys = {name: f"ours-{i}" for i, name in enumerate(names)}
    for i in range(len(names)):
        (tmp_path / f"home{i}").mkdir()
    fake = FakeVast(clock, api_keys=set(cli_keys.values()) | set(our_keys.values()))
    await fake.start()
    try:
        results = await asyncio.gather(
            *(
                run_cli(fake.url, cli_keys[name], CASES[name][0], tmp_path / f"home{i}")
                for i, name in enumerate(names)
            )
        )
        for name, (code, output) in zip(names, results, strict=True):
            assert code == 0, f"vastai {name}: exit {code}\n{output}"

        config = VastProvider.model_validate(
            {"kind": "vast", "machine_id": 4242, "price_gpu": 0.3, "base_url": fake.url,
             "request_spacing": "0s", "docker_socket": None}
        )  # fmt: skip
        for name in names:
            async with VastMarket(config, clock, api_key=our_keys[name]) as vast:
                # An answer may be an error (nothing is listed, no instance 555): only the
                # request is compared.
                with contextlib.suppress(ProviderError):
                    await CASES[name][1](vast)

        for name in names:
            theirs, ours = first_call(fake, cli_keys[name]), first_call(fake, our_keys[name])
            assert shape(ours) == shape(theirs), name
    finally:
        await fake.close()


def test_the_cases_cover_what_the_issue_names() -> None:
    args = [" ".join(a) for a, _ in CASES.values()]
    assert any("-e" in a and "-b" in a and "-m 2" in a for a in args if a.startswith("list"))
    assert any(a.startswith("list") and "-e" not in a for a in args)
    assert {a.split()[0] for a in args} == {"list", "unlist", "show", "search", "create",
                                           "destroy"}  # fmt: skip
