"""`gpu-broker sizing` as Rich tables and a ready-to-paste `[[windows]]` block."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from broker.sizing.build import Sizing
from broker.sizing.week import WEEKDAYS

_SHADES = " ░▒▓█"


def _shade(value: float, top: float) -> str:
    if value <= 0 or top <= 0:
        return "·"
    return _SHADES[max(1, min(4, round(4 * value / top)))]


def week_strip(values: list[float], title: str) -> Table:
    """Seven lines of 24 cells, darker for more; the hours run left to right."""
    top = max(values, default=0.0)
    table = Table(title=title, show_header=True, box=None, pad_edge=False)
    table.add_column("")
    table.add_column("0     6     12    18   23", no_wrap=True)
    for day, name in enumerate(WEEKDAYS):
        row = values[day * 24 : (day + 1) * 24]
        table.add_row(name, "".join(_shade(v, top) for v in row))
    return table


def windows_block(s: Sizing) -> str:
    lines = [f"# suggested by gpu-broker sizing ({s.timezone}): {len(s.suggested_hours)} h a week"]
    for w in s.suggested:
        lines += ["[[windows]]", f'cron = "{w.cron}"', f'duration = "{w.duration}"']
    return "\n".join(lines)


def to_renderable(s: Sizing) -> RenderableType:
    tz = ZoneInfo(s.timezone)
    weeks = (s.end - s.start).total_seconds() / (7 * 86400)
    span = f"{s.start.astimezone(tz):%Y-%m-%d %H:%M} to {s.end.astimezone(tz):%Y-%m-%d %H:%M}"
    parts: list[RenderableType] = []
    services = Table(title=f"Local demand, {span} ({s.timezone}, {weeks:.1f} weeks)")
    for name in ("service", "GPUs", "requests", "busy GPUs p50/p95/peak", "held", "refused",
                 "wait p95/max", "reloads/day", "needs GPUs"):  # fmt: skip
        services.add_column(name, justify="left" if name == "service" else "right")
    for x in s.services:
        u = x.usage
        services.add_row(
            u.name, ",".join(map(str, x.gpus)) or "-", str(u.requests),
            f"{u.busy.p50:g}/{u.busy.p95:g}/{u.busy.peak}", str(u.waits.held),
            str(u.waits.refused), f"{u.waits.p95_s:.0f}s/{u.waits.max_s:.0f}s",
            f"{x.reloads_per_day:.1f}", str(x.needs_gpus),
        )  # fmt: skip
    parts.append(services)
    gpus = Table(title="Per GPU (hours a week)")
    for name in ("GPU", "services", "reloads/day", "used", "rentable", "outside windows now"):
        gpus.add_column(name, justify="left" if name == "services" else "right")
    for g in s.gpus:
        gpus.add_row(
            str(g.index), ", ".join(g.services) or "-", f"{g.reloads_per_day:.1f}",
            str(g.used_hours_per_week), str(g.rentable_hours_per_week),
            str(g.extra_rentable_hours_per_week),
        )  # fmt: skip
    parts.append(gpus)
    parts.append(week_strip(s.local_use, "Local use: share of weeks with use, per hour"))
    parts.append(Text(verdict_text(s)))
    parts.append(Text(windows_block(s)))
    return Group(*parts)


def verdict_text(s: Sizing) -> str:
    lines: list[str] = []
    rule = (
        f"; rule of thumb for a team of {s.team_size}: {s.rule_of_thumb}"
        if s.rule_of_thumb is not None
        else f"; a team of {s.team_size} is beyond the rule of thumb (50 users, 4 GPUs)"
        if s.team_size is not None
        else " (set broker.team_size for the rule of thumb beside it)"
    )
    lines.append(
        f"Verdict: the measured demand needs {s.gpus_needed} GPU(s), "
        f"{s.gpus_present} present{rule}."
    )
    for shared in s.shared:
        lines.append(
            f"GPU {shared.index} is shared by {', '.join(shared.services)}: "
            f"{shared.reloads_per_day:.1f} model reloads a day, both in use in "
            f"{shared.overlap_hours_per_week} hours of the week."
        )
    for own in s.own_gpu:
        lines.append(f"Give {own.service} its own GPU: {own.reason}.")
    if s.unseen_hours:
        lines.append(
            f"{s.unseen_hours} hours of the week are not in the record yet and count as used."
        )
    rarely = (
        f"used in at most {s.max_use_share:.0%} of the weeks" if s.max_use_share else "never used"
    )
    lines.append(
        f"{rarely.capitalize()}: {len(s.suggested_hours)} h a week, {s.extra_rentable_hours} h "
        f"of them outside the configured windows ({len(s.configured_hours)} h a week, "
        f"{s.configured_hours_used} h of them with local use). Windows over them:"
    )
    return "\n".join(lines)
