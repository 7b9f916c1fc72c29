"""birdie-train against a live objective server (`birdie-server serve` in a subprocess): the loss
falls, losses reach the server, a resumed run continues with identical batches and state; and
the config, optimiser groups, schedule and checkpoints on their own."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import httpx
import pytest
import torch

from clients import BirdieClient
from trainer.models import build_model
from trainer.train import (
    TrainConfig,
    config_from_mapping,
    decays,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    lr_factor,
    main as train_main,
    parameter_groups,
    parse_args,
    resolve_device,
    train,
)

ARMS = [
    {"objective": "copying.len8", "probability": 1.0},
    {"objective": "next_token.len63", "probability": 1.0},
    {"objective": "selective_copying.spans1.after.span4to8.len48", "probability": 1.0},
]
FAMILIES = {"copying", "next_token", "selective_copying"}
TINY = dict(model="hawk", d_model=32, n_layers=2, bidirectional=True, threads=1, progress=False, prefetch=2, device="cpu")


def create_run(client: BirdieClient, name: str, total_steps: int, eval_steps: list[int], policy: str = "fixed") -> None:
    client.create_run({
        "name": name, "arms": ARMS, "seq_len": 64, "batch_size": 4, "seed": 3, "total_steps": total_steps,
        "eval_steps": eval_steps, "policy": {"name": policy},
    })


def counter(metrics_text: str, name: str, **labels: str) -> float:
    """A Prometheus counter's value (0 when the series does not exist yet)."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(label_text)}\}} (\S+)$", metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_loss_falls_and_losses_reach_the_server(server, client, tmp_path):
    create_run(client, "falls", total_steps=30, eval_steps=[5, 30])
    config = TrainConfig(**TINY, server_url=server.url, run_name="falls", lr=1e-2, warmup_steps=3,
                         metrics_file=str(tmp_path / "metrics.jsonl"))
    result = train(config)

    losses = [r["loss"] for r in result.history]
    assert [r["step"] for r in result.history] == list(range(30))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    assert result.failed_posts == 0
    # Every step's training post and both evaluations' validation posts were counted once.
    text = client.metrics()
    assert counter(text, "birdie_loss_posts_total", run="falls", split="train", status="accepted") == 30
    assert counter(text, "birdie_loss_posts_total", run="falls", split="validation", status="accepted") == 2
    # The server's aggregate of the last evaluation is the trainer's own validation loss.
    mixture = client.mixture("falls")
    last = result.validations[-1]
    assert last["step"] == 30 and set(last["losses"]) == {a["objective"] for a in ARMS}
    assert mixture.last_losses == pytest.approx(last["losses"], rel=1e-9)
    # Validation losses fell between the two evaluations.
    first = result.validations[0]["losses"]
    assert sum(last["losses"].values()) < sum(first.values())
    # The metrics file has one train record per step and one per evaluation.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 32
    assert all(0.0 <= r["data_wait"] <= 1.0 and r["tokens_per_s"] > 0 for r in result.history)
    assert set(result.history[0]["losses"]) <= {a["objective"] for a in ARMS}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["hawk", "gated_ssm"])
def test_cuda_training_with_bf16_autocast(server, client, model):
    """The GPU path end to end: CUDA scan kernels, bf16 autocast, fused AdamW, posts."""
    name = f"cuda-{model}"
    create_run(client, name, total_steps=30, eval_steps=[30])
    config = TrainConfig(**{**TINY, "model": model, "device": "cuda"}, server_url=server.url, run_name=name,
                         lr=1e-2, warmup_steps=3)
    result = train(config)
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    assert result.failed_posts == 0
    assert next(result.model.parameters()).device.type == "cuda"
    text = client.metrics()
    assert counter(text, "birdie_loss_posts_total", run=name, split="train", status="accepted") == 30
    assert client.mixture(name).last_losses == pytest.approx(result.validations[-1]["losses"], rel=1e-9)


