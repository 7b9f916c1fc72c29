"""Shared fixtures: a real redis-server per test, and the asyncio backend for anyio-marked tests."""

from __future__ import annotations

import os

import pytest

from redis_server import RedisServer, redis_server_binary


@pytest.fixture
def anyio_backend() -> str:
    # anyio's pytest plugin runs `@pytest.mark.anyio` tests; only asyncio is installed.
    return "asyncio"


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A fresh redis-server (AOF, appendfsync always) on a free loopback port; killed afterwards."""
    if redis_server_binary() is None:
        # A missing binary must not quietly turn the real-Redis half of the suite into skips.
        reason = "redis-server binary not installed (`make test` installs it; or set BIRDIE_REDIS_SERVER to its path)"
        if os.environ.get("BIRDIE_ALLOW_NO_REDIS") == "1":
            pytest.skip(reason + "; skipped because BIRDIE_ALLOW_NO_REDIS=1")
        pytest.fail(reason + "; BIRDIE_ALLOW_NO_REDIS=1 skips these tests instead", pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()
