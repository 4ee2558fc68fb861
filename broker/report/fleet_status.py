"""Every host's last known state in a shared ledger, from the ledger alone (no host is
asked): what `gpu-broker status --fleet` prints and the dashboard's fleet table shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from broker.config import Config
from broker.ledger.base import Ledger, host_view
from broker.report.fleet import build_fleet_report

# A host not heard from for this long is shown as silent.
SILENT_AFTER = timedelta(minutes=5)


@dataclass(frozen=True)
class HostStatus:
    host: str
    state: str  # the pool's state in force, or the last one ("" if none)
    since: datetime | None
    gpus: int  # GPUs with a state in force
    last_seen: datetime | None  # the newest row the host wrote
    earned: float  # today, local time
    energy_cost: float
    net: float

    def silent(self, now: datetime) -> bool:
        return self.last_seen is None or now - self.last_seen > SILENT_AFTER

    def to_json(self, now: datetime | None = None) -> dict[str, Any]:
        """With `now`, also whether the host is silent then."""
        return {
            "host": self.host,
            "state": self.state,
            "since": self.since.isoformat() if self.since else None,
            "gpus": self.gpus,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "earned_today": round(self.earned, 6),
            "energy_cost_today": round(self.energy_cost, 6),
            "net_today": round(self.net, 6),
        } | ({} if now is None else {"silent": self.silent(now)})


async def fleet_status(ledger: Ledger, config: Config, now: datetime) -> list[HostStatus]:
    """Every host's last known state, from the ledger alone (no host is asked)."""
    tz = config.broker.tz
    midnight = datetime.combine(now.astimezone(tz).date(), time(0), tzinfo=tz)
    hosts = await ledger.hosts()
    # Today's figures for every host at once (the fleet report's batched reads).
    today = (
        (await build_fleet_report(ledger, hosts, config, since=midnight, until=now, now=now)).hosts
        if hosts and now > midnight
        else {}
    )
    out: list[HostStatus] = []
    for host in hosts:
        async with host_view(ledger, host) as view:
            # a year back is as far as a silent host's last state is looked for
            far = now - timedelta(days=366)
            pool = await view.state_intervals(far, now + timedelta(seconds=1), scope="pool")
            gpus = await view.state_intervals(now, now + timedelta(seconds=1), scope="gpu")
            recent = await view.energy(now - timedelta(days=1), now + timedelta(seconds=1))
            last = pool[-1] if pool else None
            seen = [t for t in (
                last.end or last.start if last else None,
                recent[-1].end if recent else None,
            ) if t is not None]  # fmt: skip
        day = today.get(host)
        out.append(
            HostStatus(
                host=host,
                state=last.state if last else "",
                since=last.start if last else None,
                gpus=sum(1 for g in gpus if g.end is None),
                last_seen=max(seen) if seen else None,
                earned=day.totals.earnings if day else 0.0,
                energy_cost=day.totals.energy_cost if day else 0.0,
                net=day.totals.net if day else 0.0,
            )
        )
    return out


