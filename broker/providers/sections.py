"""What every marketplace's `[provider]` section shares, and what the rest of the broker may
ask of one without knowing which marketplace it is.

Each marketplace module (`vast`, `runpod`, `paper`) defines its section on these bases and
the registry (`broker.providers.registry`) lists them; `broker.config` builds the
`provider` key's discriminated union from that list. This module must stay light and must
not import `broker.config` (which imports it).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from broker.configtypes import PositiveDuration, SecretRef, StrictModel

if TYPE_CHECKING:
    from broker.clock import Clock
    from broker.providers.base import Provider


@dataclass(frozen=True)
class ProviderContext:
    """What an adapter needs from the rest of the configuration and from the caller."""

    energy_currency: str = "USD"
    gpu_count: int = 1  # the machine's GPUs (the paper market simulates that many)
    # Overrides the section's retry count (`check` wants an answer soon); None = configured.
    retry_attempts: int | None = None
    # policy.max_commitment: a marketplace whose shortest rental is longer cannot keep the
    # promise and does not list (Clore.ai); None = not known (nothing is refused for it).
    max_commitment: timedelta | None = None
    # policy.min_listed: the shortest offer the scheduler will put up; None = not known.
    min_listed: timedelta | None = None


class PolledProvider(StrictModel, abc.ABC):
    """The base of every marketplace section."""

    # How often the marketplace is read while an offer or a renter may exist (six times
    # as long otherwise): how soon a new rental or a contract's end is seen.
    poll_interval: PositiveDuration = timedelta(seconds=10)

    if TYPE_CHECKING:
        # Every section declares these as fields: `kind` as its Literal tag, and
        # `usd_per_currency` (USD for one unit of energy.currency; the report converts).
        kind: str
        usd_per_currency: float

    # Whether `gpu-broker check` asks the platform itself (`Provider.probe`) after `check()`.
    probes_platform: ClassVar[bool] = True

    @abc.abstractmethod
    def create(self, clock: Clock, context: ProviderContext) -> Provider:
        """The adapter for this section, not yet started (use `async with`). Reading the
        API key may raise `SecretError`."""

    def check(self) -> list[str]:
        """What `check` can say without asking the platform, one line each; raises
        `ConfigError` for a problem (a key that cannot be read)."""
        return []

    def estimate_price_gpu(self) -> float | None:
        """USD per rented GPU-hour for the report's estimate; None when the broker does
        not know the price (it is set elsewhere, as in RunPod's dashboard)."""
        return None


class ProviderKey(SecretRef, PolledProvider):
    """A provider section whose API key comes from `api_key_env` or `api_key_file`."""

    api_key_env: str | None = None
    api_key_file: Path | None = None

    def api_key(self) -> str | None:
        if self.api_key_file is not None:
            return self._read_secret("provider.api_key", None, self.api_key_file)
        return self._read_secret("provider.api_key", self.api_key_env, None)

    def key_source(self) -> str:
        """Where the key came from, for an error a user can act on. Never the key itself."""
        if self.api_key_file is not None:
            return f"the file {self.api_key_file} (provider.api_key_file)"
        return f"the environment variable {self.api_key_env} (provider.api_key_env)"

    def check(self) -> list[str]:
        self.api_key()
        return ["API key is set"]
