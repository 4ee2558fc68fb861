"""At start: converge with what the previous run left in the journal.

Close what a crash cut off, restore a pause, remember stopped services, keep or end a
self-rental, and say whether a drain must be redone. The provider's real state is read by
the first step: a listing found there that this broker cannot account for is withdrawn by
the machine, a rental is respected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.clock import Clock
from broker.ledger.base import Ledger
from broker.scheduling.actions import Actions
from broker.scheduling.pool import PoolMachine

log = logging.getLogger(__name__)

# Journal kinds that are external actions; an `intent` of one of these found at start was
# interrupted by a crash.
ACTIONS = ("drain", "resume_services", "list", "unlist", "displace", "end_displacement")


@dataclass(frozen=True)
class Reconciled:
    """What `reconcile()` found in the journal."""

    interrupted: tuple[str, ...]  # kinds of actions a crash cut off
    paused: bool
    services_stopped: bool
    redo_drain: bool


async def reconcile(
    ledger: Ledger, clock: Clock, machine: PoolMachine, actions: Actions
) -> Reconciled:
    """Read the journal back into `machine` (listings of the last day, stopped services,
    a self-rental); returns what it found. The caller redoes the drain and restores the
    pause."""
    now = clock.now()
    entries = await ledger.journal_entries(
        since=now - timedelta(days=30),
        kinds=[*ACTIONS, "pause", "resume"],
    )
    interrupted: list[str] = []
    for entry in entries:
        if entry.status == "intent" and entry.id is not None:
            interrupted.append(entry.kind)
            await ledger.complete(
                entry.id, "failed", now, "interrupted: the broker stopped before it finished"
            )
    paused = False
    services_stopped = False
    redo_drain = False
    day_ago = now - timedelta(days=1)
    for entry in entries:
        if entry.kind in ("pause", "resume"):
            paused = entry.kind == "pause"
        elif entry.kind == "drain":
            services_stopped = True
            redo_drain = entry.status == "intent"
        elif entry.kind == "resume_services":
            services_stopped = entry.status == "intent"  # an unfinished resume: redo it
            redo_drain = False
        elif entry.kind in ("list", "unlist"):
            redo_drain = False
        first_listing = entry.kind == "list" and not entry.payload.get("renewal")
        if first_listing and entry.status == "done" and entry.at >= day_ago:
            ago = (now - entry.at).total_seconds()
            machine.listings.append(clock.monotonic() - ago)
    machine.services_stopped = services_stopped
    # A self-rental that displaced interruptible renters outlives a crash: keep it while
    # the contracts it displaced still run (they would resume on the team's GPUs), end
    # it once they are over (the provider finds it by its label).
    ends = [e for e in entries if e.kind in ("displace", "end_displacement")]
    if ends and not (ends[-1].kind == "end_displacement" and ends[-1].status == "done"):
        until_text = next(
            (e.payload.get("until") for e in reversed(ends) if e.kind == "displace"), None
        )
        until = datetime.fromisoformat(until_text) if isinstance(until_text, str) else None
        if until is not None and until > now:
            machine.displaced_until = until
            log.info("the self-rental keeps displaced renters off until %s", until_text)
        else:
            log.info("ending a displacement the previous run left")
            await actions.end_displacement("left by the previous run")
    if interrupted:
        log.warning(
            "the previous run stopped in the middle of: %s; reconciling with the provider",
            ", ".join(interrupted),
        )
    return Reconciled(tuple(interrupted), paused, services_stopped, redo_drain)
