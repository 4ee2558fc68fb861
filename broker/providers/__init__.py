"""Marketplace adapters: one module per marketplace, one interface (`base.Provider`).

The marketplaces are listed in `registry.py`; see there for how to add one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from broker.providers.sections import ProviderContext

if TYPE_CHECKING:
    # Not at run time: broker.config imports this package (through the registry).
    from broker.clock import Clock
    from broker.config import Config

__all__ = [
    "Capabilities",
    "ListResult",
    "Occupancy",
    "Offer",
    "Provider",
    "ProviderContext",
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
    context = ProviderContext(
        energy_currency=config.energy.currency,
        gpu_count=gpu_count or len(config.gpus.fake) or 1,
        retry_attempts=retry_attempts,
        max_commitment=config.policy.max_commitment,
        min_listed=config.policy.min_listed,
    )
    return config.provider.create(clock, context)
