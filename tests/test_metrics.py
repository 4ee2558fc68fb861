"""`GET /metrics` and the dashboard's JSON routes, on a whole broker in virtual time (the
Rig): what the scrape says must be what happened."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from fakes.rig import Rig, RigFactory, chat, listed
from fakes.vast import FakeVast
from prometheus_client.parser import text_string_to_metric_families

from broker.clock import FakeClock
from broker.metrics import EARNINGS_REFRESH
from broker.providers import RentalKind
from broker.scheduling.pool import PoolState

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(rig: Rig) -> tuple[Samples, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(rig.api_url + "/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def get_json(rig: Rig, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(rig.api_url + path) as response:
        return response.status, await response.json()


async def test_metrics_after_a_listing_a_rental_and_a_reclaim(
    make_rig: RigFactory, clock: FakeClock, fake_vast: FakeVast
) -> None:
    rig = await make_rig(windows=[{"cron": "0 12 * * *", "duration": "30m"}])
    before, _ = await scrape(rig)
    assert value(before, "gpu_broker_pool_state", pool="machine", state="LOCAL") == 1
    assert value(before, "gpu_broker_listings_total") == 0

    await listed(rig)
    fake_vast.add_rental(RentalKind.ON_DEMAND, gpus=2)
    await rig.until_state(PoolState.RENTED, limit=60)
    during, _ = await scrape(rig)
    assert value(during, "gpu_broker_pool_state", pool="machine", state="RENTED") == 1
    assert value(during, "gpu_broker_pool_state", pool="machine", state="LOCAL") == 0
    assert value(during, "gpu_broker_provider_rentals_running") == 1
    assert value(during, "gpu_broker_gate_guarded", service="ollama") == 1

    # A chat 15 s before the contract ends (with the window, at 12:30): held, the offer
    # withdrawn; then the contract ends and the chat is served.
    await rig.until(lambda: clock.now().isoformat() >= "2026-11-25T12:29:45", step=5)
    request = asyncio.create_task(chat(rig))
    await rig.until(lambda: not rig.offer.listed, limit=5, step=0.01)
    held, _ = await scrape(rig)
    assert value(held, "gpu_broker_gate_held", service="ollama") == 1
    await rig.until(request.done, limit=40)
    request.result()
    assert rig.state is PoolState.LOCAL

    after, text = await scrape(rig)
    assert value(after, "gpu_broker_listings_total") == 1
    assert value(after, "gpu_broker_unlists_total") == 1
    assert value(after, "gpu_broker_rentals_total") == 1
    assert value(after, "gpu_broker_pool_state", pool="machine", state="LOCAL") == 1
    assert sum(v for (name, _), v in after.items() if name == "gpu_broker_pool_state") == 1
    phase = "arrival_to_unlist"
    assert value(after, "gpu_broker_reclaim_latency_seconds_count", phase=phase) == 1
    assert value(after, "gpu_broker_reclaim_latency_seconds_count", phase="free_to_release") == 1
    assert value(after, "gpu_broker_gate_held", service="ollama") == 0
    assert value(after, "gpu_broker_gate_in_flight", service="ollama") == 0
    assert value(after, "gpu_broker_gate_held_requests_total", service="ollama") == 1
    assert value(after, "gpu_broker_gate_rejected_requests_total", service="ollama") == 0
    # Per GPU, labelled by index and UUID; the energy counter is the accountant's total.
    energy = rig.daemon.scheduler.energy
    for index, uuid in ((0, "GPU-rig-0"), (1, "GPU-rig-1")):
        key = {"gpu": str(index), "uuid": uuid}
        joules = value(after, "gpu_broker_gpu_energy_joules_total", **key)
        assert joules > 0
        assert joules == energy.total_joules(uuid)
        assert value(after, "gpu_broker_gpu_overhead_energy_joules_total", **key) > 0
        assert value(after, "gpu_broker_gpu_power_watts", **key) >= 0
        assert 0 <= value(after, "gpu_broker_gpu_utilization_ratio", **key) <= 1
        assert value(after, "gpu_broker_gpu_memory_used_bytes", **key) >= 0
        assert value(after, "gpu_broker_gpu_lost", **key) == 0
    assert "# TYPE gpu_broker_gpu_energy_joules_total counter" in text
    assert "# TYPE gpu_broker_reclaim_latency_seconds histogram" in text


async def test_a_scrape_never_reads_the_gpus(make_rig: RigFactory) -> None:
    rig = await make_rig()
    backend = rig.daemon.scheduler.sampler.backend
    calls = 0
    original = backend.sample

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await original(*args, **kwargs)

    backend.sample = counting  # type: ignore[method-assign]
    for _ in range(3):
        samples, _ = await scrape(rig)
        assert ("gpu_broker_gpu_power_watts", (("gpu", "0"), ("uuid", "GPU-rig-0"))) in samples
    assert calls == 0


async def test_earnings_counter_reads_the_ledger_at_most_once_a_minute(
    make_rig: RigFactory, clock: FakeClock
) -> None:
    from datetime import UTC, datetime

    from broker.ledger.base import EarningsRecord

    rig = await make_rig(paper=True)
    ledger = rig.daemon.ledger
    assert ledger is not None

    async def add(day: int, amount: float) -> None:
        await ledger.upsert_earnings(
            [
                EarningsRecord(
                    "vast", "4242", datetime(2026, 11, day).date(), amount, "USD", "provider",
                    datetime(2026, 11, 25, tzinfo=UTC),
                )
            ]
        )  # fmt: skip

    await add(24, 3.5)
    samples, _ = await scrape(rig)
    assert value(samples, "gpu_broker_earnings_total", currency="USD") == 3.5
    await add(25, 1.25)
    samples, _ = await scrape(rig)
    assert value(samples, "gpu_broker_earnings_total", currency="USD") == 3.5  # cached
    await clock.advance(EARNINGS_REFRESH)
    samples, _ = await scrape(rig)
    assert value(samples, "gpu_broker_earnings_total", currency="USD") == 4.75


async def test_timeline_and_report_routes(make_rig: RigFactory) -> None:
    rig = await make_rig()
    await listed(rig)
    status, timeline = await get_json(rig, "/api/timeline?hours=6")
    assert status == 200
    assert [i["state"] for i in timeline["pool"]["intervals"]] == [
        "LOCAL", "IDLE", "DRAINING", "LISTED",
    ]  # fmt: skip
    assert timeline["pool"]["intervals"][-1]["open"] is True
    assert [g["index"] for g in timeline["gpus"]] == [0, 1]
    assert timeline["gpus"][0]["intervals"][-1]["state"] == "LISTED"
    # The ranges follow the data: they begin where the ledger does, not 6 h or 3 days back.
    assert timeline["from"] == timeline["pool"]["intervals"][0]["start"] < timeline["to"]

    status, report = await get_json(rig, "/api/report?days=3")
    assert status == 200
    assert [row["period"] for row in report["rows"]] == ["2026-11-25"]
    assert report["from"] == timeline["from"]
    assert report["currency"] == "USD"
    assert report["rows"][-1]["hours"]["idle"] > 0  # idle_window (2 min) before listing

    for bad in ("/api/report?days=0", "/api/report?days=x", "/api/timeline?hours=99999"):
        status, body = await get_json(rig, bad)
        assert status == 400 and "error" in body


async def test_dashboard_page_is_self_contained(make_rig: RigFactory) -> None:
    rig = await make_rig(paper=True)
    async with aiohttp.ClientSession() as session, session.get(rig.api_url + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        csp = response.headers["Content-Security-Policy"]
        page = await response.text()
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    # everything goes in via textContent / setAttribute
    assert "innerHTML" not in page and "outerHTML" not in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page  # no CDN: the server may be offline
    assert "rig-api-token" not in page
