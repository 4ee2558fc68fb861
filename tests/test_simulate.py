"""`gpu-broker simulate` and its replay: what the pool does with requests and renters in
virtual time, the policy keys it measures, and the command's output and errors."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.cli import main
from broker.config import Config, parse_config
from broker.ledger import open_ledger
from broker.ledger.base import DemandRecord
from broker.scheduling.pool import PoolState
from broker.simulation.inputs import Renter, Request
from broker.simulation.replay import Replay, Timings, replay

START = datetime(2026, 11, 2, 12, tzinfo=UTC)  # a Monday
T0 = START.timestamp()
H = 3600.0
TIMINGS = Timings(keep_alive_s=300, debounce_s=30, drain_s=5, poll_s=10, max_hold_s=30)


def config(policy: dict[str, Any] | None = None, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "broker": {"timezone": "UTC"},
        "gpus": {"backend": "fake", "fake": [{"idle_watts": 20, "load_watts": 300}] * 2},
        "windows": [{"cron": "0 0 * * *", "duration": "24h"}],
        "energy": {"price_per_kwh": 0.2, "overhead_watts": 50},
        "policy": {"idle_window": "15m", "max_commitment": "2h", "local_hold": "10m",
                   "renew_every": "1h"}
        | (policy or {}),
        "provider": {"kind": "paper", "price_gpu": 0.5},
    }
    return parse_config(data | extra)


def renter(hour: float, hours: float, min_offer: float) -> Renter:
    return Renter(T0 + hour * H, 2, hours, "on-demand", 1.0, min_offer)


def run(
    cfg: Config, demand: list[Request], renters: list[Renter], hours: float = 12
) -> Replay:
    end = START + timedelta(hours=hours)
    return replay(cfg, cfg.policy, demand, renters, START, end, timings=TIMINGS, record=True)


def moments(sim: Replay) -> list[tuple[float, PoolState]]:
    return [(round((t.at.timestamp() - T0) / 60, 2), t.state) for t in sim.transitions]


def test_a_request_keeps_the_pool_off_the_market_for_keep_alive_debounce_and_idle_window() -> (
    None
):
    sim = run(config(), [Request(T0 + 60, 10.0)], [], hours=1)
    # The request ends at 70 s; Ollama keeps the model 300 s, the GPUs look idle 30 s
    # later (IDLE at 400 s), 15 minutes of that (DRAINING at 1300 s), 5 s of drain.
    assert moments(sim)[-3:] == [
        (round(400 / 60, 2), PoolState.IDLE),
        (round(1300 / 60, 2), PoolState.DRAINING),
        (round(1305 / 60, 2), PoolState.LISTED),
    ]
    assert sim.totals.listings == 1 and sim.totals.requests == 1


def test_a_request_while_listed_is_held_and_passes_at_once_while_rented_it_is_refused() -> None:
    # Listed at 21m45s (the GPUs idle at 30 s + 15 min + 5 s). A renter at 1 h stays
    # 30 min; a request at 1h10m is refused until the contract ends (the renter leaves at
    # 1h30m, the 503 named the offer's end); the one at 5h finds the offer unrented.
    demand = [Request(T0 + 70 * 60, 5.0), Request(T0 + 5 * H, 5.0)]
    sim = run(config(), demand, [renter(1, 0.5, 0.5)], hours=8)
    t = sim.totals
    assert (t.rentals, t.requests, t.refused, t.held) == (1, 2, 1, 1)
    refused_wait, held_wait = t.waits
    assert 20 * 60 < refused_wait <= 2 * H  # never beyond max_commitment
    assert held_wait == 0.0 or held_wait < 1.0 + TIMINGS.sample_s
    states = [s for _, s in moments(sim)]
    assert PoolState.RECLAIMING in states and PoolState.RENTED in states


def test_a_refused_visit_comes_back_when_the_503_said_not_request_by_request() -> None:
    # Listed at 15m05s; a renter at 30 m stays 4 h, so the contract runs to the offer's end
    # at 2h15m05s. A visit at 1 h (three requests a minute apart) meets it: its first
    # request is refused until then. The person reads that and comes back at 2h15m05s
    # with the rest of the conversation, a minute apart as before; a trace fired as
    # recorded meets the 503 three times instead.
    visit = [Request(T0 + H + k * 60, 5.0) for k in range(3)]
    cfg = config()
    sim = run(cfg, visit, [renter(0.5, 4, 0.5)], hours=4)
    t = sim.totals
    assert (t.requests, t.refused, t.visits_refused, t.held) == (3, 1, 1, 0)
    back = 2 * H + 15 * 60 + 5 - H  # every request waits from its arrival to 2h15m05s on
    assert sorted(t.waits) == [back, back, back]
    hasty = replace(TIMINGS, patient_users=False)
    end = START + timedelta(hours=4)
    fired = replay(cfg, cfg.policy, visit, [renter(0.5, 4, 0.5)], START, end, timings=hasty)
    assert (fired.totals.refused, fired.totals.visits_refused) == (3, 1)


def test_displacing_a_bid_renter_lets_the_visit_through_and_keeps_the_offer_down() -> None:
    # As above, but the renter bids (interruptible). With reclaim = displace-interruptible
    # the host's own rental pushes it off at once: the request is held, not refused, and
    # the pool stays off the market until the displaced contract's end (2h15m05s).
    bidder = Renter(T0 + 0.5 * H, 2, 4, "interruptible", 0.4, 0.5)
    visit = [Request(T0 + H, 5.0)]
    displacing = run(config({"reclaim": "displace-interruptible"}), visit, [bidder], hours=4)
    t = displacing.totals
    assert (t.displaced, t.refused, t.held) == (1, 0, 1)
    assert t.waits == [0.0]
    assert t.earnings == pytest.approx(0.5 * 0.8)  # half an hour at the bid for 2 GPUs
    later = [t for t, a in displacing.actions if not a.renewal and t > START + timedelta(hours=1)]
    assert later and later[0] >= START + timedelta(hours=2, minutes=15, seconds=5)
    graceful = run(config(), visit, [bidder], hours=4)
    assert (graceful.totals.displaced, graceful.totals.refused) == (0, 1)


def test_the_rhythm_starts_from_the_demand_recorded_before_the_replay() -> None:
    # Three weeks of a visit at 14:30 every day before the replay starts (Monday 12:00).
    # As the live service reads its ledger at start, the replay learns from them: its first
    # offer (at 12:15) and its renewals end before 14:30 (unlearned, they would go on to
    # two hours ahead every 5 minutes).
    history = [Request(T0 - d * 86400 + 2.5 * H, 5.0) for d in range(1, 22)]
    cfg = config({"demand_risk": 0.2, "renew_every": "5m"})
    end = START + timedelta(hours=3)
    sim = replay(cfg, cfg.policy, history, [], START, end, timings=TIMINGS, record=True)
    offers = [a.end for _, a in sim.actions]
    assert offers and max(offers) < START + timedelta(hours=2.5)
    assert sim.totals.requests == 0  # the history only teaches; it is not replayed


def test_renew_every_keeps_near_max_commitment_on_the_offer() -> None:
    # Listed at 15m05s (no request: idle from the start) with 2 h on the offer. At 1h14m
    # a renter wants 1.5 h left. Renewed at half (the old way, at 1h15m05s) the offer
    # shows 61 min then: the renter leaves. Renewed every 5 min it shows 1h56m.
    lone = [renter(1 + 14 / 60, 3, 1.5)]
    sawtooth = run(config({"renew_every": "1h"}), [], lone, hours=6)
    assert (sawtooth.totals.rentals, sawtooth.totals.renters_turned_away) == (0, 1)
    rolling = run(config({"renew_every": "5m"}), [], lone, hours=6)
    assert (rolling.totals.rentals, rolling.totals.renters_turned_away) == (1, 0)
    assert rolling.totals.renewals > sawtooth.totals.renewals
    assert rolling.totals.rented_gpu_hours == pytest.approx(6.0, abs=0.01)


def test_demand_risk_shortens_the_offer_before_the_teams_usual_hour() -> None:
    # Two weeks of visits at 10:00 and 14:30 every day. On the last day the pool lists
    # after the morning's visit; with demand_risk its offers end before 14:30, without
    # they run on to two hours ahead (and the 14:30 request has to reclaim).
    days = 15
    first = START - timedelta(days=days - 1)
    demand = [
        Request(first.timestamp() + d * 86400 + offset * H, 5.0)
        for d in range(days)
        for offset in (-2, 2.5)
    ]
    visit = START + timedelta(hours=2.5)
    end = START + timedelta(hours=3)

    def offers(policy: dict[str, Any]) -> list[datetime]:
        cfg = config(policy)
        sim = replay(cfg, cfg.policy, demand, [], first, end, timings=TIMINGS, record=True)
        return [a.end for t, a in sim.actions if t >= START - timedelta(hours=2)]

    careful = offers({"demand_risk": 0.2, "renew_every": "5m"})
    assert careful, "listed in the morning"
    assert max(careful) <= visit
    assert max(offers({"renew_every": "5m"})) > visit


# -- the command ------------------------------------------------------------------------------


CONFIG_TOML = """
[broker]
timezone = "UTC"
state_dir = "{state}"
[gpus]
backend = "fake"
[policy]
max_commitment = "2h"
[[windows]]
cron = "0 0 * * *"
duration = "24h"
[provider]
kind = "paper"
price_gpu = 0.5
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG_TOML.format(state=tmp_path / "state"))
    demand = tmp_path / "demand.csv"
    demand.write_text(
        "timestamp,duration_s,service\n"
        "2026-11-02T12:00:00Z,5,ollama\n2026-11-02T15:00:00Z,8,ollama\n"
        "2026-11-03T09:00:00Z,3,ollama\n"
    )
    market = tmp_path / "market.csv"
    market.write_text(
        "timestamp,gpus,hours,kind,max_price,min_offer_hours\n"
        "2026-11-02T13:00:00Z,2,1.5,on-demand,0.6,0.5\n"
        "2026-11-02T14:30:00Z,2,1,on-demand,0.6,0.5\n"
        "2026-11-02T20:00:00Z,2,3,interruptible,0.3,1\n"
    )
    return {"config": cfg, "demand": demand, "market": market}


