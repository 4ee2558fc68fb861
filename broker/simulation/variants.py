"""`--policy KEY=VALUE`: a variant of the configured policy, checked like the config file."""

from __future__ import annotations

import tomllib
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from broker.config import PolicySection, describe_problems
from broker.errors import ConfigError


def _value(text: str) -> Any:
    """A TOML value where it reads as one (8, 0.5, true, "15m"), else the bare text (15m)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def variant(base: PolicySection, assignments: list[str]) -> PolicySection:
    """`base` with each `key=value` applied; a ConfigError names `policy.key` otherwise."""
    changes: dict[str, Any] = {}
    problems: list[str] = []
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("policy.")
        if not sep or not key:
            problems.append(f"--policy {item!r}: expected KEY=VALUE, e.g. idle_window=5m")
            continue
        changes[key] = _value(text.strip())
    if problems:
        raise ConfigError(problems, source="--policy")
    data = base.model_dump(exclude_unset=False) | changes
    try:
        return PolicySection.model_validate(data)
    except ValidationError as err:
        shown = {"policy": data}
        errors: list[ErrorDetails] = []
        for e in err.errors():
            e["loc"] = ("policy", *e["loc"])
            errors.append(e)
        raise ConfigError(describe_problems(errors, shown), source="--policy") from None


def label(assignments: list[str]) -> str:
    return ",".join(a.strip().removeprefix("policy.") for a in assignments)
