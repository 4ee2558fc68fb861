"""The marketplaces gpu-broker knows: the one place a new one is added.

Adding a marketplace is one module beside this one (its section on
`sections.ProviderKey` or `sections.PolledProvider`, its `Provider` adapter, its `probe`),
its fake under `tests/fakes/`, one entry in `MARKETPLACES` below, and one harness in
`tests/test_provider_contract.py`. `broker.config` builds the `[provider]` section from this
list; `create_provider` and `check` ask the section itself, never its class.
"""

from __future__ import annotations

from typing import Annotated, Any, get_args

from pydantic import Field

from broker.providers.clore import CloreProvider
from broker.providers.paper import PaperProvider
from broker.providers.runpod import RunpodProvider
from broker.providers.sections import PolledProvider
from broker.providers.vast import VastProvider

# In the order `kind` errors list them ("expected kind to be one of 'vast', ...").
MARKETPLACES: tuple[type[PolledProvider], ...] = (
    VastProvider, RunpodProvider, CloreProvider, PaperProvider
)  # fmt: skip


def kind_of(section: type[PolledProvider]) -> str:
    """The `kind` tag a section class answers to (its `kind: Literal[...]` field)."""
    (tag,) = get_args(section.model_fields["kind"].annotation)
    return str(tag)


SECTIONS: dict[str, type[PolledProvider]] = {kind_of(s): s for s in MARKETPLACES}


def section_union() -> Any:
    """The `[provider]` annotation: one of the sections, chosen by `kind`."""
    if len(MARKETPLACES) == 1:
        return MARKETPLACES[0]
    # A runtime Union over the registered classes (the static type is PolledProvider).
    union: Any = MARKETPLACES[0]
    for section in MARKETPLACES[1:]:
        union = union | section
    return Annotated[union, Field(discriminator="kind")]


def section_for(kind: str) -> type[PolledProvider] | None:
    return SECTIONS.get(kind)