def test_resume_continues_with_identical_batches_and_state(server, client, tmp_path):
    create_run(client, "resume", total_steps=6, eval_steps=[2, 4])
    base = dict(**TINY, server_url=server.url, run_name="resume", lr=5e-3, warmup_steps=2)
    straight = train(TrainConfig(**base, checkpoint_dir=str(tmp_path / "straight")))

    first_half = train(TrainConfig(**base, checkpoint_dir=str(tmp_path / "split"), stop_step=3))
    assert first_half.end_step == 3
    assert latest_checkpoint(tmp_path / "split").name == "step_00000003.pt"
    second_half = train(TrainConfig(**base, checkpoint_dir=str(tmp_path / "split"), resume="auto"))
    assert second_half.start_step == 3 and second_half.end_step == 6

    resumed_history = first_half.history + second_half.history
    assert [r["batch"] for r in resumed_history] == [r["batch"] for r in straight.history]
    assert [r["loss"] for r in resumed_history] == [r["loss"] for r in straight.history]
    assert [r["lr"] for r in resumed_history] == [r["lr"] for r in straight.history]
    for (name, a), b in zip(straight.model.state_dict().items(), second_half.model.state_dict().values()):
        assert torch.equal(a, b), name
    # The checkpoints at the end agree too, optimiser moments included.
    a = load_checkpoint(tmp_path / "straight" / "step_00000006.pt")
    b = load_checkpoint(tmp_path / "split" / "step_00000006.pt")
    assert a["step"] == b["step"] == 6
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    # The re-sent posts of the resumed half were duplicates, not double counts.
    text = client.metrics()
    assert counter(text, "birdie_loss_posts_total", run="resume", split="train", status="accepted") == 6
    model, saved = load_model(tmp_path / "split" / "step_00000006.pt")
    assert saved["run"] == "resume" and saved["world_size"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), straight.model.parameters()))


def test_resume_uses_this_jobs_lr_betas_and_weight_decay(server, client, tmp_path, caplog):
    create_run(client, "retune", total_steps=6, eval_steps=[6])
    base = dict(**TINY, server_url=server.url, run_name="retune", warmup_steps=2)
    train(TrainConfig(**base, lr=5e-3, checkpoint_dir=str(tmp_path), stop_step=3))
    checkpoint = tmp_path / "step_00000003.pt"
    start = load_checkpoint(checkpoint)["model"]
    # One more step from the same state and batch: AdamW's update is proportional to the lr used.
    steps = {lr: train(TrainConfig(**base, lr=lr, resume=str(checkpoint), stop_step=4)) for lr in (5e-3, 1e-3)}
    assert steps[1e-3].history[0]["lr"] == pytest.approx(1e-3 * lr_factor(3, 2, 6, 0.1))
    old, new = (steps[lr].model.state_dict() for lr in (5e-3, 1e-3))
    for name, before in start.items():
        torch.testing.assert_close(new[name] - before, (old[name] - before) * 0.2, rtol=1e-3, atol=1e-6, msg=name)

    caplog.set_level(logging.INFO, logger="birdie.train")
    retuned = train(TrainConfig(**base, lr=1e-3, betas=[0.8, 0.9], weight_decay=0.05, resume=str(checkpoint),
                                checkpoint_dir=str(tmp_path / "retuned")))
    assert "hyperparameters changed on resume: lr 0.005 -> 0.001, weight_decay 0.1 -> 0.05, " \
           "betas [0.9, 0.95] -> [0.8, 0.9]" in caplog.text
    assert [r["lr"] for r in retuned.history] == pytest.approx([1e-3 * lr_factor(s, 2, 6, 0.1) for s in (3, 4, 5)])
    saved = load_checkpoint(tmp_path / "retuned" / "step_00000006.pt")
    assert saved["scheduler"]["base_lrs"] == [1e-3, 1e-3]
    decayed, free = saved["optimizer"]["param_groups"]
    assert decayed["initial_lr"] == free["initial_lr"] == 1e-3 and decayed["lr"] == pytest.approx(1e-4)
    assert tuple(decayed["betas"]) == tuple(free["betas"]) == (0.8, 0.9)
    assert decayed["weight_decay"] == 0.05 and free["weight_decay"] == 0.0


