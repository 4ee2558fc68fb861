from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from broker.config import (
    Config,
    PaperProvider,
    VastProvider,
    find_config,
    load_config,
    parse_config,
)
from broker.errors import ConfigError, SecretError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def problems(toml: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(toml))
    return caught.value.problems


def test_example_config_is_valid_and_complete() -> None:
    config = load_config(EXAMPLE)
    assert config.gpus.backend == "auto" and len(config.gpus.fake) == 2
    assert isinstance(config.provider, PaperProvider)
    assert config.policy.idle_window == timedelta(minutes=5)  # issue 13: measured
    assert config.services[0].gate_listen == "127.0.0.1:11434"
    assert [w.cron for w in config.windows] == ["0 22 * * *", "0 9 * * 6,0"]
    assert config.energy.tariff[0].price_per_kwh == 0.18
    assert config.broker.state_dir.is_absolute() and "~" not in str(config.broker.state_dir)
    # Every key of the contract (SPEC section 4) appears in the example, set or commented.
    text = EXAMPLE.read_text()
    for key in [
        "state_dir", "timezone", "sample_interval", "api_listen", "api_token_env", "backend",
        "idle_utilization_pct", "idle_memory_mb", "fake", "name", "kind", "upstream",
        "gate_listen", "gpus", "drain", "max_hold", "idle_window", "drain_timeout",
        "min_listed", "max_cycles_per_day", "local_hold", "max_commitment", "reclaim", "cron",
        "duration", "currency", "price_per_kwh", "overhead_watts", "carbon_g_per_kwh",
        "machine_id", "api_key_env", "price_gpu", "min_bid", "price_disk", "min_chunk",
    ]:  # fmt: skip
        assert f"{key} =" in text, key


def test_an_empty_file_gives_safe_defaults() -> None:
    config = parse_config({})
    assert config.windows == []  # no windows: never rent
    assert config.provider.kind == "paper"
    assert config.broker.api_listen == "127.0.0.1:9477"


def test_three_mistakes_are_reported_together_with_key_paths() -> None:
    found = problems(
        """
        [policy]
        idle_window = "soon"
        idle_windw = "15m"
        [[windows]]
        cron = "0 25 * * *"
        duration = "9h"
        """
    )
    assert found == [
        'policy.idle_window: expected a duration like "15m", got "soon"',
        "policy.idle_windw: unknown key (did you mean 'idle_window'?)",
        'windows[0].cron: expected a cron expression like "0 22 * * *", got "0 25 * * *"',
    ]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[broker]\ntimezone = "Mars/Olympus"', "broker.timezone: expected an IANA time zone"),
        ('[broker]\napi_listen = "9477"', 'broker.api_listen: expected "host:port"'),
        ('[gpus]\nbackend = "cuda"', "gpus.backend: input should be 'nvml', 'fake' or 'auto'"),
        ("[gpus]\nidle_utilization_pct = 120", "gpus.idle_utilization_pct: input should be"),
        ('[gpus]\nfake = [{ name = "x", load_watts = 10, idle_watts = 20 }]', "gpus.fake[0]: "),
        ("[policy]\nmax_cycles_per_day = 0", "policy.max_cycles_per_day: input should be"),
        ('[policy]\nidle_window = "0s"', "policy.idle_window: expected a duration longer"),
        ('[policy]\nreclaim = "now"', "policy.reclaim: input should be 'graceful'"),
        ('[[windows]]\ncron = "0 22 * *"\nduration = "1h"', "windows[0].cron: expected a 5-field"),
        ('[[windows]]\ncron = "0 0 30 2 *"\nduration = "1h"', "windows[0].cron: the cron"),
        ('[[windows]]\ncron = "0 22 * * *"\nduration = "8d"', "windows[0].duration: expected at"),
        ("[[windows]]\ncron = \"0 22 * * *\"", "windows[0].duration: required key is missing"),
        ('[energy]\ncurrency = "euro"', "energy.currency: string should match"),
        ('[provider]\nkind = "aws"', "provider: expected kind to be one of 'vast', 'runpod'"),
        ("[provider]\nseed = 1", "provider: required key 'kind' is missing"),
        ('[provider]\nkind = "vast"\nprice_gpu = 0.3', "provider.machine_id: required key"),
        ('[provider]\nkind = "vast"\nmachine_id = 1\nprice_gpu = 0.3\nmin_bid = -1',
         'provider.min_bid: expected "auto" or a price'),
        ('[provider]\nkind = "paper"\nprce_gpu = 1', "provider.prce_gpu: unknown key (did you"),
        ('[broker]\ndatabase_url = "postgresql://u:pw@x/db"', "broker.database_url: expected no"),
        ('[broker]\napi_token = "hunter2"', "broker.api_token: secrets are not accepted inline; "
         "use api_token_env"),
        ('[[services]]\nname = "o"\nkind = "ollama"\nupstream = "127.0.0.1:11435"',
         "services[0].upstream: expected an http(s) URL"),
        ('[[services]]\nname = "o"\nkind = "ollama"\nupstream = "http://h:1"\ndrain = "kill"',
         'services[0].drain: expected "api", "systemd:UNIT", "command" or "none"'),
        ('[[services]]\nname = "o"\nkind = "ollama"\nupstream = "http://h:1"\n'
         'drain = "command"', 'services[0]: drain = "command" needs drain_command'),
    ],
)  # fmt: skip
def test_each_mistake_names_its_key(toml: str, expected: str) -> None:
    found = problems(toml)
    assert any(p.startswith(expected) for p in found), found


