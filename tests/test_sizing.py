"""`gpu-broker sizing` on a small ledger whose every figure is worked out by hand, and the
pure pieces (hours of the week, free runs, cron fields) on their own."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from broker.cli import main
from broker.clock import FakeClock
from broker.config import load_config
from broker.ledger import DemandRecord, ModelLoad, open_ledger
from broker.sizing.heatmap import local_use_week
from broker.sizing.usage import Busy, ServiceUsage, Waits, busy_per_minute, runs_of
from broker.sizing.verdict import OwnGpu, SharedGpu, own_gpu, rule_of_thumb
from broker.sizing.week import hour_counts, hours_between
from broker.sizing.windows import Run, free_runs, suggest, window_hours

MONDAY = datetime(2026, 11, 2, tzinfo=UTC)  # Monday 00:00 UTC
WEEK = timedelta(days=7)

CONFIG = """
[broker]
state_dir = "{state}"
timezone = "UTC"
team_size = 12

[gpus]
backend = "fake"
fake = [{{ idle_watts = 20, load_watts = 300 }}, {{ idle_watts = 20, load_watts = 300 }}]

[[services]]
name = "ollama"
kind = "ollama"
upstream = "http://127.0.0.1:11435"
gpus = [0]

[[services]]
name = "comfyui"
kind = "comfyui"
upstream = "http://127.0.0.1:8188"
gpus = [0]

[[windows]]
cron = "0 22 * * *"
duration = "9h"

