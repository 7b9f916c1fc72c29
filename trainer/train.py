"""birdie-train: train a model on batches from the Birdie objective server.

    birdie-train --run-name demo --create-run --preset birdie --seq-len 256 --steps 300 --model hawk
    birdie-train --config run.yaml --lr 1e-3                     # YAML, then flags override
    torchrun --nproc_per_node 2 -m trainer.train --run-name demo # DDP: each rank asks for its batches

One loop, top to bottom:
1. The run: created from the config when asked (POST /runs; the same config again is a no-op), then
   read back (vocabulary, evaluation steps, objective configurations).
2. The model, AdamW (no weight decay on gates, RG-LRU parameters, norms and biases), a cosine
   schedule with linear warmup; a checkpoint restores all of it (model, optimiser, schedule,
   step, RNG) and training continues at its step, under this job's lr, betas and weight decay.
3. Batches: `clients.BatchIterator` fetches this rank's addressed batches (run, rank,
   world_size, step) ahead of use; resuming at step s asks for step s, so a resumed run sees
   exactly the batches a straight run would have.
4. Each step: forward (bf16 autocast on GPU), token-weighted cross-entropy over the suffix
   tokens of all ranks, backward, gradient clipping, optimiser and schedule step. The
   per-configuration losses of this rank's batch are posted (`LossPoster`, never blocking).
5. At the run's evaluation steps: per-configuration validation losses on the server's fixed
   validation batches, each rank scoring its share of the configurations and posting them with
   split="validation" (the server aggregates the ranks token-weighted and updates the mixture);
   the ranks' sums are reduced for the metrics, so they cover every configuration.
6. Progress bar (loss, tokens/s, share of step time spent waiting for data), a JSON Lines
   metrics file and checkpoints.

Evaluation s happens after training step s-1, i.e. after s steps; a checkpoint at s is written
after it, so a resume from s neither repeats nor skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer.evaluate import (
    batch_tensors,
    fetch_validation_batches,
    forward_logits,
    per_objective_sums,
    score_batches,
    token_losses,
)
from clients.plot import family_means
from trainer.models import MODELS, LanguageModel, build_model
from trainer.models.common import IGNORE_INDEX

log = logging.getLogger("birdie.train")

CHECKPOINT_FORMAT = 1


# The run fields of a run created with create_run when TrainConfig leaves them unset (eval_steps: the
# server's schedule).
RUN_DEFAULTS = {"preset": "birdie", "seq_len": 512, "batch_size": 8, "run_seed": 0, "policy": "birdie",
                "eval_steps": None, "validation_batches": 1}


@dataclass
class TrainConfig:
    """Every setting of a training job; each field is a flag (`--d-model`) and a YAML key (`d_model`),
    its metadata the flag's --help text and argparse options."""

    # model (vocab_size comes from the run)
    model: str = field(default="hawk", metadata={"help": "architecture", "choices": sorted(MODELS)})
    d_model: int = field(default=256, metadata={"help": "model width"})
    n_layers: int = field(default=4, metadata={"help": "number of blocks"})
    bidirectional: bool = field(default=True, metadata={
        "help": "read the prefix bidirectionally (Birdie's setting); --no-bidirectional: causal throughout"})
    model_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "other fields of the model's config, a YAML mapping (e.g. {rnn_width: 384})"})
    init_seed: int = field(default=0, metadata={"help": "seed of the model's initialisation"})
    # the server and the run
    server_url: str | None = field(default=None, metadata={
        "help": "the objective server (default: $BIRDIE_SERVER_URL, else http://127.0.0.1:8000); an API token, "
                "if it wants one, comes from $BIRDIE_API_TOKEN"})
    run_name: str = field(default="birdie", metadata={
        "help": "the run to train on"})
    create_run: bool = field(default=False, metadata={
        "help": "create the run first (POST /runs) from the run fields below and total_steps = --steps; "
                "the same config again is a no-op"})
    # The run fields (RUN_DEFAULTS) shape a run created with create_run; an existing run has its
    # own, and a value set here that differs from the run's is an error rather than ignored.
    preset: str | None = field(default=None, metadata={"help": "the run's objective preset (birdie, ul2, ...)"})
    seq_len: int | None = field(default=None, metadata={"help": "the run's row length in tokens"})
    batch_size: int | None = field(default=None, metadata={"help": "the run's rows per rank and step"})
    run_seed: int | None = field(default=None, metadata={"help": "the run's data seed"})
    # Not checked here: the trainer does not import the server's policies (nor their dependencies).
    policy: str | None = field(default=None, metadata={
        "help": "the run's mixture policy: birdie, exp3 or fixed (checked by the server)"})
    eval_steps: list[int] | None = field(default=None, metadata={
        "help": "the run's evaluation steps, a YAML list (default: Birdie's schedule scaled to the run)"})
    validation_batches: int | None = field(default=None, metadata={
        "help": "the run's validation batches per configuration, kept by the server (all are scored)"})
    validation_rows: int | None = field(default=None, metadata={
        "help": "score only the first rows of each validation batch (cheaper on a CPU; default: all)"})
    steps: int | None = field(default=None, metadata={
        "help": "training steps, the span of the lr schedule (default: the run's total_steps)"})
    stop_step: int | None = field(default=None, metadata={
        "help": "end this session after this step (the schedule still spans --steps)"})
    # optimisation
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine schedule ends at lr * min_lr_ratio"})
    warmup_steps: int = field(default=20, metadata={"help": "steps of linear lr warmup"})
    weight_decay: float = field(default=0.1, metadata={
        "help": "AdamW weight decay (none on gates, RG-LRU parameters, norms and biases)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "AdamW betas, a YAML list"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    # evaluation, checkpoints, metrics
    evaluate: bool = field(default=True, metadata={"help": "validation losses at the run's evaluation steps"})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "where checkpoints go (default: none)"})
    checkpoint_interval: int = field(default=0, metadata={
        "help": "checkpoint every this many steps (0: only at the end)"})
    resume: str | None = field(default=None, metadata={
        "help": "continue from a checkpoint file, or auto: the latest in --checkpoint-dir if any",
        "metavar": "{FILE,auto}"})
    metrics_file: str | None = field(default=None, metadata={
        "help": "JSON Lines file of per-step and validation records, written by rank 0"})
    # runtime
    device: str = field(default="auto", metadata={
        "help": "auto: CUDA when available; a DDP rank on cuda takes cuda:LOCAL_RANK",
        "metavar": "{auto,cpu,cuda,cuda:N}"})
    prefetch: int = field(default=4, metadata={"help": "batches fetched ahead"})
    # An oversubscribed thread pool is many times slower.
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: torch's); fewer than the cores when the server shares the machine"})
    progress: bool = field(default=True, metadata={"help": "progress bar on stderr"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})

    def __post_init__(self) -> None:
        checks = {
            "d_model": self.d_model >= 1, "n_layers": self.n_layers >= 1,
            "seq_len": self.seq_len is None or self.seq_len >= 1,
            "batch_size": self.batch_size is None or self.batch_size >= 1, "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0, "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip >= 0,
            "checkpoint_interval": self.checkpoint_interval >= 0, "prefetch": self.prefetch >= 1,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "validation_batches": self.validation_batches is None or self.validation_batches >= 1,
            "validation_rows": self.validation_rows is None or self.validation_rows >= 1,
            "threads": self.threads is None or self.threads >= 1,
            "model": self.model in MODELS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid config values: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.stop_step is not None and self.stop_step < 1:
            raise ValueError(f"stop_step must be >= 1, got {self.stop_step}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.create_run and self.steps is None:
            raise ValueError("creating a run needs steps (its total_steps)")
        if self.resume not in (None, "auto") and not Path(self.resume).is_file():
            raise ValueError(f"resume: no checkpoint file {self.resume!r}")
        if self.resume == "auto" and not self.checkpoint_dir:
            raise ValueError("resume='auto' looks in checkpoint_dir; set it")

    def run_config(self) -> dict[str, Any]:
        """The RunConfig mapping POST /runs receives when `create_run` is set (RUN_DEFAULTS for unset run fields)."""
        run = {name: default if (value := getattr(self, name)) is None else value
               for name, default in RUN_DEFAULTS.items()}
        config: dict[str, Any] = {
            "name": self.run_name, "preset": run["preset"], "seq_len": run["seq_len"], "batch_size": run["batch_size"],
            "seed": run["run_seed"], "policy": {"name": run["policy"]}, "total_steps": self.steps,
            "validation_batches": run["validation_batches"],
        }
        if run["eval_steps"] is not None:
            config["eval_steps"] = list(run["eval_steps"])
        return config

    def run_differences(self, run: Any) -> list[str]:
        """The run fields set here that differ from the existing `run`'s (a RunInfo), as flag texts."""
        have = {"preset": run.config.get("preset"), "seq_len": run.config["seq_len"],
                "batch_size": run.config["batch_size"], "run_seed": run.config["seed"],
                # the stored list, not run.eval_steps (the schedule cut at total_steps)
                "policy": run.config["policy"]["name"], "eval_steps": run.config.get("eval_steps"),
                "validation_batches": run.config["validation_batches"]}
        return [f"--{name.replace('_', '-')} {value} (the run has {have[name]})"
                for name in have if (value := getattr(self, name)) is not None and value != have[name]]

    def model_fields(self, vocab_size: int) -> dict[str, Any]:
        return {"vocab_size": vocab_size, "d_model": self.d_model, "n_layers": self.n_layers,
                "bidirectional": self.bidirectional, **self.model_options}


# ---------------------------------------------------------------------------------------------
# Configuration from YAML and flags
# ---------------------------------------------------------------------------------------------


def config_from_mapping(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """`base` (default: the defaults) with `values` overriding; unknown keys are an error. Values
    are coerced to the fields' types as flags are (PyYAML reads `lr: 3e-4` as a string)."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known: {sorted(hints)}")
    coerced = {}
    for key, value in values.items():
        try:
            coerced[key] = _parse_value(hints[key], value)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
    return dataclasses.replace(base or TrainConfig(), **coerced)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A YAML file of TrainConfig fields, then `overrides`."""
    import yaml

    # Bytes: PyYAML decodes them itself, so an undecodable file is a YAMLError too.
    with open(path, "rb") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    try:
        base = config_from_mapping(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return config_from_mapping(overrides or {}, base)


def _yaml_problem(error: Exception) -> str:
    """A YAML error on one line: what and where (PyYAML's own text spans several, quoting the source)."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return " ".join(str(error).split())
    context = f"{error.context}: " if getattr(error, "context", None) else ""
    return f"{context}{error.problem} (line {mark.line + 1}, column {mark.column + 1})"


def _parse_value(field_type: Any, value: Any) -> Any:
    """A flag's text or a YAML value as the field's type. Text: numbers and strings as such, lists
    and mappings as YAML (e.g. `[10, 50]`), `none` for an optional field's None. Other values must
    have the type already (an int passes for a float); list items are parsed the same way."""
    import yaml

    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            return None
        field_type = next(a for a in typing.get_args(field_type) if a is not type(None))
    if field_type in (int, float) and isinstance(value, str):
        try:
            return field_type(value)
        except ValueError:
            raise ValueError(f"expected {field_type.__name__}, got {value!r}") from None
    if field_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if field_type is int and isinstance(value, bool):
        raise ValueError(f"expected int, got {value!r}")
    expected = typing.get_origin(field_type) or field_type
    if expected in (list, dict) and isinstance(value, str):
        text = value
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, expected):
            raise ValueError(f"expected a YAML {expected.__name__}, got {text!r}")
    if not isinstance(value, expected):
        raise ValueError(f"expected {expected.__name__}, got {value!r}")
    if expected is list:
        (item_type,) = typing.get_args(field_type)
        return [_parse_value(item_type, item) for item in value]
    return value


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """TrainConfig from `--config FILE` (YAML) and `--field-name VALUE` flags (flags win).

    Booleans take `--flag` / `--no-flag`; lists and mappings are YAML (`--eval-steps [10,50]`,
    `--model-options {rnn_width: 384}`); `none` unsets an optional field."""
    import argparse

    hints = typing.get_type_hints(TrainConfig)
    parser = argparse.ArgumentParser(
        prog="birdie-train", description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
        usage="birdie-train [--config FILE] [--FIELD VALUE ...]  (every field: birdie-train --help)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n" + __doc__.split("\n\n")[1],
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of config fields by their names "
                        "(lr: 3.0e-4, eval_steps: [10, 50]); flags override it")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        options = dict(f.metadata)
        default = RUN_DEFAULTS.get(f.name, getattr(defaults, f.name))
        if default is not None:
            options["help"] += f" (default: {'on' if default is True else 'off' if default is False else default})"
        if f.name in RUN_DEFAULTS:
            options["help"] += "; applies when creating a run (--create-run): an existing run's must equal it"
        options["help"] = options["help"].replace("%", "%%")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, **options)
        else:
            if "choices" not in options:
                options.setdefault("metavar", f.name.upper())
            flags = (flag, "--run") if f.name == "run_name" else (flag,)  # --run as birdie-eval names it
            parser.add_argument(*flags, dest=f.name, type=lambda text, t=hints[f.name], n=flag: _checked(t, text, n),
                                **options)
    given = vars(parser.parse_args(argv))
    config_path = given.pop("config", None)
    try:
        if config_path:
            return load_config(config_path, given)
        return config_from_mapping(given)
    except (ValueError, OSError) as error:
        parser.error(str(error))


def _checked(field_type: Any, text: str, flag: str) -> Any:
    import argparse

    try:
        return _parse_value(field_type, text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{flag}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Devices and torch.distributed
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Distributed:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": CUDA when available, else CPU; a DDP rank on CUDA takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device torch knows ("gpu")
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies: not to gates and the RG-LRU's parameters (decay
    would pull the recurrence towards forgetting), nor to norms, biases and other vectors."""
    if parameter.ndim < 2:
        return False
    return ".rg_lru." not in name and ".gates." not in name


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    with_decay, without = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (with_decay if decays(name, parameter) else without).append(parameter)
    return [{"params": with_decay, "weight_decay": weight_decay}, {"params": without, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warmup over warmup_steps, then a cosine from
    1 down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int, device: torch.device):
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas),
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, total_steps, config.min_lr_ratio)
    )
    return optimizer, scheduler


def load_optimizer_state(optimizer, scheduler, state: dict[str, Any]) -> None:
    """A checkpoint's optimiser moments and schedule step under this job's lr, betas and weight decay
    (their state dicts bring back the checkpoint's): the schedule continues at its step, towards this
    job's peak lr."""
    wanted = [{key: group[key] for key in ("initial_lr", "betas", "weight_decay")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = [w["initial_lr"] for w in wanted]
    for group, w, lr_lambda in zip(optimizer.param_groups, wanted, scheduler.lr_lambdas):
        group.update(w, lr=w["initial_lr"] * lr_lambda(scheduler.last_epoch))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def latest_checkpoint(directory: str | Path) -> Path | None:
    paths = sorted(Path(directory).glob("step_*.pt"))
    return paths[-1] if paths else None


def save_checkpoint(
    path: str | Path, *, model: LanguageModel, model_name: str, optimizer, scheduler, step: int,
    config: TrainConfig, world_size: int,
) -> Path:
    """Everything a resume needs; written to a temporary file and renamed, so a crash never leaves
    a half-written checkpoint under the final name. `step` is the next step to train."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "run": config.run_name,
        "world_size": world_size,
        "model_name": model_name,
        "model_config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "config": dataclasses.asdict(config),
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The contents of a checkpoint save_checkpoint wrote; ValueError for any other file."""
    with open(path, "rb") as f:
        try:
            state = torch.load(f, map_location=device, weights_only=True)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            # Another file fails in many ways (UnpicklingError, RuntimeError, EOFError, OSError when cut short,
            # ...), and torch's messages advise weights_only=False, which would run whatever code the file holds.
            raise ValueError(f"{path} is not a birdie-train checkpoint: torch.load cannot read it "
                             f"({type(error).__name__}: cut short, or another kind of file)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a birdie-train checkpoint: not a mapping of format {CHECKPOINT_FORMAT}")
    return state


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, dict[str, Any]]:
    """The model stored in a checkpoint, on `device`, and the checkpoint's contents."""
    state = load_checkpoint(path, device)
    model = build_model(state["model_name"], **state["model_config"]).to(device)
    model.load_state_dict(state["model"])
    return model, state


# ---------------------------------------------------------------------------------------------
# Metrics and progress
# ---------------------------------------------------------------------------------------------


def batch_digest(input_ids) -> str:
    """A short fingerprint of a batch's input ids (to check that replays see the same data)."""
    return hashlib.blake2b(np.ascontiguousarray(input_ids).tobytes(), digest_size=8).hexdigest()


class MetricsWriter:
    """Appends one JSON object per line; a no-op without a path. Resuming at `resume_step`, it first
    rewrites the file (atomically) with only what happened before that step's checkpoint, so the
    records a crashed session wrote after it are not doubled when the steps are trained again."""

    def __init__(self, path: str | None, resume_step: int | None = None):
        self.file = None
        if path:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and path.exists():
                kept = [line for line in path.read_text().splitlines() if _recorded_before(line, resume_step)]
                temporary = path.with_name(path.name + ".tmp")
                temporary.write_text("".join(line + "\n" for line in kept))
                os.replace(temporary, path)
            self.file = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _recorded_before(line: str, step: int) -> bool:
    """Whether a metrics line is from before the checkpoint at `step`: a training step before it, an
    evaluation at it or before (evaluation s precedes checkpoint s); a line cut short is not."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return record["step"] <= step if record["kind"] == "validation" else record["step"] < step


@dataclass
class TrainResult:
    run: str
    start_step: int
    end_step: int  # the next step to train
    model: LanguageModel
    history: list[dict[str, Any]]  # one record per step
    validations: list[dict[str, Any]]  # one record per evaluation
    num_params: int
    flops_per_token: float
    seconds: float
    checkpoint: Path | None
    failed_posts: int

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    from clients import BatchIterator, BirdieClient, LossPostBody, LossPoster

    if config.threads:
        torch.set_num_threads(config.threads)
    on_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    ddp = init_distributed("cuda" if on_cuda else "cpu")
    device = resolve_device(config.device, ddp.local_rank)
    client = BirdieClient(config.server_url)

    # 1. The run.
    if config.create_run:
        if ddp.is_main:
            client.create_run(config.run_config())
        if ddp.enabled:
            dist.barrier()
    info = client.run(config.run_name)
    differences = config.run_differences(info)
    if differences:
        raise ValueError(f"run {config.run_name!r} already exists with other settings: {'; '.join(differences)}. "
                         "Leave these out to train on it as it is, "
                         "or create a new run (--create-run, a new --run-name)")
    names = [o.name for o in info.objectives]
    families = {o.name: o.family for o in info.objectives}
    total_steps = config.steps or int(info.config["total_steps"])
    end_step = min(total_steps, config.stop_step or total_steps)
    eval_steps = set(info.eval_steps) if config.evaluate else set()

    # 2. Model, optimiser, schedule; restored from a checkpoint when resuming.
    torch.manual_seed(config.init_seed)
    model = build_model(config.model, **config.model_fields(info.vocab_size)).to(device)
    optimizer, scheduler = make_optimizer(model, config, total_steps, device)
    start_step = 0
    resume_path = latest_checkpoint(config.checkpoint_dir) if config.resume == "auto" else config.resume
    if resume_path:
        state = load_checkpoint(resume_path, device)
        for key, want in (("run", config.run_name), ("world_size", ddp.world_size), ("model_name", config.model)):
            if state[key] != want:
                raise ValueError(f"{resume_path}: checkpoint {key} is {state[key]!r}, this job's is {want!r} "
                                 "(batches are addressed by run, rank and world size)")
        # Same shapes need not mean the same model: causal and bidirectional Hawk share them all.
        built = dataclasses.asdict(model.config)
        differing = [f"{key}={state['model_config'].get(key)!r} (this job's: {built.get(key)!r})"
                     for key in sorted(state["model_config"].keys() | built.keys())
                     if state["model_config"].get(key) != built.get(key)]
        if differing:
            raise ValueError(f"{resume_path}: the checkpoint's model has {', '.join(differing)}; resume with its "
                             "settings (--d-model, --n-layers, --bidirectional/--no-bidirectional, --model-options)")
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, scheduler, state)
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        start_step = int(state["step"])
        if start_step > end_step:
            raise ValueError(f"{resume_path} is at step {start_step}, past this session's end (step {end_step})")
        log.info("resumed from %s at step %d", resume_path, start_step)
        changed = [f"{key} {state['config'][key]} -> {getattr(config, key)}"
                   for key in ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "grad_clip")
                   if state["config"][key] != getattr(config, key)]
        if changed:
            log.info("hyperparameters changed on resume: %s", ", ".join(changed))
    train_model: nn.Module = model
    if config.compile:
        train_model = torch.compile(train_model)
    if ddp.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    metrics = MetricsWriter(config.metrics_file if ddp.is_main else None, start_step if resume_path else None)
    poster = LossPoster(client)
    batches = BatchIterator(client, config.run_name, ddp.rank, ddp.world_size, start_step, config.prefetch, end_step=end_step)
    validation_cache: list | None = None
    # A rank beyond the configurations' count scores one anyway (every rank posts) but adds nothing to the totals.
    own_share = names[ddp.rank :: ddp.world_size]
    history: list[dict[str, Any]] = []
    validations: list[dict[str, Any]] = []
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {config.run_name}", dynamic_ncols=True,
               disable=not (config.progress and ddp.is_main), file=sys.stderr)
    flops_per_token = model.flops_per_token(int(info.config["seq_len"]))
    started = time.perf_counter()
    step_started = time.perf_counter()
    last_checkpoint = None
    # Log records (validation results, the client's warnings) through tqdm.write: written directly, they
    # land on the bar's line.
    with logging_redirect_tqdm(tqdm_class=tqdm):
        try:
            for step, wire in batches:
                waited = time.perf_counter() - step_started
                batch = batch_tensors(wire.arrays, device)
                labels = batch["label_ids"]
                batch_names = wire.objectives
                if batch_names != names:
                    raise ValueError(f"step {step}: the batch names configurations {batch_names[:3]}... "
                                     f"but the run has {names[:3]}...")

                # 4. One step. Loss = sum over every rank's labelled tokens / their total count: DDP
                # averages gradients over ranks, hence the factor world_size.
                global_tokens = (labels != IGNORE_INDEX).sum().double()
                if ddp.enabled:
                    dist.all_reduce(global_tokens)
                losses = token_losses(forward_logits(train_model, batch), labels)
                loss = losses.sum() * (ddp.world_size / global_tokens.clamp_min(1.0))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                             if config.grad_clip > 0 else None)
                # Per-configuration sums and counts: this rank's go to the server, all ranks' to the
                # metrics and to the check below (the same on every rank, so all stop together).
                sums, counts = per_objective_sums(losses.detach(), labels, batch["objective_ids"], len(names))
                stats = torch.cat([sums, counts])
                local = stats.tolist()
                if ddp.enabled:
                    dist.all_reduce(stats)
                totals = stats.tolist()
                total_loss, total_count = sum(totals[: len(names)]), sum(totals[len(names):])
                if not math.isfinite(total_loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
                    raise FloatingPointError(f"step {step}: the loss or the gradient is not finite; "
                                             "lower the lr or check the data")
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                post = {names[i]: (local[i] / local[len(names) + i], int(local[len(names) + i]))
                        for i in range(len(names)) if local[len(names) + i] > 0}
                poster.post(LossPostBody(
                    run=config.run_name, step=step, rank=ddp.rank, world_size=ddp.world_size, split="train",
                    losses={n: m for n, (m, _) in post.items()}, tokens={n: c for n, (_, c) in post.items()},
                ))
                step_seconds = time.perf_counter() - step_started
                tokens = wire.shape[0] * wire.shape[1] * ddp.world_size
                record = {
                    "step": step,
                    "loss": total_loss / max(total_count, 1.0),
                    "losses": {names[i]: totals[i] / totals[len(names) + i]
                               for i in range(len(names)) if totals[len(names) + i] > 0},
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": tokens / step_seconds,
                    "data_wait": waited / step_seconds,
                    "step_seconds": step_seconds,
                    "mixture_version": wire.header.get("mixture_version"),
                    "batch": batch_digest(wire.arrays["input_ids"]),
                }
                history.append(record)
                metrics.write({"kind": "train", **record})
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                wait=f"{record['data_wait']:.0%}", mix=record["mixture_version"])

                # 5. Evaluation after step + 1 steps.
                done = step + 1
                if done in eval_steps:
                    if validation_cache is None:
                        share = own_share or [names[ddp.rank % len(names)]]
                        n_batches = int(info.config.get("validation_batches", 1))
                        validation_cache = fetch_validation_batches(client, config.run_name, share, n_batches)
                    evaluation_started = time.perf_counter()
                    scores = score_batches(model, validation_cache, device, config.validation_rows)
                    poster.post(LossPostBody(
                        run=config.run_name, step=done, rank=ddp.rank, world_size=ddp.world_size, split="validation",
                        losses={n: s.loss for n, s in scores.items()}, tokens={n: s.tokens for n, s in scores.items()},
                    ))
                    # Every rank's scores: (loss sum, correct predictions, tokens) per configuration, in the
                    # run's order.
                    validation_sums = torch.tensor(
                        [[s.loss * s.tokens, s.accuracy * s.tokens, s.tokens] if n in own_share and (s := scores.get(n))
                         else [0.0, 0.0, 0.0] for n in names], dtype=torch.float64, device=device,
                    )
                    if ddp.enabled:
                        dist.all_reduce(validation_sums)
                    scored = [(n, *sums) for n, sums in zip(names, validation_sums.tolist()) if sums[2] > 0]
                    validation = {"step": done, "losses": {n: loss / count for n, loss, _, count in scored},
                                  "accuracy": {n: right / count for n, _, right, count in scored},
                                  "tokens": {n: int(count) for n, _, _, count in scored},
                                  "seconds": time.perf_counter() - evaluation_started}
                    validation["family_loss"] = family_means(validation["losses"], families)
                    validation["family_accuracy"] = family_means(validation["accuracy"], families)
                    if ddp.is_main:
                        log.info("validation at step %d: %s", done, ", ".join(
                            f"{family} {loss:.3f} ({validation['family_accuracy'][family]:.1%})"
                            for family, loss in validation["family_loss"].items()))
                    validations.append(validation)
                    metrics.write({"kind": "validation", **validation})

                # 6. Checkpoints (rank 0 writes; every rank holds the same state).
                if config.checkpoint_dir and ddp.is_main and (
                    done == end_step or (config.checkpoint_interval and done % config.checkpoint_interval == 0)
                ):
                    last_checkpoint = save_checkpoint(
                        checkpoint_path(config.checkpoint_dir, done), model=model, model_name=config.model,
                        optimizer=optimizer, scheduler=scheduler, step=done, config=config, world_size=ddp.world_size,
                    )
                step_started = time.perf_counter()
        finally:
            bar.close()
            batches.close()
            undelivered = poster.close(timeout=120)
            metrics.close()
            client.close()
    if undelivered:
        log.error("%d loss posts were not delivered (server unreachable?)", len(undelivered))
    for failed in poster.failed:
        log.error("loss post rejected: %s", failed.error)
    return TrainResult(
        run=config.run_name, start_step=start_step, end_step=start_step + len(history), model=model, history=history,
        validations=validations, num_params=model.num_params(), flops_per_token=flops_per_token,
        seconds=time.perf_counter() - started, checkpoint=last_checkpoint,
        failed_posts=len(poster.failed) + len(undelivered),
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    from clients import BirdieError

    try:
        result = train(config)
    except (ValueError, FloatingPointError, BirdieError) as error:
        print(f"birdie-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {
            "run": result.run, "steps": [result.start_step, result.end_step], "final_loss": result.final_loss,
            "seconds": round(result.seconds, 2), "parameters": result.num_params,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None, "failed_posts": result.failed_posts,
            "validation": {key: result.validations[-1][key] for key in ("step", "family_loss", "family_accuracy")}
            if result.validations else None,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
