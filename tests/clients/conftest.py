"""Fixtures for the client tests: a stand-in objective server on a loopback port reserved for it."""

from __future__ import annotations

import pytest

from fake_birdie_server import FakeBirdieServer


@pytest.fixture
def server():
    fake = FakeBirdieServer().start()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def down_server():
    """A server that is not listening yet (connection refused); the test calls `start()`."""
    fake = FakeBirdieServer()
    try:
        yield fake
    finally:
        fake.close()