def simulate(files: dict[str, Path], *args: str) -> list[str]:
    return [
        "simulate", "-c", str(files["config"]), "--demand", str(files["demand"]),
        "--market", str(files["market"]), *args,
    ]  # fmt: skip


def test_json_has_a_row_per_policy_and_the_oracle(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(simulate(files, "--format", "json", "--policy", "renew_every=5m",
                         "--policy", "idle_window=5m,local_hold=2m"))  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    assert [r["policy"] for r in rows] == [
        "configured", "renew_every=5m", "idle_window=5m,local_hold=2m", "oracle",
    ]  # fmt: skip
    for row in rows:
        for key in ("net", "extra_net", "rented_gpu_hours", "listings", "requests_held",
                    "requests_refused", "share_of_oracle"):  # fmt: skip
            assert key in row
        assert set(row["wait_s"]) == {"p50", "p95", "max"}
        assert row["extra_net"] >= row["net"]  # idle draw and overhead are not renting's
    oracle = rows[-1]
    assert oracle["share_of_oracle"] == 1.0 and oracle["requests_refused"] == 0
    assert oracle["rented_gpu_hours"] > 0
    assert oracle["wait_s"] == {"p50": 0.0, "p95": 0.0, "max": 0.0}
    assert data["from"].startswith("2026-11-02T12:00")


def test_csv_and_table(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(simulate(files, "--format", "csv")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("policy,currency,net,extra_net,")
    assert [line.split(",")[0] for line in lines[1:]] == ["configured", "oracle"]
    assert main(simulate(files)) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "configured" in out and "of oracle" in out


@pytest.mark.parametrize(
    ("variant", "problem"),
    [
        ("idle_window=soon", 'policy.idle_window: expected a duration like "15m", got "soon"'),
        ("idle_windw=5m", "policy.idle_windw: unknown key (did you mean 'idle_window'?)"),
        ("demand_risk=2", "policy.demand_risk:"),
        ("idle_window", "expected KEY=VALUE"),
    ],
)
def test_a_bad_policy_variant_is_a_usage_error_naming_the_key(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], variant: str, problem: str
) -> None:
    assert main(simulate(files, "--policy", variant)) == 2
    assert problem in capsys.readouterr().err


def test_a_bad_trace_is_a_usage_error(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,duration_s\n2026-11-02T12:00:00Z,soon\n")
    assert main(["simulate", "-c", str(files["config"]), "--demand", str(bad)]) == 2
    assert f"gpu-broker simulate: {bad}:2: expected a number" in capsys.readouterr().err
    market = tmp_path / "market.csv"
    market.write_text("timestamp,gpus,hours\n")
    args = ["simulate", "-c", str(files["config"]), "--demand", str(files["demand"])]
    assert main([*args, "--market", str(market)]) == 2
    assert "missing column(s) kind, max_price, min_offer_hours" in capsys.readouterr().err


def test_the_ledgers_demand_record_is_replayed(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def record() -> None:
        cfg = config(broker={"timezone": "UTC", "state_dir": str(tmp_path / "state")})
        ledger = await open_ledger(cfg.broker)
        try:
            at = datetime(2026, 11, 2, 12, tzinfo=UTC)
            await ledger.add_demand(
                [
                    DemandRecord("ollama", at, 5.0, "passed"),
                    DemandRecord("ollama", at + timedelta(hours=3), 40.0, "held", held_s=30.0),
                    DemandRecord("ollama", at + timedelta(hours=5), 1.0, "refused"),
                ]
            )
        finally:
            await ledger.close()

    asyncio.run(record())
    code = main(
        ["simulate", "-c", str(files["config"]), "--demand", "ledger", "--market",
         str(files["market"]), "--since", "2026-11-02", "--until", "2026-11-02",
         "--format", "json"]
    )  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["requests"] == 3


def test_without_a_ledger_the_command_says_what_to_do(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "-c", str(files["config"])]) == 2
    assert "--demand FILE.csv" in capsys.readouterr().err


def test_the_paper_market_model_gives_the_same_renters_to_every_policy(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = files["config"].read_text().replace(
        "price_gpu = 0.5", "price_gpu = 0.2\narrivals_per_hour = 2.0\nseed = 7"
    )
    files["config"].write_text(text)
    args = [*simulate(files, "--format", "json")[:-4], "--format", "json",
            "--until", "2026-11-09", "--policy", "renew_every=2h"]  # fmt: skip
    assert "--market" not in args
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)["rows"]
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)["rows"]
    assert first == again  # seeded: the same renters each time
    configured, never_renewed, oracle = first
    assert configured["rentals"] > 0 and oracle["rentals"] > 0
    # renewed every 10 min, renters see 2 h left; renewed only at its end they see less
    assert configured["rented_gpu_hours"] > never_renewed["rented_gpu_hours"]