def test_resume_after_a_crash_keeps_each_metrics_record_once(server, client, tmp_path):
    create_run(client, "crashed", total_steps=6, eval_steps=[2, 4])
    metrics = tmp_path / "metrics.jsonl"
    base = dict(**TINY, server_url=server.url, run_name="crashed", checkpoint_dir=str(tmp_path / "ckpt"),
                checkpoint_interval=2, metrics_file=str(metrics))
    first = train(TrainConfig(**base, stop_step=4))
    # The crash: after step 3 and evaluation 4, before checkpoint 4 was written, in the middle of a line.
    (tmp_path / "ckpt" / "step_00000004.pt").unlink()
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "st')
    second = train(TrainConfig(**base, resume="auto"))
    assert second.start_step == 2

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 0), ("train", 1), ("validation", 2), ("train", 2), ("train", 3), ("validation", 4),
        ("train", 4), ("train", 5),
    ]
    # Kept from the first session, then the second session's own.
    assert [r["batch"] for r in records if r["kind"] == "train"] == (
        [r["batch"] for r in first.history[:2]] + [r["batch"] for r in second.history])
    assert records[2]["losses"] == first.validations[0]["losses"]
    assert records[5]["losses"] == second.validations[0]["losses"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "metrics.jsonl"]


def test_resume_refuses_another_world_size(server, client, tmp_path):
    create_run(client, "guard", total_steps=2, eval_steps=[2])
    config = TrainConfig(**TINY, server_url=server.url, run_name="guard", checkpoint_dir=str(tmp_path), stop_step=1)
    train(config)
    path = latest_checkpoint(tmp_path)
    state = load_checkpoint(path)
    state["world_size"] = 2
    torch.save(state, path)
    with pytest.raises(ValueError, match="world_size"):
        train(TrainConfig(**TINY, server_url=server.url, run_name="guard", checkpoint_dir=str(tmp_path), resume="auto"))


def test_resume_refuses_another_model_config(server, client, tmp_path):
    create_run(client, "remodel", total_steps=2, eval_steps=[2])
    base = dict(**TINY, server_url=server.url, run_name="remodel", checkpoint_dir=str(tmp_path))
    train(TrainConfig(**{**base, "bidirectional": False}, stop_step=1))
    # Causal and bidirectional Hawk have the same parameter shapes: only the stored config tells them apart.
    for changed, message in (({}, r"bidirectional=False \(this job's: True\)"),
                             ({"bidirectional": False, "model_options": {"gate_exponent": 4.0}},
                              r"gate_exponent=8\.0 \(this job's: 4\.0\)"),
                             ({"bidirectional": False, "d_model": 48}, r"d_model=32 \(this job's: 48\)")):
        with pytest.raises(ValueError, match=message):
            train(TrainConfig(**{**base, **changed}, resume="auto"))
    resumed = train(TrainConfig(**{**base, "bidirectional": False}, resume="auto"))
    assert resumed.start_step == 1 and resumed.model.config.bidirectional is False
    assert load_checkpoint(latest_checkpoint(tmp_path))["model_config"]["bidirectional"] is False


def test_create_run_from_the_config(server, client):
    config = TrainConfig(**TINY, server_url=server.url, run_name="created", create_run=True, preset="ntp", seq_len=128,
                         batch_size=2, policy="fixed", steps=2, eval_steps=[1])
    result = train(config)
    info = client.run("created")
    assert info.config["seq_len"] == 128 and info.config["total_steps"] == 2 and info.eval_steps == [1]
    assert result.end_step == 2 and len(result.validations) == 1


