"""compose.yaml: it parses (no Docker here: a schema check of what `docker compose config`
would need), names the images and variables the README's guide names, and agrees with the
gpu-broker configuration it mounts (ports, Host allow-list, the gate in front of Ollama)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from broker.config import load_config
from broker.units import parse_hostport

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {"ollama": "ollama/ollama", "open-webui": "ghcr.io/open-webui/open-webui"}


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_the_shape_docker_compose_reads() -> None:
    data = compose()
    assert set(data) <= {"services", "volumes", "networks", "configs", "secrets", "name"}
    services = data["services"]
    assert set(services) == {"ollama", "gpu-broker", "open-webui"}
    named_volumes = set(data.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source.startswith(("./", "/")) or source in named_volumes, (name, mount)
        for port in service.get("ports", []):
            assert re.fullmatch(r"(\d+\.\d+\.\d+\.\d+:)?\d+:\d+", port), (name, port)
        for dep in service.get("depends_on", []):
            assert dep in services
        assert isinstance(service.get("environment", {}), dict)
    assert (ROOT / services["gpu-broker"]["build"] / "Dockerfile").exists()


def test_compose_names_the_images_and_variables_of_the_guide() -> None:
    services = compose()["services"]
    readme = (ROOT / "README.md").read_text()
    for name, image in IMAGES.items():
        assert services[name]["image"].split(":")[0] == image
        assert image in readme, image
    variables = {
        "OLLAMA_HOST": services["ollama"]["environment"],
        "OLLAMA_BASE_URL": services["open-webui"]["environment"],
        "GPU_BROKER_TOKEN": services["gpu-broker"]["environment"],
    }
    for variable, env in variables.items():
        assert variable in env and variable in readme, variable
    assert "host.docker.internal" in readme and "compose.yaml" in readme


def test_compose_agrees_with_the_config_it_mounts() -> None:
    services = compose()["services"]
    broker = services["gpu-broker"]
    [mount] = [m for m in broker["volumes"] if m.endswith(":/etc/gpu-broker/config.toml:ro")]
    config = load_config(ROOT / mount.split(":", 1)[0])
    [ollama] = config.services
    # Open WebUI talks to the gate, by the name the gate's Host check lets in.
    base = services["open-webui"]["environment"]["OLLAMA_BASE_URL"]
    host, port = parse_hostport(base.removeprefix("http://"))
    assert ollama.gate_listen is not None
    assert parse_hostport(ollama.gate_listen)[1] == port
    assert host in ollama.allowed_hosts
    assert "host.docker.internal:host-gateway" in services["open-webui"]["extra_hosts"]
    assert broker["network_mode"] == "host"
    # The gate forwards to Ollama's published port, which only loopback reaches.
    [published] = services["ollama"]["ports"]
    bind, outer, _ = published.split(":")
    assert bind == "127.0.0.1"
    assert ollama.upstream == f"http://127.0.0.1:{outer}"
    assert ollama.refuse_as_message
    assert config.broker.api_token_env in broker["environment"]
