"""A simulated training run that drives mixture policies with synthetic losses.

Each configuration's loss falls with its cumulative exposure n (the probability it was sampled
with, summed over steps): loss = floor + span * exp(-n / scale). More sampling lowers the loss with
diminishing returns. The two copying configurations have a small scale: they saturate within the
first few percent of the run, after which sampling them earns nothing. The other four keep paying
until the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from objective_server.policies.base import Decision, Policy
from objective_server.runs import RunConfig
from objective_server.store.protocol import Aggregate

NAMES = [
    "next_token.len2047",
    "prefix_lm.frac75.len2047",
    "infilling.span3.mask15.len512",
    "copying.len64",
    "copying.len256",
    "deshuffling.frac50.len256",
]
SATURATING = [3, 4]
PAYING = [0, 1, 2, 5]


@dataclass(frozen=True)
class LossDynamics:
    floor: np.ndarray = field(default_factory=lambda: np.array([2.0, 1.8, 1.5, 0.05, 0.05, 1.0]))
    span: np.ndarray = field(default_factory=lambda: np.array([4.0, 4.0, 4.0, 5.0, 5.0, 4.0]))
    scale: np.ndarray = field(default_factory=lambda: np.array([400.0, 400.0, 400.0, 5.0, 5.0, 400.0]))

    def losses(self, exposure: np.ndarray) -> np.ndarray:
        return self.floor + self.span * np.exp(-exposure / self.scale)


def run_config(policy: str, options: dict[str, Any] | None = None, total_steps: int = 2000, seed: int = 0,
               **extra: Any) -> RunConfig:
    return RunConfig(
        name="sim",
        arms=[{"objective": n, "probability": 1.0} for n in NAMES],
        total_steps=total_steps,
        seed=seed,
        policy={"name": policy, "options": options or {}},
        **extra,
    )


@dataclass
class Record:
    step: int
    probabilities: np.ndarray  # the mixture in effect after this observation
    decision: Decision
    losses: dict[str, float]


def simulate_validation(
    config: RunConfig,
    policy_for_update: Callable[[], Policy],
    dynamics: LossDynamics = LossDynamics(),
    on_state: Callable[[bytes], bytes] = lambda s: s,
) -> tuple[list[Record], bytes]:
    """Run the evaluation schedule: train with the current mixture up to each evaluation step, post
    the validation losses, apply the decision. `policy_for_update` gives the policy object used for
    each update (a fresh one per update simulates a replica); `on_state` may transform the state
    between updates (e.g. a round trip through another process)."""
    probabilities = np.array(config.initial_probabilities)
    exposure = np.zeros(len(NAMES))
    last = 0
    state = policy_for_update().initial_state()
    records = []
    for step in config.evaluation_steps:
        exposure += probabilities * (step - last)
        last = step
        losses = dict(zip(config.names, dynamics.losses(exposure).tolist()))
        observation = Aggregate("validation", step, 1, losses, {n: 512 for n in config.names})
        decision = policy_for_update().update(on_state(state), observation)
        state = decision.state
        if decision.probabilities is not None:
            probabilities = np.array(decision.probabilities)
        records.append(Record(step, probabilities, decision, losses))
    return records, state


def simulate_training(
    config: RunConfig,
    policy: Policy,
    steps: int,
    dynamics: LossDynamics = LossDynamics(),
    noise: float = 0.01,
    tokens_per_step: int = 4096,
) -> tuple[list[np.ndarray], bytes]:
    """Post one training observation per step (tokens in proportion to the mixture, losses with
    1 % multiplicative noise); return the mixture after every step and the final state."""
    rng = np.random.default_rng(config.seed)
    probabilities = np.array(config.initial_probabilities)
    exposure = np.zeros(len(NAMES))
    state = policy.initial_state()
    history = []
    for step in range(steps):
        exposure += probabilities
        losses = dynamics.losses(exposure) * (1.0 + noise * rng.standard_normal(len(NAMES)))
        tokens = np.floor(probabilities * tokens_per_step).astype(int)
        observation = Aggregate(
            "train", step, 1,
            {n: float(x) for n, x, t in zip(config.names, losses, tokens) if t > 0},
            dict(zip(config.names, tokens.tolist())),
        )
        decision = policy.update(state, observation)
        state = decision.state
        if decision.probabilities is not None:
            probabilities = np.array(decision.probabilities)
        history.append(probabilities)
    return history, state
