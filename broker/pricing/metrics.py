"""The market watcher's figures as Prometheus gauges (unknown ones are left out, never 0)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from broker.pricing.watch import PricingStatus


def pricing_metrics(status: PricingStatus) -> Iterator[Metric]:
    figures = [
        ("gpu_broker_price_ask_usd", "The ask listings carry, USD per GPU-hour", status.ask),
        ("gpu_broker_price_floor_usd", "The lowest ask, USD per GPU-hour", status.floor),
        (
            "gpu_broker_price_market_median_usd",
            "The market median in host terms, USD per GPU-hour",
            status.market_median,
        ),
        ("gpu_broker_price_rank", "Our ask's place among the peers, cheapest 1", status.rank),
        ("gpu_broker_price_peers", "Comparable rentable offers in the last search", status.peers),
        (
            "gpu_broker_price_searched_timestamp_seconds",
            "When the market was last read",
            status.searched_at.timestamp() if status.searched_at else None,
        ),
    ]
    for name, text, value in figures:
        if value is not None:
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], float(value))
            yield gauge
    below = GaugeMetricFamily(
        "gpu_broker_price_market_below_floor", "1 while the market median is below the floor"
    )
    below.add_metric([], 1.0 if status.below_floor else 0.0)
    yield below
