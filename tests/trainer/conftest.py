"""Fixtures of the trainer tests: a live objective server, and files that are not checkpoints."""

from __future__ import annotations

import pytest
import torch

from clients import BirdieClient
from trainer.main_job import LocalServer
from trainer.models import build_model
from trainer.train import CHECKPOINT_FORMAT


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`birdie-server serve` on a free loopback port (in-process store, default corpus), shared by the session
    (each test module uses its own run names)."""
    with LocalServer(tmp_path_factory.mktemp("server") / "server.log") as live:
        yield live


@pytest.fixture(scope="session")
def client(server):
    with BirdieClient(server.url) as c:
        yield c


@pytest.fixture
def not_checkpoints(tmp_path) -> dict:
    """Files a checkpoint path may name by mistake: text, an empty file, a checkpoint cut short."""
    text = tmp_path / "README.md"
    text.write_text("# Birdie\n\nNot a checkpoint.\n")
    empty = tmp_path / "empty.pt"
    empty.touch()
    cut = tmp_path / "step_00000002.pt"
    model = build_model("hawk", vocab_size=64, d_model=16, n_layers=1)
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict()}, cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return {"text": text, "empty": empty, "cut short": cut}
