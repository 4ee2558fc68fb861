"""Whose is the GPU activity: a renter's, or the team's? Pure, like the pool machine.

A renter's container may load the GPUs before the marketplace shows its rental (the next
provider read can be seconds away), and its load can linger after the rental ends (the idle
debounce). Neither is local use. The scheduler feeds each step:

- which pool GPUs are busy (the idle detector; None when telemetry cannot tell),
- which GPUs renters hold now: renter containers in Docker's view, GPUs the provider shows
  occupied (all of them when it shows a rental but not where),
- how many provider reads had *started* so far, and which of them the current view is.

A GPU a renter was seen holding stays the renter's until it is seen idle, so leftover load
after the rental is not taken for local use. Busy GPUs nobody holds are "unexplained" from
the step they were first seen; that activity is local only once a provider read started
after it still shows no renter (`view_after_activity`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Activity:
    busy_is_renters: bool  # some GPU busy, and every busy GPU is a renter's
    unexplained: frozenset[int]  # busy GPUs no renter holds
    view_after_activity: bool  # the provider view was read after the unexplained began


@dataclass
class Attribution:
    renters_own: set[int] = field(default_factory=set)  # renter's until seen idle
    unexplained_read: int | None = None  # reads started when the unexplained activity began

    def update(
        self,
        busy: Mapping[int, bool] | None,
        renter_now: Collection[int],
        *,
        reads_started: int,
        view_read: int,
    ) -> Activity:
        """`reads_started`: provider reads begun so far; `view_read`: the number (1-based,
        in start order) of the read the current view came from (0: none)."""
        if busy is None:
            # Telemetry cannot tell: keep what is known; the machine treats it as unknown.
            fresh = self.unexplained_read is None or view_read > self.unexplained_read
            return Activity(False, frozenset(), fresh)
        for index, is_busy in busy.items():
            if index in renter_now and is_busy:
                self.renters_own.add(index)
            elif not is_busy:
                self.renters_own.discard(index)
        unexplained = frozenset(i for i, b in busy.items() if b and i not in self.renters_own)
        if not unexplained:
            self.unexplained_read = None
        elif self.unexplained_read is None:
            self.unexplained_read = reads_started
        any_busy = any(busy.values())
        fresh = self.unexplained_read is None or view_read > self.unexplained_read
        return Activity(any_busy and not unexplained, unexplained, fresh)
