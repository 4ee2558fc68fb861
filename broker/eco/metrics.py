"""The eco gauges of `/metrics`, per GPU: P-state, power limit, idle draw.

Read at scrape time from what the broker already holds (the sampler's latest snapshot and
devices, the idle history of this run): a scrape never calls NVML nor reads the ledger.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from broker.gpu.base import Snapshot
from broker.scheduling.status import StatusSource


def eco_metrics(daemon: StatusSource, snap: Snapshot | None) -> Iterator[Metric]:
    labels = ["gpu", "uuid"]
    pstate = GaugeMetricFamily(
        "gpu_broker_gpu_pstate", "Performance state, 0 (full speed) to 15 (lowest)", labels=labels
    )
    limit = GaugeMetricFamily(
        "gpu_broker_gpu_power_limit_watts", "Power limit the card runs under", labels=labels
    )
    default = GaugeMetricFamily(
        "gpu_broker_gpu_power_default_limit_watts", "The card's default power limit",
        labels=labels,
    )  # fmt: skip
    idle = GaugeMetricFamily(
        "gpu_broker_gpu_idle_watts",
        "Median draw of the card's idle samples over this run's last 24 h",
        labels=labels,
    )
    history = daemon.idle_history
    for device in daemon.scheduler.sampler.devices:
        key = [str(device.index), device.uuid]
        sample = snap.gpu(device.index) if snap is not None else None
        # Unknown is left out (no series), never reported as 0.
        if sample is not None and sample.pstate is not None:
            pstate.add_metric(key, sample.pstate)
        if device.power_limit_w is not None:
            limit.add_metric(key, device.power_limit_w)
        if device.power_default_w is not None:
            default.add_metric(key, device.power_default_w)
        median = history.recent(device.index).median_watts if history is not None else None
        if median is not None:
            idle.add_metric(key, median)
    yield from (pstate, limit, default, idle)
