"""Fixtures of the server tests: a small prepared corpus (once per session), run files, servers."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from objective_server.corpus import prepare_corpus
from objective_server.corpus.default import StdlibDocstrings, stdlib_root
from objective_server.settings import Settings
from redis_server import RedisServer, redis_server_binary
from server.live import LiveServer

# Small batches keep every test fast on two cores: 2 rows of 128 positions.
SEQ_LEN = 128
BATCH_SIZE = 2


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real prepared token store: the docstrings of the stdlib's `email` package (~90 KB of
    text, a 1024-id BPE), with a fifth of the documents held out for validation."""
    out = tmp_path_factory.mktemp("corpus") / "email-docstrings"
    prepare_corpus(StdlibDocstrings(root=stdlib_root() / "email"), out, vocab_size=1024, validation_fraction=0.2)
    return out


@pytest.fixture(scope="session")
def other_corpus_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different prepared corpus: the docstrings of the stdlib's `json` package."""
    out = tmp_path_factory.mktemp("corpus") / "json-docstrings"
    prepare_corpus(StdlibDocstrings(root=stdlib_root() / "json"), out, vocab_size=768, validation_fraction=0.3)
    return out


def run_config(name: str = "small", **overrides) -> dict:
    """A small run: UL2's seven configurations sized for 128-position rows."""
    config = {
        "name": name, "preset": "ul2", "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE, "seed": 7,
        "eval_steps": [4, 8, 12], "total_steps": 100, "validation_batches": 2,
    }
    config.update(overrides)
    return config


def write_runs(path: Path, *configs: dict) -> Path:
    path.write_text(yaml.safe_dump({"runs": list(configs)}))
    return path


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    return write_runs(tmp_path / "runs.yaml", run_config())


def server_env(corpus: Path, runs: Path | None = None, redis_url: str | None = None, **extra) -> dict[str, str]:
    """BIRDIE_* variables for a test server: thread pool (starts fast), quick drains."""
    env = {
        "BIRDIE_CORPUS": str(corpus),
        "BIRDIE_GENERATION_EXECUTOR": "thread",
        "BIRDIE_GENERATION_WORKERS": "2",
        "BIRDIE_DRAIN_INTERVAL_S": "0.2",
        "BIRDIE_LOG_LEVEL": "info",
    }
    if runs is not None:
        env["BIRDIE_RUN_FILES"] = str(runs)
    if redis_url is not None:
        env["BIRDIE_REDIS_URL"] = redis_url
    env.update({f"BIRDIE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def live_server(tmp_path: Path):
    """Factory of LiveServers that are all stopped at the end of the test."""
    servers: list[LiveServer] = []

    def make(env: dict[str, str], **kwargs) -> LiveServer:
        server = LiveServer(env, tmp_path, name=f"server{len(servers)}", **kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory):
    """One redis-server for the in-process route tests; each app gets its own key namespace, so tests
    never see each other's runs. (Durability is not what these tests check: no fsync.)"""
    if redis_server_binary() is None:  # as the `redis_server` fixture: no quiet skips
        reason = "redis-server binary not installed (`make test` installs it; or set BIRDIE_REDIS_SERVER to its path)"
        if os.environ.get("BIRDIE_ALLOW_NO_REDIS") == "1":
            pytest.skip(reason + "; skipped because BIRDIE_ALLOW_NO_REDIS=1")
        pytest.fail(reason + "; BIRDIE_ALLOW_NO_REDIS=1 skips these tests instead", pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("shared-redis"), appendfsync="no")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(params=["memory", "redis"])
async def app_client(request: pytest.FixtureRequest, corpus_path: Path, tmp_path: Path):
    """An in-process app (thread pool) and an httpx client on its ASGI transport; for quick route
    tests. Runs once on the in-process store and once on Redis (the shared redis-server, a fresh
    namespace per app, so every app starts from an empty store as an in-process one does). Yields a
    factory so a test can pass its own settings; `app_client.store` says which store it is."""
    from objective_server.app import create_app
    from server.policies_for_tests import register

    register()
    store: dict[str, object] = {}
    if request.param == "redis":
        redis_url = request.getfixturevalue("shared_redis").url
    opened = []

    async def make(**settings) -> httpx.AsyncClient:
        if request.param == "redis":
            store.update(redis_url=redis_url, redis_namespace=f"test-{uuid.uuid4().hex}")
        values = {
            "corpus": corpus_path, "generation_executor": "thread", "generation_workers": 1, "presets": [],
            "run_files": [write_runs(tmp_path / f"runs{len(opened)}.yaml", run_config())],
            **store, **settings,
        }
        app = create_app(Settings(**values))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
        opened.append((lifespan, client))
        return client

    make.store = request.param
    yield make
    for lifespan, client in reversed(opened):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