def test_run_fields_that_differ_from_the_existing_run_are_an_error(server, client, tmp_path, capsys):
    create_run(client, "shaped", total_steps=2, eval_steps=[2])
    base = dict(**TINY, server_url=server.url, run_name="shaped")
    with pytest.raises(ValueError, match=r"run 'shaped' already exists with other settings: --seq-len 128 "
                                         r"\(the run has 64\); --policy birdie \(the run has fixed\)\. .*--create-run"):
        train(TrainConfig(**base, seq_len=128, batch_size=4, policy="birdie"))
    for fields in ({"batch_size": 8}, {"run_seed": 0}, {"eval_steps": [1, 2]}, {"validation_batches": 2},
                   {"preset": "ntp"}):
        with pytest.raises(ValueError, match=f"--{next(iter(fields)).replace('_', '-')} "):
            train(TrainConfig(**base, **fields))
    # The run's own values pass, and so does leaving them out.
    result = train(TrainConfig(**base, seq_len=64, batch_size=4, run_seed=3, policy="fixed", eval_steps=[2],
                               validation_batches=1, stop_step=1))
    assert result.end_step == 1
    # Evaluation steps are compared as the run stores them, not as cut at its total_steps.
    create_run(client, "cut", total_steps=2, eval_steps=[2, 4])
    assert train(TrainConfig(**{**base, "run_name": "cut"}, eval_steps=[2, 4], stop_step=1)).end_step == 1
    # From the command line: a clear error, no traceback.
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--server-url", server.url, "--run-name", "shaped", "--seq-len", "128", "--device", "cpu",
                    "--no-progress"])
    assert exit_info.value.code == 2
    assert "birdie-train: error: run 'shaped' already exists with other settings: --seq-len 128" in capsys.readouterr().err
    # Creating a run: unset run fields take RUN_DEFAULTS.
    assert TrainConfig(run_name="x", create_run=True, steps=5, seq_len=128).run_config() == {
        "name": "x", "preset": "birdie", "seq_len": 128, "batch_size": 8, "seed": 0, "policy": {"name": "birdie"},
        "total_steps": 5, "validation_batches": 1,
    }


