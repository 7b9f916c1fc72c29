"""docker-compose.yml without a Docker engine: its structure, and its server service run as a local
process (its command and environment, with the `redis` host pointed at a local redis-server)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clients.wire import decode_arrow
from redis_server import free_loopback_port
from server.live import BIN, LiveServer

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value, variables: dict[str, str]):
    """Compose's `${VAR}` / `${VAR:-default}` substitution, applied to every string in `value`."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: variables.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_wires_redis_server_and_trainer(compose):
    services = compose["services"]
    redis, server, trainer = services["redis"], services["server"], services["trainer"]

    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"  # acknowledged writes survive a crash
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    assert any(v.endswith(":/data") for v in redis["volumes"])

    assert server["build"]["target"] == "server"
    assert server["environment"]["BIRDIE_REDIS_URL"] == "redis://redis:6379/0"
    assert "BIRDIE_WORKERS" in server["environment"]["BIRDIE_WORKERS"]  # taken from the env
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    assert server["command"][:2] == ["birdie-server", "serve"]
    assert any(v.startswith("corpus:") for v in server["volumes"])
    assert "corpus" in compose["volumes"]

    assert trainer["profiles"] == ["train"]
    assert trainer["environment"]["BIRDIE_SERVER_URL"] == "http://server:8000"
    assert trainer["command"][0] == "birdie-train"
    # The trainer's command is one birdie-train accepts (argparse refuses an ambiguous --run).
    from trainer.train import parse_args

    parsed = parse_args(trainer["command"][1:])
    assert (parsed.run_name, parsed.device, parsed.resume) == ("birdie", "cuda", "auto")
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]

    # Every build target exists in the Dockerfile.
    stages = re.findall(r"^FROM \S+ AS (\w+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert {server["build"]["target"], trainer["build"]["target"]} <= set(stages)


def test_server_service_runs_as_a_local_process(compose, redis_server, corpus_path, tmp_path):
    server = interpolate(compose["services"]["server"], {"BIRDIE_WORKERS": "2", "BIRDIE_CORPUS": str(corpus_path)})
    port = free_loopback_port()
    data = tmp_path / "data"  # stands for the `corpus` volume at /data
    env = {
        name: value.replace("redis://redis:6379", redis_server.url.rsplit("/", 1)[0]).replace("/data", str(data))
        for name, value in server["environment"].items()
    }
    assert env["BIRDIE_WORKERS"] == "2" and env["BIRDIE_CORPUS"] == str(corpus_path)
    command = [str(BIN / server["command"][0]), *server["command"][1:]]
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"

    live = LiveServer(env, tmp_path, name="compose-server")
    live.port = port
    live.command = lambda: command
    with live:
        # The compose healthcheck itself, against this port.
        check = [sys.executable if part == "python" else part.replace(":8000", f":{port}")
                 for part in server["healthcheck"]["test"][1:]]
        assert subprocess.run(check, timeout=30).returncode == 0
        assert live.get("/readyz").json()["status"] == "ready"
        assert [r["name"] for r in live.get("/runs").json()["runs"]] == ["birdie", "decoder-ul2", "ntp", "ul2"]
        response = live.get("/batch", params={"run": "birdie", "step": 0, "rank": 1, "world_size": 2})
        assert response.status_code == 200
        batch = decode_arrow(response.content)
        assert batch.shape == (8, 2048) and batch.header["rank"] == 1
        assert len(batch.objectives) == len(live.get("/objectives", params={"run": "birdie"}).json())
