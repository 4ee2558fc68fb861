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


class LedgerError(BrokerError):
    """The ledger cannot be opened, migrated or written."""


class LedgerVersionError(LedgerError):
    """The ledger was written by a newer gpu-broker than this one."""