def test_validation_reaches_the_console_and_the_summary(server, client, capsys, caplog):
    create_run(client, "console", total_steps=2, eval_steps=[1, 2])
    caplog.set_level(logging.INFO, logger="birdie.train")
    train_main(["--server-url", server.url, "--run-name", "console", "--d-model", "32", "--n-layers", "2",
                "--device", "cpu", "--threads", "1", "--no-progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = summary["validation"]
    assert last["step"] == 2 and set(last["family_loss"]) == set(last["family_accuracy"]) == FAMILIES
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation at step")]
    assert [line.split(":")[0] for line in lines] == ["validation at step 1", "validation at step 2"]
    assert lines[-1] == "validation at step 2: " + ", ".join(
        f"{family} {last['family_loss'][family]:.3f} ({last['family_accuracy'][family]:.1%})" for family in sorted(FAMILIES))


def test_log_lines_start_their_own_line_under_the_progress_bar(server, client, capsys, caplog):
    create_run(client, "barred", total_steps=2, eval_steps=[1, 2])
    caplog.set_level(logging.INFO, logger="birdie.train")
    console = logging.StreamHandler(sys.stderr)  # what main's logging.basicConfig installs
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.root.addHandler(console)
    try:
        train(TrainConfig(**{**TINY, "progress": True}, server_url=server.url, run_name="barred"))
    finally:
        logging.root.removeHandler(console)
    err = capsys.readouterr().err
    assert "train barred:" in err  # the bar was drawn
    # Written past the bar, a line would follow its text ("... 1/2 [00:00<...]INFO ...").
    lines = re.findall(r"(?:^|[\r\n])INFO birdie.train: validation at step (\d)", err)
    assert lines == ["1", "2"] and err.count("validation at step") == 2


def test_unknown_run_is_a_clear_error(server):
    from clients import NotFoundError

    with pytest.raises(NotFoundError):
        train(TrainConfig(**TINY, server_url=server.url, run_name="no-such-run"))


def test_resume_from_a_file_that_is_not_a_checkpoint_is_one_clear_line(server, client, not_checkpoints, capsys):
    create_run(client, "unreadable", total_steps=2, eval_steps=[2])
    for path in not_checkpoints.values():
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--server-url", server.url, "--run-name", "unreadable", "--resume", str(path), "--d-model", "32",
                        "--n-layers", "2", "--device", "cpu", "--threads", "1", "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"birdie-train: error: {path} is not a birdie-train checkpoint: ")
        assert "weights_only" not in err and "Traceback" not in err


# --- config ------------------------------------------------------------------------------------


def test_config_from_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: gated_ssm\nd_model: 64\nlr: 0.001\neval_steps: [10, 50]\nmodel_options: {state_width: 32}\n")
    config = parse_args(["--config", str(path), "--lr", "0.02", "--no-bidirectional", "--steps", "7", "--resume", "none"])
    assert config.model == "gated_ssm" and config.d_model == 64
    assert config.lr == 0.02 and config.bidirectional is False and config.steps == 7 and config.resume is None
    assert config.eval_steps == [10, 50] and config.model_options == {"state_width": 32}
    assert parse_args(["--eval-steps", "[1, 2]"]).eval_steps == [1, 2]
    assert parse_args(["--server-url", "http://h:1/{x"]).server_url == "http://h:1/{x"
    assert parse_args(["--steps", "none"]).steps is None
    # --run names the run as birdie-eval's flag does (a prefix of --run-name and --run-seed before)
    assert parse_args(["--run", "ablation", "--run-seed", "3"]).run_name == "ablation"


def test_config_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lr", "fast"])
    assert "--lr: expected float" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a usage line and the error, not every field's flag
        parse_args(["--wrong"])
    assert capsys.readouterr().err.splitlines() == [
        "usage: birdie-train [--config FILE] [--FIELD VALUE ...]  (every field: birdie-train --help)",
        "birdie-train: error: unrecognized arguments: --wrong"]
    for flags, message in ((["--eval-steps", "[1, 2"], "--eval-steps: expected a YAML list"),
                           (["--lr", "none"], "--lr: expected float"),
                           (["--model-options", "[1]"], "--model-options: expected a YAML dict")):
        with pytest.raises(SystemExit):
            parse_args(flags)
        assert message in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert "unknown config key(s) ['learning_rate']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="creating a run needs steps"):
        TrainConfig(create_run=True)
    with pytest.raises(ValueError, match="lr"):
        config_from_mapping({"lr": -1.0})
    with pytest.raises(ValueError, match="no checkpoint file"):
        TrainConfig(resume=str(tmp_path / "missing.pt"))


def test_malformed_yaml_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    for content, problem in ((b"lr: [oops\n", "while parsing a flow sequence: expected ',' or ']', but got '<stream end>' "
                                               "(line 2, column 1)"),
                             (b"lr: 1\n\xff\n", "unacceptable character #x00ff: invalid start byte")):
        path.write_bytes(content)
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--config", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"birdie-train: error: {path}: not valid YAML: {problem}")


def test_yaml_values_are_coerced_like_flags(tmp_path, capsys):
    # PyYAML (YAML 1.1) reads 3e-4 as a string and 0 as an int; both are floats here, as from flags.
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3e-4\nweight_decay: 0\nbetas: [9e-1, 0.95]\neval_steps: [10, 50]\nsteps: none\n")
    config = parse_args(["--config", str(path)])
    assert config.lr == 3e-4 and type(config.lr) is float
    assert config.weight_decay == 0.0 and type(config.weight_decay) is float
    assert config.betas == [0.9, 0.95] and config.eval_steps == [10, 50] and config.steps is None
    assert config_from_mapping({"lr": "1e-3", "steps": "7"}).lr == 1e-3
    for text, message in (("lr: fast\n", "lr: expected float, got 'fast'"), ("steps: 2.5\n", "steps: expected int"),
                          ("betas: [a, 0.9]\n", "betas: expected float, got 'a'"),
                          ("bidirectional: maybe\n", "bidirectional: expected bool"),
                          ("eval_steps: 10\n", "eval_steps: expected list")):
        path.write_text(text)
        with pytest.raises(SystemExit):
            parse_args(["--config", str(path)])
        assert f"{path}: {message}" in capsys.readouterr().err


def test_an_unknown_device_is_one_clear_line(capsys):
    for name in ("gpu", "cuda:x", "meta"):
        with pytest.raises(ValueError, match=f"^device must be auto, cpu, cuda or cuda:N, got '{name}'$"):
            resolve_device(name)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--server-url", "http://127.0.0.1:9", "--device", "gpu", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "birdie-train: error: device must be auto, cpu, cuda or cuda:N, got 'gpu'"
    assert "Traceback" not in err


def test_help_explains_the_flags_and_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for meaning in ("--lr LR peak learning rate (default: 0.003)", "--d-model D_MODEL model width (default: 256)",
                    "--bidirectional, --no-bidirectional read the prefix bidirectionally",
                    "--grad-clip GRAD_CLIP clip the gradient norm to this (0: no clipping)",
                    "--model {gated_ssm,hawk,transformer} architecture", "--policy POLICY the run's mixture policy: birdie, exp3 or fixed",
                    "--device {auto,cpu,cuda,cuda:N}", "--resume {FILE,auto} continue from a checkpoint file",
                    "examples: birdie-train --run-name demo", "torchrun --nproc_per_node 2 -m trainer.train",
                    "birdie-train --config run.yaml --lr 1e-3",
                    "--seq-len SEQ_LEN the run's row length in tokens (default: 512); applies when creating a run",
                    "--server-url SERVER_URL the objective server (default: $BIRDIE_SERVER_URL, else "
                    "http://127.0.0.1:8000); an API token, if it wants one, comes from $BIRDIE_API_TOKEN"):
        assert meaning in text
    with pytest.raises(SystemExit):
        parse_args(["--model", "mamba"])
    assert "argument --model: invalid choice: 'mamba'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model='mamba'"):
        config_from_mapping({"model": "mamba"})


# --- optimiser and schedule ----------------------------------------------------------------------


def test_no_weight_decay_on_gates_rglru_norms_and_biases():
    model = build_model("hawk", vocab_size=64, d_model=16, n_layers=2, bidirectional=True)
    names = {name for name, p in model.named_parameters() if not decays(name, p)}
    assert "blocks.0.mixer.rg_lru.decay" in names  # Lambda
    assert "blocks.0.mixer.rg_lru.gates.weight" in names and "blocks.0.mixer.rg_lru.gates.bias" in names
    assert "blocks.0.mixer_norm.weight" in names and "blocks.0.mixer.conv.bias" in names
    decayed = {name for name, p in model.named_parameters() if decays(name, p)}
    assert {"embed.weight", "blocks.0.mixer.in_proj.weight", "blocks.0.mlp.down.weight"} <= decayed
    # The gated SSM's recurrence gates (input, forget) are kept apart from its value and
    # output projections, so they too are free of decay.
    ssm = build_model("gated_ssm", vocab_size=64, d_model=16, n_layers=2, bidirectional=True)
    ssm_free = {name for name, p in ssm.named_parameters() if not decays(name, p)}
    assert {"blocks.0.mixer.gates.weight", "blocks.0.mixer.gates.bias"} <= ssm_free
    assert "blocks.0.mixer.in_proj.weight" not in ssm_free
    groups = parameter_groups(model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lr_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[12] == pytest.approx(0.55)  # halfway through the cosine
    assert factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


# --- checkpoints -----------------------------------------------------------------------------------


def test_load_checkpoint_refuses_other_files_without_torchs_unsafe_advice(not_checkpoints, tmp_path):
    # torch's own errors advise weights_only=False, which would run the file's code.
    for path in not_checkpoints.values():
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not a birdie-train checkpoint: torch.load "
                                             "cannot read it") as error:
            load_checkpoint(path)
        assert "weights_only" not in str(error.value)
    other = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="is not a birdie-train checkpoint: not a mapping of format 1"):
        load_checkpoint(other)


