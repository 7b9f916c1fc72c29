"""Run configuration: what one training job asks of the objective server.

A run names its objective configurations (explicitly, or a preset) with initial probabilities, the
batch shape, the seed, the mixture policy and its evaluation schedule. Once created, a run's config
is stored fully resolved (every configuration spelled out), so presets may change without changing
what an existing run serves.
"""

from __future__ import annotations

import bisect
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from objective_server.objectives import Objective, parse_objective
from objective_server.objectives.presets import preset as preset_arms
from objective_server.rng import keyed_rng

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MIN_SEQ_LEN, MAX_SEQ_LEN = 64, 131_072
# The paper's evaluation steps; every 1000 after the last one.
BIRDIE_EVAL_STEPS = (10, 50, 250, 500, 1000, 1500, 2000)
# The paper's controller takes permanent control at this evaluation (scaled like the schedule).
BIRDIE_CONTROL_STEP = 250
# Runs at least this long use the schedule as is; shorter runs scale it down.
FULL_SCHEDULE_STEPS = 20_000


class Arm(BaseModel):
    """One objective configuration of the mixture and its initial probability."""

    model_config = ConfigDict(extra="forbid")

    objective: str  # the configuration's name; parse with `parse_objective`
    probability: float = Field(ge=0)

    @field_validator("objective", mode="before")
    @classmethod
    def _canonical(cls, value: Any) -> str:
        return parse_objective(value).name


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "fixed"
    options: dict[str, Any] = Field(default_factory=dict)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=RUN_NAME_PATTERN)
    preset: str | None = None
    arms: list[Arm] = Field(default_factory=list)
    seq_len: int = Field(2048, ge=MIN_SEQ_LEN, le=MAX_SEQ_LEN)
    batch_size: int = Field(8, ge=1, le=4096)
    seed: int = Field(0, ge=0)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    total_steps: int = Field(10_000, ge=1)
    eval_steps: list[int] | None = None
    validation_batches: int = Field(1, ge=1, le=1000)
    # The fingerprint of the corpus and tokenizer the run reads (`TokenStore.fingerprint`): set by
    # the server that creates the run, so no server on another corpus serves it different bytes.
    corpus: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")
    # The batch generator revision that created the run (`batching.GENERATOR_REVISION`), set by the
    # server alongside `corpus`; a run stored without one predates revision 2.
    generator: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        # Runs before field validation: expand only a well-typed preset and seq_len, and leave
        # anything else to the field validators, which report it as a validation error.
        if not isinstance(data, dict) or data.get("arms") or not isinstance(data.get("preset"), str):
            return data
        seq_len = data.get("seq_len", 2048)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not MIN_SEQ_LEN <= seq_len <= MAX_SEQ_LEN:
            return data
        data = dict(data)
        arms = preset_arms(data["preset"], seq_len=seq_len)
        data["arms"] = [{"objective": o.name, "probability": p} for o, p in arms]
        return data

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if not self.arms:
            raise ValueError("a run needs `arms` (objective configurations) or a `preset`")
        names = [a.objective for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("objective configurations must be distinct")
        if sum(a.probability for a in self.arms) <= 0:
            raise ValueError("initial probabilities must not all be zero")
        # An arm that cannot build one example in a row would only ever give padding.
        for name, objective in zip(names, self.objectives):
            if not _fits(objective, self.seq_len):
                shortest = _shortest_row(objective)
                needs = f"seq_len >= {shortest}" if shortest else f"more than seq_len {MAX_SEQ_LEN}"
                raise ValueError(f"objective {name!r} cannot build an example in a row of seq_len "
                                 f"{self.seq_len}: it needs {needs}")
        if self.eval_steps is not None:
            if any(s < 1 for s in self.eval_steps) or sorted(set(self.eval_steps)) != self.eval_steps:
                raise ValueError("eval_steps must be strictly increasing positive steps")
        return self

    @cached_property
    def objectives(self) -> list[Objective]:
        return [parse_objective(a.objective) for a in self.arms]

    @property
    def names(self) -> list[str]:
        return [a.objective for a in self.arms]

    @property
    def initial_probabilities(self) -> list[float]:
        total = sum(a.probability for a in self.arms)
        return [a.probability / total for a in self.arms]

    @property
    def evaluation_steps(self) -> list[int]:
        if self.eval_steps is not None:
            return [s for s in self.eval_steps if s <= self.total_steps]
        return evaluation_schedule(self.total_steps)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def stored(self) -> dict[str, Any]:
        """The resolved, self-contained form kept in the run store."""
        return self.model_dump(mode="json")


def _fits(objective: Objective, seq_len: int) -> bool:
    return objective.raw_length(seq_len, keyed_rng("runs")) > 0  # deterministic for every objective


def _shortest_row(objective: Objective) -> int | None:
    """The shortest seq_len in which `objective` builds an example (raw_length grows with the
    space), or None if no allowed seq_len is long enough."""
    lengths = range(MIN_SEQ_LEN, MAX_SEQ_LEN + 1)
    shortest = bisect.bisect_left(lengths, True, key=lambda n: _fits(objective, n))
    return lengths[shortest] if shortest < len(lengths) else None


def _scaled_schedule(total_steps: int) -> list[tuple[int, int]]:
    """(paper step, this run's step) for every evaluation of a run of `total_steps` steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    paper = [*BIRDIE_EVAL_STEPS, *range(3000, max(total_steps, FULL_SCHEDULE_STEPS) + 1, 1000)]
    scale = min(1.0, total_steps / FULL_SCHEDULE_STEPS)
    pairs: list[tuple[int, int]] = []
    for step in paper:
        # Half-up rounding, and never merge two evaluations: in a short run the early ones would
        # otherwise collapse onto step 1 and the controller would take control with no history.
        scaled = max(int(step * scale + 0.5), pairs[-1][1] + 1 if pairs else 1)
        if scaled > total_steps:
            break
        pairs.append((step, scaled))
    return pairs


def evaluation_schedule(total_steps: int) -> list[int]:
    """Birdie's evaluation steps (10, 50, 250, 500, 1000, 1500, 2000, then every 1000), scaled
    down proportionally for runs shorter than FULL_SCHEDULE_STEPS, strictly increasing."""
    return [scaled for _, scaled in _scaled_schedule(total_steps)]


def control_step(total_steps: int) -> int:
    """The step at which Birdie's controller takes permanent control (the paper's step 250, scaled
    like `evaluation_schedule`; after the last step if the run is too short to reach it)."""
    for paper, scaled in _scaled_schedule(total_steps):
        if paper == BIRDIE_CONTROL_STEP:
            return scaled
    return total_steps + 1


def load_run_configs(path: str | Path) -> list[RunConfig]:
    """Runs from a YAML or TOML file: one run mapping, or `runs: [ ... ]`. Every problem (unreadable
    file, bad syntax, an invalid run) is a ValueError naming the file."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"{path}: run configs are .yaml, .yml or .toml")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read it as {path.suffix[1:].upper()}: {error}") from None
    runs = data.get("runs", [data]) if isinstance(data, dict) else None
    if not isinstance(runs, list):
        raise ValueError(f"{path}: expected a run mapping or `runs: [...]`")
    configs = []
    for i, run in enumerate(runs):
        try:
            configs.append(RunConfig.model_validate(run))
        except ValidationError as error:
            name = run.get("name") if isinstance(run, dict) else None
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'run'}: {e['msg']}" for e in error.errors())
            raise ValueError(f"{path}: run {name or i!r}: {problems}") from None
    return configs


PRESET_DIR = Path(__file__).parent / "presets"


def preset_run_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}
