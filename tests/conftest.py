"""Shared fixtures: a real redis-server per test, and the asyncio backend for anyio-marked tests."""

from __future__ import annotations

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
        pytest.skip("redis-server binary not installed (set BIRDIE_REDIS_SERVER to its path)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()
