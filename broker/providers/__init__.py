"""Marketplace adapters: one module per marketplace, one interface (`base.Provider`)."""

from __future__ import annotations

from broker.clock import Clock
from broker.config import Config, PaperProvider, RunpodProvider, VastProvider
from broker.providers.base import (
    Capabilities,
    ListResult,
    Occupancy,
    Offer,
    Provider,
    ProviderStatus,
    RentalKind,
    Rentals,
    RenterGpus,
    auto_min_bid,
)

__all__ = [
    "Capabilities",
    "ListResult",
    "Occupancy",
    "Offer",
    "Provider",
    "ProviderStatus",
    "RentalKind",
    "Rentals",
    "RenterGpus",
    "auto_min_bid",
    "create_provider",
]


def create_provider(
    config: Config,
    clock: Clock,
    *,
    gpu_count: int | None = None,
    retry_attempts: int | None = None,
) -> Provider:
    """The provider `config.provider` names, not yet started (use `async with`).

    `gpu_count` sizes the paper market (default: the configured fake GPUs);
    `retry_attempts` overrides the configured count (`check` wants an answer soon).
    Reading the API key may raise `SecretError`.
    """
    section = config.provider
    if isinstance(section, VastProvider):
        from broker.providers.docker import DockerRenters
        from broker.providers.vast import VastMarket

        docker = DockerRenters(section.docker_socket) if section.docker_socket else None
        return VastMarket(
            section,
            clock,
            docker=docker,
            energy_currency=config.energy.currency,
            retry_attempts=retry_attempts,
        )
    if isinstance(section, RunpodProvider):
        from broker.providers.runpod import RunpodMarket

        return RunpodMarket(section, clock, retry_attempts=retry_attempts)
    assert isinstance(section, PaperProvider)
    from broker.providers.paper import PaperMarket

    return PaperMarket(section, clock, gpu_count=gpu_count or len(config.gpus.fake) or 1)
