"""`--policy pricing.KEY=VALUE`: a variant of `[provider.pricing]` for `simulate`, checked
like the config file (the rest of an assignment list is the policy's, variants.py)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from broker.config import Config, describe_problems
from broker.errors import ConfigError
from broker.pricing.settings import PricingSection
from broker.providers.paper import PaperProvider
from broker.providers.vast import VastProvider
from broker.simulation.variants import _value

PREFIX = "pricing."


def configured_pricing(config: Config) -> PricingSection | None:
    """The configured ask's settings when the configured price follows the market."""
    provider = config.provider
    if isinstance(provider, VastProvider | PaperProvider) and provider.market_priced:
        return provider.pricing
    return None


def split(assignments: list[str]) -> tuple[list[str], list[str]]:
    """(policy assignments, pricing assignments)."""
    policy = [a for a in assignments if not a.strip().startswith(PREFIX)]
    return policy, [a for a in assignments if a.strip().startswith(PREFIX)]


def pricing_variant(base: PricingSection | None, assignments: list[str]) -> PricingSection:
    changes: dict[str, Any] = {}
    for item in assignments:
        key, _, text = item.partition("=")
        changes[key.strip().removeprefix(PREFIX)] = _value(text.strip())
    data = (base or PricingSection()).model_dump() | changes
    try:
        return PricingSection.model_validate(data)
    except ValidationError as err:
        errors: list[ErrorDetails] = []
        for e in err.errors():
            e["loc"] = ("provider", "pricing", *e["loc"])
            errors.append(e)
        shown = {"provider": {"pricing": data}}
        raise ConfigError(describe_problems(errors, shown), source="--policy") from None
