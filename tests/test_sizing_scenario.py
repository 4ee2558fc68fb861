"""Sizing on a recorded ledger of four weeks: scenarios/demand-20users.csv written into a
ledger through the Ledger interface, `gpu-broker sizing --json` on it, and the suggested
windows replayed by `gpu-broker simulate`'s machinery in the busy market (a few seconds).
scripts/sizing-replay prints the same comparison with the example windows' figures."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.cli import main
from broker.config import WindowSection, load_config
from broker.ledger import DemandRecord, open_ledger
from broker.scheduling.windows import Calendar
from broker.simulation.inputs import read_demand, read_market
from broker.simulation.run import simulate

ROOT = Path(__file__).resolve().parent.parent
START = datetime(2026, 11, 1, 23, tzinfo=UTC)  # Monday 2 November, 00:00 in Berlin
END = START + timedelta(days=28)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.example.toml pointed at a ledger holding the scenario's four weeks."""
    tmp = tmp_path_factory.mktemp("scenario")
    text = (ROOT / "config.example.toml").read_text()
    path = tmp / "config.toml"
    lines = text.splitlines()
    [at] = [i for i, line in enumerate(lines) if line.startswith("state_dir")]
    lines[at] = f'state_dir = "{tmp / "state"}"'
    path.write_text("\n".join(lines) + "\n")
    config = load_config(path)

    async def record() -> None:
        ledger = await open_ledger(config.broker)
        try:
            await ledger.add_demand(
                [
                    DemandRecord(r.service, datetime.fromtimestamp(r.at, UTC), r.duration_s,
                                 "passed")
                    for r in read_demand(ROOT / "scenarios" / "demand-20users.csv")
                ]
            )  # fmt: skip
        finally:
            await ledger.close()

    asyncio.run(record())
    return path


def test_suggested_windows_hold_no_local_use_and_replay_without_a_wait(
    recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sizing", "-c", str(recorded), "--since", "2026-11-02", "--until",
                 "2026-11-29", "--json"])  # fmt: skip
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["from"], got["to"]) == ("2026-11-02T00:00:00+01:00", "2026-11-30T00:00:00+01:00")
    [ollama] = got["services"]
    assert ollama["requests"] == 17938 and ollama["needs_gpus"] == 2
    config = load_config(recorded)
    windows = [
        WindowSection.model_validate({"cron": w["cron"], "duration": w["duration"]})
        for w in got["suggested_windows"]
    ]
    assert windows and got["suggested_hours_per_week"] == sum(
        w["hours_per_week"] for w in got["suggested_windows"]
    )
    # No request of those four weeks runs at a moment a suggested window is open.
    opened = Calendar.from_config(windows, config.broker.tz).intervals(START, END)
    assert sum(i.duration.total_seconds() for i in opened) == pytest.approx(
        4 * 3600 * got["suggested_hours_per_week"]
    )
    demand = read_demand(ROOT / "scenarios" / "demand-20users.csv")
    assert not [
        r for r in demand
        if any(i.start.timestamp() < r.at + r.duration_s and r.at < i.end.timestamp()
               for i in opened)
    ]  # fmt: skip
    # Replayed in the busy market, the GPUs are rented inside them and nobody waits.
    renters = read_market(ROOT / "scenarios" / "market-busy.csv")
    ours = config.model_copy(update={"windows": windows})
    row, oracle = simulate(ours, [("suggested", ours.policy)], demand, renters, START, END)
    assert row.rented_gpu_hours > 0 and row.net > 0
    assert (row.requests_refused, row.requests_held) == (0, 0)
    assert row.net <= oracle.net
