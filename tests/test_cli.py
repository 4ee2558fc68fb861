"""The command line as a user meets it: real processes for exit codes, in-process for output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.cli import main
from broker.clock import FakeClock

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def gpu_broker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_windows_prints_five_openings_with_their_ends() -> None:
    result = gpu_broker("windows", "-c", str(EXAMPLE), "--next", "5")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.count(" CE") >= 2]
    window_rows = rows[:5]
    assert len(window_rows) == 5
    for row in window_rows:
        opens, closes = re.findall(r"\w{3} \d{4}-\d{2}-\d{2} \d{2}:\d{2} CES?T", row)[:2]
        assert opens < closes or opens[4:] < closes[4:]


def test_windows_in_virtual_time(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[broker]\ntimezone = "Europe/Berlin"\n'
        '[[windows]]\ncron = "0 22 * * *"\nduration = "9h"\n'
        '[energy]\nprice_per_kwh = 0.3\n'
        '[[energy.tariff]]\ncron = "0 23 * * *"\nduration = "7h"\nprice_per_kwh = 0.18\n'
    )
    clock = FakeClock(datetime(2026, 10, 25, 1, 30, tzinfo=UTC))  # 02:30 CET, second pass
    assert main(["windows", "-c", str(config), "--next", "2"], clock=clock) == 0
    out = capsys.readouterr().out
    assert "Now: Sun 2026-10-25 02:30 CET" in out
    assert re.search(
        r"Sat 2026-10-24 22:00 CEST.*Sun 2026-10-25 07:00 CET.*10h.*open now", out
    ), out
    assert re.search(r"Sun 2026-10-25 22:00 CET.*Mon 2026-10-26 07:00 CET.*9h", out), out
    assert re.search(r"Sat 2026-10-24 23:00 CEST.*Sun 2026-10-25 06:00 CET.*0.18 EUR/kWh", out)


def test_windows_without_windows_says_it_never_lists(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    assert main(["windows", "-c", str(config)], clock=FakeClock()) == 0
    out = capsys.readouterr().out
    assert "never list this machine" in out
    assert "at all times" in out


def test_three_mistakes_exit_2_naming_all_three_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[policy]\nidle_window = "soon"\nidle_windo = "15m"\n'
        '[[windows]]\ncron = "61 22 * * *"\nduration = "9h"\n'
    )
    for command in ("check", "windows"):
        result = gpu_broker(command, "-c", str(config))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert "policy.idle_window: expected a duration" in result.stderr
        assert "policy.idle_windo: unknown key" in result.stderr
        assert "windows[0].cron: expected a cron expression" in result.stderr
        assert "3 problems" in result.stderr
        assert result.stdout == ""


def test_missing_config_exits_2(tmp_path: Path) -> None:
    result = gpu_broker("check", env={"GPU_BROKER_CONFIG": str(tmp_path / "none.toml")})
    assert result.returncode == 2
    assert "cannot read the file" in result.stderr


def test_config_from_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[broker]\nstate_dir = "{tmp_path / "state"}"\n')
    result = gpu_broker("check", env={"GPU_BROKER_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert f"config {config} is valid" in result.stdout
    assert "windows: none configured" in result.stdout


def test_check_on_the_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The example's state_dir is under ~: a home of its own, so no ledger left there by
    # an older broker (or another run) decides the outcome.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GPU_BROKER_TOKEN", "check-example-token-0123")
    clock = FakeClock(datetime(2026, 11, 25, 23, 0, tzinfo=UTC))  # midnight in Berlin
    assert main(["check", "-c", str(EXAMPLE)], clock=clock) == 0
    out = capsys.readouterr().out
    assert "ok   windows: open now, until Thu 2026-11-26 07:00 CET" in out
    assert "ok   broker.api_token is set (24 characters)" in out
    assert "paper market" in out


def test_check_fails_on_a_missing_provider_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path}"\n'
        '[provider]\nkind = "vast"\nmachine_id = 1\nprice_gpu = 0.3\n'
    )
    assert main(["check", "-c", str(config)], clock=FakeClock()) == 2
    out = capsys.readouterr().out
    assert "FAIL provider.api_key_env: environment variable VAST_API_KEY is not set" in out


def test_check_refuses_a_ledger_from_a_newer_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "ledger.sqlite3")
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[broker]\nstate_dir = "{tmp_path}"\n')
    assert main(["check", "-c", str(config)], clock=FakeClock()) == 2
    assert "schema version 999, newer than this gpu-broker" in capsys.readouterr().out


def test_bad_usage_exits_2() -> None:
    assert gpu_broker("windows", "--next", "0").returncode == 2
    assert gpu_broker("frobnicate").returncode == 2
    version = gpu_broker("--version")
    assert version.returncode == 0 and version.stdout.startswith("gpu-broker ")


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "gpu-broker"
    result = subprocess.run(
        [str(script), "windows", "-c", str(EXAMPLE), "--next", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Availability windows" in result.stdout
    _ = UTC
