"""Fixtures of the trainer tests that talk to a live objective server."""

from __future__ import annotations

import pytest

from clients import BirdieClient
from trainer.main_job import LocalServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`birdie-server serve` on a free loopback port (in-process store, default corpus), per module."""
    with LocalServer(tmp_path_factory.mktemp("server") / "server.log") as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with BirdieClient(server.url) as c:
        yield c