[provider]
kind = "paper"
"""


def at(week: int, day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return MONDAY + week * WEEK + timedelta(days=day, hours=hour, minutes=minute, seconds=second)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))

    async def record() -> None:
        ledger = await open_ledger(load_config(path).broker)
        try:
            await ledger.add_demand(
                [
                    # Week 1, Monday 09:00: two Ollama requests overlap for a minute.
                    DemandRecord("ollama", at(0, 0, 9), 120.0, "passed"),
                    DemandRecord("ollama", at(0, 0, 9, 0, 30), 60.0, "passed"),
                    # Week 2, Monday 09:10: held 10 s, then ran 20 s.
                    DemandRecord("ollama", at(1, 0, 9, 10), 30.0, "held", held_s=10.0),
                    # ComfyUI on the same GPU, week 1: Monday 09:30 for 10 min, and a
                    # refusal on Tuesday 14:00.
                    DemandRecord("comfyui", at(0, 0, 9, 30), 600.0, "passed"),
                    DemandRecord("comfyui", at(0, 1, 14), 0.5, "refused"),
                ]
            )
            await ledger.add_model_loads(
                [ModelLoad("ollama", at(0, 0, 9), "llama3", (0,)),
                 ModelLoad("comfyui", at(0, 0, 9, 30), "sdxl", (0,)),
                 ModelLoad("ollama", at(0, 0, 9, 45), "llama3", (0,)),
                 ModelLoad("comfyui", at(1, 0, 9), "sdxl", (0,))]
            )  # fmt: skip
        finally:
            await ledger.close()

    asyncio.run(record())
    return path


def sizing_json(config_file: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> Any:
    code = main(
        ["sizing", "-c", str(config_file), "--since", "2026-11-02", "--until", "2026-11-15",
         "--json", *extra]
    )  # fmt: skip
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_hand_computed_figures_of_a_two_week_ledger(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    got = sizing_json(config_file, capsys)
    assert (got["from"], got["to"]) == ("2026-11-02T00:00:00+00:00", "2026-11-16T00:00:00+00:00")
    ollama, comfy = got["services"]
    assert (ollama["name"], ollama["gpus"], ollama["requests"]) == ("ollama", [0], 3)
    # Three requests on Monday 09:00 over two Mondays: 1.5 a week in that hour.
    assert ollama["requests_per_hour_of_week"][0][9] == 1.5
    assert sum(map(sum, ollama["requests_per_hour_of_week"])) == 1.5
    # Busy minutes: 09:00 (two at once), 09:01 (two until 09:01:30), and week 2's 09:10.
    assert ollama["busy_gpus"] == {"p50": 2, "p95": 2, "peak": 2}
    assert ollama["busy_minutes"] == 3
    assert ollama["waited"] == {"held": 1, "refused": 0, "p50_s": 10.0, "p95_s": 10.0,
                                "max_s": 10.0, "total_h": 0.003}  # fmt: skip
    assert ollama["model_reloads_per_day"] == round(2 / 14, 3)
    assert ollama["needs_gpus"] == 2
    assert comfy["busy_gpus"] == {"p50": 1, "p95": 1, "peak": 1}
    assert comfy["busy_minutes"] == 10
    assert (comfy["waited"]["held"], comfy["waited"]["refused"]) == (0, 1)
    assert comfy["requests_per_hour_of_week"][1][14] == 0.5
    assert comfy["needs_gpus"] == 1
    # Two services on GPU 0, both in use on Monday 09:00; four loads in 14 days.
    assert got["shared_gpus"] == [{"index": 0, "services": ["comfyui", "ollama"],
                                   "model_reloads_per_day": 0.286,
                                   "overlap_hours_per_week": 1}]  # fmt: skip
    assert [o["service"] for o in got["own_gpu"]] == ["comfyui"]
    assert "shares GPU 0 with ollama" in got["own_gpu"][0]["reason"]
    assert (got["gpus_needed"], got["gpus_present"]) == (3, 2)
    assert (got["team_size"], got["rule_of_thumb_gpus"]) == (12, 3)
    # Used: Monday 09 (hour 9) and Tuesday 14 (hour 38). Free: Monday 10:00 to Tuesday
    # 14:00 (28 h), and Tuesday 15:00 round to Monday 09:00 (138 h).
    assert got["suggested_windows"] == [
        {"cron": "0 10 * * 1", "duration": "1d4h", "hours_per_week": 28},
        {"cron": "0 15 * * 2", "duration": "5d18h", "hours_per_week": 138},
    ]
    assert got["suggested_hours_per_week"] == 166
    # The nightly 22:00-07:00 window (63 h) lies inside the free hours: 103 h more.
    assert (got["configured_hours_per_week"], got["configured_hours_used_by_team"]) == (63, 0)
    assert got["extra_rentable_hours_per_week"] == 103
    assert [(g["index"], g["used_hours_per_week"], g["rentable_hours_per_week"],
             g["extra_rentable_hours_per_week"]) for g in got["gpus"]] == [
        (0, 2, 166, 103), (1, 0, 168, 105)]  # fmt: skip
    assert got["local_use"][0][9] == 1.0 and got["local_use"][1][14] == 0.5
    assert sum(map(sum, got["local_use"])) == 1.5


def test_the_table_shows_the_verdict_and_a_windows_block_ready_to_paste(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sizing", "-c", str(config_file), "--since", "2026-11-02",
                 "--until", "2026-11-15"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "needs 3 GPU(s), 2 present; rule of thumb for a team of 12: 3" in out
    assert "Give comfyui its own GPU" in out
    block = out[out.index("[[windows]]") :]
    assert block.split("\n")[:6] == [
        "[[windows]]", 'cron = "0 10 * * 1"', 'duration = "1d4h"',
        "[[windows]]", 'cron = "0 15 * * 2"', 'duration = "5d18h"',
    ]  # fmt: skip


def test_max_use_share_lets_rarely_used_hours_into_the_windows(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tuesday 14:00 was used in one week of two: at 0.5 it is free; Monday 09:00 never is.
    got = sizing_json(config_file, capsys, "--max-use-share", "0.5")
    assert got["suggested_windows"] == [
        {"cron": "0 10 * * 1", "duration": "6d23h", "hours_per_week": 167}
    ]


def test_usage_errors_and_a_missing_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    assert main(["sizing", "-c", str(path)]) == 1
    assert "no ledger at" in capsys.readouterr().err
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "ledger.sqlite3").touch()
    args = ["sizing", "-c", str(path), "--since", "2026-11-10", "--until", "2026-11-01"]
    assert main(args) == 2
    assert "gpu-broker sizing: --since must be before --until" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["sizing", "-c", str(path), "--max-use-share", "1.5"])
    assert exit_info.value.code == 2


def test_team_size_is_checked_and_the_rule_of_thumb_has_its_bounds(tmp_path: Path) -> None:
    assert [rule_of_thumb(n) for n in (None, 1, 10, 11, 30, 31, 50, 51)] == [
        None, 2, 2, 3, 3, 4, 4, None]  # fmt: skip
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(state=tmp_path).replace("team_size = 12", "team_size = 0"))
    assert main(["sizing", "-c", str(path)]) == 2


def test_free_runs_wrap_the_week_and_drop_short_ones() -> None:
    assert free_runs(set()) == [Run(0, 168)]
    used = {9, 38, 40}  # hour 39 alone is too short for a window
    assert free_runs(used) == [Run(10, 28), Run(41, 136)]
    assert free_runs(used, min_hours=1) == [Run(10, 28), Run(39, 1), Run(41, 136)]


def test_same_shaped_runs_share_one_cron_with_folded_day_ranges() -> None:
    # 22:00-07:00 free Monday to Friday nights; used every other hour.
    free = {d * 24 + h for d in range(5) for h in range(22, 24)} | {
        (d + 1) * 24 + h for d in range(5) for h in range(7)
    }
    windows = suggest(set(range(168)) - free)
    assert [(w.cron, w.duration, w.days) for w in windows] == [
        ("0 22 * * 1-5", "9h", (0, 1, 2, 3, 4))
    ]
    weekend = suggest(set(range(168)) - {(5 * 24 + h) for h in range(9, 22)}
                      - {(6 * 24 + h) for h in range(9, 22)})  # fmt: skip
    assert [w.cron for w in weekend] == ["0 9 * * 0,6"]


def test_window_hours_read_the_configured_windows_in_wall_time() -> None:
    berlin = ZoneInfo("Europe/Berlin")

    class Spec:
        cron = "0 22 * * *"
        duration = timedelta(hours=9)

    # The week of the autumn clock change: still 63 wall-clock hours, whole ones only.
    monday = datetime(2026, 10, 25, 23, tzinfo=UTC)  # Monday 26 Oct 00:00 in Berlin
    hours = window_hours([Spec()], berlin, monday)
    assert len(hours) == 63 and 22 in hours and 7 not in hours


def test_hours_of_the_week_in_local_time_across_a_clock_change() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # Sunday 25 Oct 2026 has 25 hours in Berlin: 02:00 comes twice. Windows are read in
    # wall time, so is the week: the wall clock's 02:00-03:00 is one hour of the week.
    start = datetime(2026, 10, 24, 22, tzinfo=UTC)  # Sunday 00:00 local
    counts = hour_counts(start, start + timedelta(hours=25), berlin)
    assert counts[6 * 24 + 2] == 1 and sum(counts) == 24
    second_two = start.timestamp() + 3 * 3600 + 1800  # 02:30 CET, after 02:30 CEST
    assert [h for h, _ in hours_between(second_two, second_two + 60, berlin)] == [146]
    touched = [h for h, _ in hours_between(start.timestamp() + 1800, start.timestamp() + 5400,
                                           berlin)]  # fmt: skip
    assert touched == [144, 145]


def test_busy_per_minute_counts_overlaps_not_back_to_back_requests() -> None:
    t = MONDAY
    runs = runs_of(
        [DemandRecord("a", t, 60.0, "passed"), DemandRecord("a", t + timedelta(seconds=60),
                                                             60.0, "passed")]
    )  # fmt: skip
    minute = int(t.timestamp() // 60)
    assert busy_per_minute(runs) == {minute: 1, minute + 1: 1}
    folded = runs_of([DemandRecord("a", t, 600.0, "passed", count=10)])
    assert len(folded) == 10 and set(busy_per_minute(folded).values()) == {1}


def test_a_young_ledger_is_read_from_its_first_record_and_unseen_hours_stay_out(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without --since: the last 28 days, but the record begins on Monday 2 Nov at 09:00;
    # "now" is Tuesday 10 Nov 12:00, so Monday 00:00-09:00 was never observed at all.
    now = FakeClock(at(1, 1, 12))
    assert main(["sizing", "-c", str(config_file), "--json"], clock=now) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["from"], got["to"]) == ("2026-11-02T09:00:00+00:00", "2026-11-10T12:00:00+00:00")
    assert got["unseen_hours_per_week"] == 0  # week 2 saw Monday morning
    assert got["services"][0]["requests"] == 3
    early = FakeClock(at(0, 3, 0))  # Thursday of week 1: Thursday to Monday 09:00 unseen
    assert main(["sizing", "-c", str(config_file), "--json"], clock=early) == 0
    young = json.loads(capsys.readouterr().out)
    assert young["unseen_hours_per_week"] == 168 - (3 * 24 - 9)
    hours = set()
    for w in young["suggested_windows"]:
        day, hour = int(w["cron"].split()[4]) - 1, int(w["cron"].split()[1])
        hours |= {day * 24 + hour + k for k in range(w["hours_per_week"])}
    assert hours and max(hours) < 3 * 24 and min(hours) >= 10  # Mon 10:00 to Wed 24:00


def test_a_shared_gpu_that_reloads_daily_sends_the_quieter_service_to_its_own() -> None:
    def usage(name: str, requests: int, hours: set[int]) -> ServiceUsage:
        return ServiceUsage(name, requests, [0.0] * 168, Busy(1, 1, 1),
                            Waits(0, 0, 0, 0, 0, 0), 1, frozenset(hours))  # fmt: skip

    usages = {"ollama": usage("ollama", 50, {9}), "comfyui": usage("comfyui", 5, {20})}
    quiet = SharedGpu(0, ("comfyui", "ollama"), 0.5, 0)
    assert own_gpu([quiet], usages) == []  # apart in time, rarely reloading: fine together
    daily = SharedGpu(0, ("comfyui", "ollama"), 3.0, 0)
    assert own_gpu([daily], usages) == [
        OwnGpu("comfyui", "shares GPU 0 with ollama: GPU 0 reloads models 3.0 times a day")
    ]


async def test_the_heat_map_route_body_from_the_ledger(config_file: Path) -> None:
    config = load_config(config_file)
    ledger = await open_ledger(config.broker)
    try:
        week = await local_use_week(ledger, ZoneInfo("UTC"), MONDAY, MONDAY + 2 * WEEK)
    finally:
        await ledger.close()
    assert week["weekdays"][0] == "Mon" and week["total_requests"] == 5
    assert week["used"][0][9] == 1.0 and week["used"][1][14] == 0.5
    assert week["requests"][0][9] == 2.0  # four arrivals on two Mondays at 09:xx
    assert sum(map(sum, week["used"])) == 1.5
