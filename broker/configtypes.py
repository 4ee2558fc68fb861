"""Building blocks of the configuration models, shared by `broker.config` and the
marketplace modules (`broker.providers.*`), which define their own `[provider]` sections.

They live here rather than in `broker.config` so a marketplace module can build its section
without importing `broker.config`, which imports every marketplace through the registry.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from broker.errors import SecretError
from broker.units import parse_duration


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("expected a duration longer than zero")
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
PositiveDuration = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_positive)]


class StrictModel(BaseModel):
    """Every section: unknown keys are errors (a typo must not be a silent default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(StrictModel):
    """Mixin for sections that take one secret as `<name>_env` or `<name>_file`."""

    @staticmethod
    def _read_secret(key: str, env: str | None, file: Path | None) -> str | None:
        if env:
            value = os.environ.get(env)
            if not value:
                raise SecretError(f"{key}_env", f"environment variable {env} is not set")
            return value.strip()
        if file:
            try:
                value = file.expanduser().read_text().strip()
            except OSError as err:
                raise SecretError(f"{key}_file", f"cannot read {file}: {err.strerror}") from None
            if not value:
                raise SecretError(f"{key}_file", f"{file} is empty")
            return value
        return None
