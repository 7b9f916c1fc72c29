"""birdie-train under torchrun with two processes (CPU on gloo; two GPUs on NCCL where a machine has
them), against a live objective server:
each rank asks for its own batches, posts its own losses (the server counts both ranks and
aggregates validation over them), and the DDP update equals one process training on both ranks'
batches together (the loss is token-weighted over all ranks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import BirdieClient
from trainer.evaluate import batch_tensors, forward_logits, token_losses
from trainer.models import build_model
from trainer.models.common import IGNORE_INDEX
from trainer.train import TrainConfig, batch_digest, load_checkpoint, make_optimizer

ARMS = [
    {"objective": "copying.len8", "probability": 1.0},
    {"objective": "next_token.len63", "probability": 1.0},
    {"objective": "selective_copying.spans1.after.span4to8.len48", "probability": 1.0},
]
STEPS = 3
MODEL = {"d_model": 32, "n_layers": 2, "bidirectional": True}


def counter(metrics_text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(label_text)}\}} (\S+)$", metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="NCCL with two ranks needs two CUDA devices")]),
])
def test_two_ranks(server, tmp_path, device):
    with BirdieClient(server.url) as client:
        client.create_run({"name": f"ddp-{device}", "arms": ARMS, "seq_len": 64, "batch_size": 2, "seed": 5,
                           "total_steps": STEPS, "eval_steps": [1, STEPS], "policy": {"name": "fixed"}})
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "trainer.train",
        "--server-url", server.url, "--run-name", f"ddp-{device}", "--device", device, "--threads", "1", "--no-progress", "--lr", "0.01",
        "--warmup-steps", "1", "--d-model", str(MODEL["d_model"]), "--n-layers", str(MODEL["n_layers"]),
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-file", str(tmp_path / "metrics.jsonl"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIRDIE_")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == [0, STEPS] and summary["failed_posts"] == 0, done.stderr[-3000:]
    assert summary["validation"]["step"] == STEPS
    assert set(summary["validation"]["family_loss"]) == {"copying", "next_token", "selective_copying"}

    with BirdieClient(server.url) as client:
        text = client.metrics()
        # Both ranks posted every step and both evaluations; each evaluation completed once.
        assert counter(text, "birdie_loss_posts_total", run=f"ddp-{device}", split="train", status="accepted") == 2 * STEPS
        assert counter(text, "birdie_loss_posts_total", run=f"ddp-{device}", split="validation", status="accepted") == 4
        assert counter(text, "birdie_policy_updates_total", run=f"ddp-{device}", split="validation") == 2
        # Each rank scored a share of the configurations; the aggregate covers all of them.
        assert set(client.mixture(f"ddp-{device}").last_losses) == {a["objective"] for a in ARMS}

        # The metrics' validation records hold both ranks' shares: every configuration, as the server aggregated them.
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        validations = [r for r in records if r["kind"] == "validation"]
        assert [r["step"] for r in validations] == [1, STEPS]
        for record in validations:
            assert set(record["losses"]) == {a["objective"] for a in ARMS}
            assert set(record["accuracy"]) == set(record["tokens"]) == set(record["losses"])
        assert validations[-1]["losses"] == pytest.approx(client.mixture(f"ddp-{device}").last_losses, rel=1e-9)

        # Rank 0 trained on rank 0's batches; rank 1's are different ones.
        train_records = [r for r in records if r["kind"] == "train"]
        assert [r["step"] for r in train_records] == list(range(STEPS))
        batches = [[client.batch(f"ddp-{device}", step, rank, 2) for rank in range(2)] for step in range(STEPS)]
        for record, (rank0, rank1) in zip(train_records, batches):
            assert record["batch"] == batch_digest(rank0["input_ids"])
            assert record["batch"] != batch_digest(rank1["input_ids"])

    # One process on both ranks' rows at once takes the same steps as the two DDP ranks.
    state = load_checkpoint(tmp_path / "ckpt" / f"step_{STEPS:08d}.pt")
    assert state["world_size"] == 2
    config = TrainConfig(**state["config"])
    torch.manual_seed(config.init_seed)
    vocab_size = state["model_config"]["vocab_size"]
    model = build_model("hawk", vocab_size=vocab_size, **MODEL).to(device)
    optimizer, scheduler = make_optimizer(model, config, STEPS, torch.device(device))
    first_loss = None
    for rank0, rank1 in batches:
        both = batch_tensors({name: np.concatenate([rank0[name], rank1[name]]) for name in rank0.arrays}, device)
        labels = both["label_ids"]
        loss = token_losses(forward_logits(model, both), labels).sum() / (labels != IGNORE_INDEX).sum()
        first_loss = first_loss if first_loss is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
    # float32 on the CPU; bf16 autocast and another reduction order on GPUs
    rtol, atol = (1e-5, 1e-6) if device == "cpu" else (2e-2, 2e-3)
    assert first_loss == pytest.approx(train_records[0]["loss"], rel=rtol)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(state["model"][name], value.cpu(), rtol=rtol, atol=atol, msg=name)