# --- report ----------------------------------------------------------------------------------------


def test_report_json_and_png_from_a_run(server, client, tmp_path):
    from trainer.report import build_report, write_report

    create_run(client, "reported", total_steps=4, eval_steps=[2, 4])
    config = TrainConfig(**TINY, server_url=server.url, run_name="reported")
    result = train(config)
    run = client.run("reported").model_dump()
    history = client.mixture_history("reported").model_dump()
    report = build_report(config=config, run=run, result=result, evaluation={"copying_accuracy": 0.5},
                          mixture_history=history)
    json_path, png_path = write_report(report, tmp_path / "out")

    saved = json.loads(json_path.read_text())
    assert saved["run"] == "reported" and saved["config"]["train"]["run_name"] == "reported"
    assert saved["config"]["run"]["eval_steps"] == [2, 4]
    assert [r["step"] for r in saved["losses"]["train"]] == [0, 1, 2, 3]
    assert [v["step"] for v in saved["losses"]["validation"]] == [2, 4]
    assert set(saved["losses"]["validation"][0]["family_losses"]) == {"copying", "next_token", "selective_copying"}
    for entry in saved["mixture_history"]["families"]:
        assert sum(entry["families"].values()) == pytest.approx(1.0)
    assert saved["throughput"]["tokens_per_s"] > 0 and 0 <= saved["throughput"]["data_wait"] <= 1
    assert saved["evaluation"] == {"copying_accuracy": 0.5}
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# --- the main job ----------------------------------------------------------------------------------