def test_inline_secret_is_refused_without_echoing_it() -> None:
    found = problems('[provider]\nkind = "vast"\nmachine_id = 1\nprice_gpu = 1\napi_key = "s3cr3t"')
    assert found == [
        "provider.api_key: secrets are not accepted inline; use api_key_env (an environment "
        "variable) or api_key_file (a file only the broker can read)"
    ]
    assert not any("s3cr3t" in p for p in found)


def test_cross_checks_name_the_keys() -> None:
    found = problems(
        """
        [broker]
        api_listen = "127.0.0.1:9477"
        [gpus]
        backend = "fake"
        fake = [{}]
        [[services]]
        name = "a"
        kind = "ollama"
        upstream = "http://127.0.0.1:11434"
        gate_listen = "127.0.0.1:11434"
        gpus = [0, 3]
        [[services]]
        name = "a"
        kind = "comfyui"
        upstream = "http://127.0.0.1:8188"
        gate_listen = "127.0.0.1:9477"
        """
    )
    assert found == [
        "services: the name 'a' is used twice",
        "services[0].gate_listen: the gate cannot listen on its own upstream "
        "(http://127.0.0.1:11434); move the service (e.g. OLLAMA_HOST) to another port",
        "services[1].gate_listen: 127.0.0.1:9477 is already used by broker.api_listen",
        "services[0].gpus: GPU 3 does not exist (gpus.fake has 1)",
    ]


def test_secrets_come_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"kind": "vast", "machine_id": 7, "price_gpu": 0.3}
    monkeypatch.setenv("MY_VAST_KEY", "from-env\n")
    vast = parse_config({"provider": {**base, "api_key_env": "MY_VAST_KEY"}}).provider
    assert isinstance(vast, VastProvider) and vast.api_key() == "from-env"

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    vast = parse_config({"provider": {**base, "api_key_file": str(key_file)}}).provider
    assert isinstance(vast, VastProvider) and vast.api_key() == "from-file"

    monkeypatch.delenv("VAST_API_KEY", raising=False)
    vast = parse_config({"provider": base}).provider
    assert isinstance(vast, VastProvider)
    with pytest.raises(SecretError, match=r"provider\.api_key_env: environment variable "
                       r"VAST_API_KEY is not set"):
        vast.api_key()
    vast = parse_config({"provider": {**base, "api_key_file": str(tmp_path / "nope")}}).provider
    assert isinstance(vast, VastProvider)
    with pytest.raises(SecretError, match=r"provider\.api_key_file: cannot read"):
        vast.api_key()


def test_token_env_and_file_together_is_an_error(tmp_path: Path) -> None:
    found = problems(f'[broker]\napi_token_env = "X"\napi_token_file = "{tmp_path}/t"')
    assert found == ["broker: set api_token_env or api_token_file, not both"]


def test_relative_state_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.toml"
    path.parent.mkdir()
    path.write_text('[broker]\nstate_dir = "state"\n')
    assert load_config(path).broker.state_dir == tmp_path / "etc" / "state"


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[broker\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.problems[0].startswith("invalid TOML:")
    assert "line 1" in caught.value.problems[0]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.toml")


def test_config_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPU_BROKER_CONFIG", raising=False)
    assert find_config("given.toml") == Path("given.toml")
    (tmp_path / "config.toml").write_text("")
    assert find_config(None) == Path("config.toml")
    monkeypatch.setenv("GPU_BROKER_CONFIG", "/from/env.toml")
    assert find_config(None) == Path("/from/env.toml")


def test_models_are_frozen() -> None:
    config = Config()
    with pytest.raises(ValueError):
        config.policy.max_cycles_per_day = 99  # type: ignore[misc]
