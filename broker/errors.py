"""One error tree for the whole broker.

Adapters translate their libraries' exceptions into these at their boundary, so callers
catch `BrokerError` (or one branch of it) and never a raw aiohttp or sqlite3 error.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """The configuration cannot be used. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))


class SecretError(ConfigError):
    """A secret named by a `*_env` or `*_file` key cannot be read."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__([f"{key}: {reason}"])


class UsageError(BrokerError):
    """Bad arguments or input files for one command: it says why and exits 2."""


class LedgerError(BrokerError):
    """The ledger cannot be opened, migrated or written."""


class LedgerVersionError(LedgerError):
    """The ledger was written by a newer gpu-broker than this one."""


class ProviderError(BrokerError):
    """A marketplace call failed. The message carries the platform's own words."""


class ProviderUnavailable(ProviderError):
    """Temporary: rate limited (429), a 5xx, a timeout or a refused connection. Retried."""


class ProviderAuthError(ProviderError):
    """The platform refused the credentials (401/403). Never retried."""


class ProviderRejected(ProviderError):
    """The platform refused the request itself (a 4xx other than 429). Never retried."""


class ProviderNotFound(ProviderRejected):
    """404: what was asked for does not exist (an instance already destroyed, say)."""


class ProviderStateMismatch(ProviderError):
    """A write was answered as done but reading the state back shows otherwise."""


class ServiceError(BrokerError):
    """A local inference service could not be reached or did not do what was asked."""


class DrainError(ServiceError):
    """A service could not be drained (models unloaded, VRAM freed) in time."""


class GpuError(BrokerError):
    """The GPU backend failed as a whole (driver gone, worker thread stuck)."""


class GpuSettingError(GpuError):
    """A setting could not be changed on one GPU (an out-of-range value, an unsupported
    feature, a setter that reported success but changed nothing)."""


class GpuPermissionError(GpuSettingError):
    """The driver refuses to change a setting: NVML's setters need root."""
