"""Our Clore.ai adapter sends what Clore's official Python SDK sends.

`clore-ai` is not on this project's local package index, so it is not a test extra. Two
checks instead:
- always: every request the adapter makes, recorded by the fake, equals the request the
  SDK builds for the same call, as `sdk_request` below transcribes it from the SDK's source
  (`clore-ai` 0.1.1, `clore_ai/client.py`, `AsyncCloreAI._request` lines 512-550 and the
  methods `wallets`, `my_servers`, `server_config`, `set_server_settings`; wheel sha256
  d19af502ee3d9d20ba7d281e32ba140fe19bc834fbceea56b4aa78285193d0e6);
- where `clore_ai` can be imported: the real SDK, pointed at the same recording fake, makes
  the same calls, and the two recordings must be equal.
What "equal" means: method, path, the `auth` header, Content-Type, and the JSON body with its
keys in the same order. Body bytes are not compared: httpx writes JSON without spaces and
our client's `json.dumps` with them, which no JSON reader tells apart; nor are User-Agent
and Accept, each client's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from fakes.clore import KEY, FakeClore, Recorded
from fakes.vast import drive

from broker.clock import FakeClock
from broker.config import parse_config
from broker.providers import Offer, create_provider
from broker.providers.clore import CloreMarket

H = timedelta(hours=1)
Wire = tuple[str, str, str | None, str | None, Any, tuple[str, ...]]


def sdk_request(method: str, endpoint: str, data: dict[str, Any] | None = None) -> Wire:
    """The request `AsyncCloreAI._request(method, endpoint, data)` sends (clore-ai 0.1.1):
    `url = f"{base_url}/{endpoint}"`; `headers = {"auth": api_key}`; a GET goes without a
    body, except `server_config` with data (`client.request("GET", ..., json=data)`); any
    other method is `client.post(url, json=data)`. httpx's `json=` sets Content-Type."""
    with_body = method != "GET" or (endpoint == "server_config" and data)
    body = data if with_body else None
    return (
        "GET" if method == "GET" else "POST",
        f"/v1/{endpoint}",
        KEY,
        "application/json" if with_body else None,
        body,
        tuple(body) if isinstance(body, dict) else (),
    )


def settings(availability: bool, mrl: int) -> dict[str, Any]:
    """`set_server_settings(name, availability, mrl, on_demand, spot)`'s `data`, built in
    the SDK's order: name, then each argument that is not None."""
    return {"name": "rig", "availability": availability, "mrl": mrl,
            "on_demand": 0.0002, "spot": 0.0001}  # fmt: skip


# Every call the adapter makes, as the SDK would make it.
EXPECTED = [
    sdk_request("GET", "my_servers"),  # probe
    sdk_request("GET", "server_config", {"server_name": "rig"}),  # probe, status
    sdk_request("POST", "set_server_settings", settings(True, 8)),  # list
    sdk_request("GET", "server_config", {"server_name": "rig"}),  # its read-back
    sdk_request("POST", "set_server_settings", settings(False, 8)),  # unlist
    sdk_request("GET", "server_config", {"server_name": "rig"}),  # its read-back
    sdk_request("GET", "wallets"),  # earnings
]


def wire(request: Recorded) -> Wire:
    body = request.body
    keys = tuple(body) if isinstance(body, dict) else ()
    ctype = request.content_type if request.raw_body else None
    return (request.method, request.path, request.auth, ctype, body, keys)


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeClore]:
    # No rate limit: the SDK paces itself on real time, the fake on the fake clock.
    server = FakeClore(clock, servers={"rig": 2}, rate_limit=0)
    await server.start()
    yield server
    await server.close()


async def adapter_calls(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> list[Wire]:
    monkeypatch.setenv("CONFORMANCE_CLORE_KEY", KEY)
    config = parse_config({
        "provider": {"kind": "clore", "server_name": "rig", "base_url": fake.url,
                     "api_key_env": "CONFORMANCE_CLORE_KEY", "price_on_demand": 0.0002,
                     "price_spot": 0.0001, "earnings_rate": 1.0},
        "policy": {"max_commitment": "8h", "min_listed": "6h"},
    })  # fmt: skip
    provider = create_provider(config, clock, gpu_count=2)
    assert isinstance(provider, CloreMarket)
    async with provider:
        await drive(clock, provider.probe())
        await drive(clock, provider.list(Offer(price_gpu=1.0, end_date=clock.now() + 8 * H)))
        await drive(clock, provider.unlist(urgent=True))
        day = clock.now().date()
        await drive(clock, provider.earnings(day, day))
    return [wire(r) for r in fake.requests]


async def test_the_adapter_sends_what_the_sdk_source_builds(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await adapter_calls(clock, fake, monkeypatch) == EXPECTED


async def test_the_real_sdk_sends_the_same_as_the_adapter(
    clock: FakeClock, fake: FakeClore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clore_ai = pytest.importorskip("clore_ai", reason="clore-ai is not installed")
    ours = await adapter_calls(clock, fake, monkeypatch)
    fake.requests.clear()
    sdk = clore_ai.AsyncCloreAI(api_key=KEY, base_url=fake.url, max_retries=0)
    try:
        await sdk.my_servers()
        await sdk.server_config("rig")
        for availability in (True, False):
            await sdk.set_server_settings(
                "rig", availability=availability, mrl=8, on_demand=0.0002, spot=0.0001
            )
            await sdk.server_config("rig")
        await sdk.wallets()
    finally:
        await sdk.close()
    assert [wire(r) for r in fake.requests] == ours