def test_main_job_evaluation_schedule():
    from trainer.main_job import evaluation_steps

    assert evaluation_steps(240, 7) == [10, 17, 29, 49, 83, 141, 240]
    assert evaluation_steps(5, 3) == [5]
    steps = evaluation_steps(1000, 5)
    assert steps[0] == 10 and steps[-1] == 1000 and steps == sorted(set(steps)) and len(steps) == 5


def test_main_job_help_explains_every_option_and_its_default(capsys):
    from trainer.main_job import parse_args as main_job_args

    with pytest.raises(SystemExit):
        main_job_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for meaning in ("--seq-len SEQ_LEN the run's row length in tokens (default: 256)",
                    "--batch-size BATCH_SIZE the run's rows per step (default: 8)",
                    "--d-model D_MODEL Hawk's width (default: 128)",
                    "--n-layers N_LAYERS number of Hawk blocks (default: 4)", "--lr LR peak learning rate (default: 0.003)",
                    "--policy POLICY the run's mixture policy: birdie, exp3 or fixed, checked by the server "
                    "(default: birdie)",
                    "comes from $BIRDIE_API_TOKEN (default: start one)",
                    "--seed SEED seed of the model's initialisation, the run's data and the phone books (default: 0)"):
        assert meaning in text


def test_main_job_against_a_server_needs_only_the_trainers_dependencies(server, tmp_path):
    # The server's own dependencies, absent from a trainer-only install: importing them fails.
    server_only = ("redis", "numba", "fastapi", "uvicorn", "pydantic_settings", "prometheus_client", "orjson")
    code = f"import sys; sys.modules.update(dict.fromkeys({server_only!r})); import trainer.main_job as m; m.main(sys.argv[1:])"
    job = subprocess.run(
        [sys.executable, "-c", code, "--server-url", server.url, "--name", "trainer-only", "--out", str(tmp_path),
         "--steps", "2", "--seq-len", "128", "--batch-size", "2", "--d-model", "32", "--n-layers", "2",
         "--evaluations", "1", "--validation-rows", "1", "--finetune-steps", "0", "--phone-book-numbers", "",
         "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    report = json.loads((tmp_path / "trainer-only" / "report.json").read_text())
    assert report["config"]["train"]["policy"] == report["final_mixture"]["policy"] == "birdie"


def test_main_job_end_to_end(tmp_path, capsys):
    from trainer.main_job import main as main_job

    main_job(["--name", "tiny", "--out", str(tmp_path), "--steps", "12", "--seq-len", "128", "--batch-size", "2",
              "--d-model", "32", "--n-layers", "2", "--evaluations", "2", "--validation-rows", "1",
              "--finetune-steps", "2", "--finetune-numbers", "1", "--phone-book-numbers", "1", "--phone-book-entries", "2",
              "--phone-book-examples", "1", "--threads", "1"])
    assert f"report: {tmp_path / 'tiny' / 'report.json'}" in capsys.readouterr().out
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert report["steps"]["end"] == 12 and report["config"]["run"]["preset"] == "birdie"
    assert report["final_mixture"]["policy"] == report["config"]["train"]["policy"]
    assert len(report["losses"]["validation"]) == 2 and len(report["evaluation"]["phone_book_finetuned"]) == 1
    assert len(report["evaluation"]["validation"]["loss"]) == len(report["config"]["run"]["arms"])
    assert (tmp_path / "tiny" / "report.png").stat().st_size > 10_000
    assert (tmp_path / "tiny" / "checkpoints" / "step_00000012.pt").exists()


def test_local_server_moves_to_another_port_when_its_free_port_is_taken_first(tmp_path):
    """The main job's server picks a free port, then binds it: another process can take it in
    between. The server must then move to another port, not fail the job."""
    import socket

    from trainer.main_job import LocalServer

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = LocalServer(tmp_path / "server.log")
        server.port = squatter.getsockname()[1]  # as if taken between choosing and binding
        with server:
            assert server.port != squatter.getsockname()[1]
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        assert "address already in use" in server.log_tail().lower()
