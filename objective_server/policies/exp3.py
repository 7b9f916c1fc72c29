"""`exp3`: the online data-mixing bandit, a baseline for the Birdie controller.

After "Online Data Mixing" (Albalak et al. 2023): each objective configuration is an arm; the
policy watches the training losses and every `update_every` training observations plays a round of
EXP3 with smoothed, importance-weighted rewards:

    r_i   = reward of arm i in the round / pi_i             (only arms that had tokens in it)
    R_i  <- smoothing * R_i + (1 - smoothing) * r_i
    eps_t = min(1/K, sqrt(ln K / (K t)))
    pi_i  = (1 - K eps_t) * softmax(eps_{t-1} * R)_i + eps_t

The reward is either the round's mean training loss of the arm (`reward="loss"`, ODM's choice:
high loss = much left to learn) or its learning progress, the relative fall of that mean since the
arm's previous round in per mille, 1000 (previous - mean) / max(previous, 1e-8) (`reward="progress"`,
the default). Progress is scale-free: the Birdie objectives have very different loss levels
(copying tends to ~0, next-token prediction stays near 3), and a raw-loss reward would keep
favouring an arm whose loss is high but no longer falls.

Deterministic (no randomness at all); the state is JSON in the state bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from objective_server.policies.base import Decision, Policy
from objective_server.runs import RunConfig
from objective_server.store.protocol import Aggregate


class Exp3Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    update_every: int = Field(10, ge=1, description="training observations per bandit round")
    reward: Literal["progress", "loss"] = "progress"
    smoothing: float = Field(0.9, ge=0, lt=1, description="weight of the old reward estimate")
    reward_scale: float = Field(1.0, gt=0, description="multiplies every reward before smoothing")


def exploration(rounds: int, arms: int) -> float:
    """ODM's exploration rate eps_t = min(1/K, sqrt(ln K / (K t))) for round t >= 1."""
    if arms == 1:
        return 0.0
    return min(1.0 / arms, math.sqrt(math.log(arms) / (arms * max(rounds, 1))))


def mixture(estimates: np.ndarray, rounds: int) -> np.ndarray:
    """The round-`rounds` probabilities from the smoothed reward estimates."""
    arms = len(estimates)
    eps = exploration(rounds, arms)
    logits = exploration(rounds - 1, arms) * estimates
    weights = np.exp(logits - logits.max())
    probabilities = (1.0 - arms * eps) * weights / weights.sum() + eps
    return probabilities / probabilities.sum()


class Exp3Policy(Policy):
    name = "exp3"
    observes = ("train",)

    def __init__(self, config: RunConfig, **options: Any) -> None:
        super().__init__(config)
        self.options = Exp3Options(**options)
        self.names = config.names

    def initial_state(self) -> bytes:
        k = len(self.names)
        return _encode({
            "names": self.names,
            "rounds": 0,
            "observations": 0,  # in the current round
            "loss_sums": [0.0] * k,
            "token_sums": [0] * k,
            "previous_means": [None] * k,  # each arm's mean loss in the last round it had tokens
            "estimates": [0.0] * k,
            "probabilities": self.config.initial_probabilities,
            "last_rewards": [None] * k,
            "last_means": [None] * k,
            "last_step": None,
        })

    def _load(self, state: bytes) -> dict[str, Any]:
        s = json.loads(state)
        if s.get("names") != self.names:
            raise ValueError("policy state belongs to a run with other objective configurations")
        return s

    def update(self, state: bytes, observation: Aggregate) -> Decision:
        if observation.split != "train":
            raise ValueError(f"the exp3 policy observes training losses, got split {observation.split!r}")
        unknown = sorted(set(observation.tokens) - set(self.names))
        if unknown:
            raise ValueError(f"losses for configurations not in this run: {unknown}")
        s = self._load(state)
        for i, name in enumerate(self.names):
            tokens = observation.tokens.get(name, 0)
            if tokens > 0 and name in observation.losses:
                loss = observation.losses[name]
                if not math.isfinite(loss):
                    raise ValueError(f"loss of {name!r} is not finite: {loss!r}")
                s["loss_sums"][i] += loss * tokens
                s["token_sums"][i] += tokens
        s["observations"] += 1
        s["last_step"] = observation.step
        if s["observations"] < self.options.update_every:
            return Decision(state=_encode(s))
        return self._play_round(s)

    def _play_round(self, s: dict[str, Any]) -> Decision:
        probabilities = np.asarray(s["probabilities"], dtype=np.float64)
        estimates = np.asarray(s["estimates"], dtype=np.float64)
        rewards: list[float | None] = [None] * len(self.names)
        means: list[float | None] = [None] * len(self.names)
        for i in range(len(self.names)):
            if s["token_sums"][i] == 0:
                continue  # not sampled this round: its estimate stays
            mean = s["loss_sums"][i] / s["token_sums"][i]
            means[i] = mean
            previous = s["previous_means"][i]
            if self.options.reward == "loss":
                raw = mean
            elif previous is not None and previous > 0:
                # The floor keeps a rise from a near-zero loss finite (from 1e-310, plain division overflows).
                raw = 1000.0 * (previous - mean) / max(previous, 1e-8)
            else:
                raw = None  # progress needs two rounds with tokens
            s["previous_means"][i] = mean
            if raw is None:
                continue
            reward = self.options.reward_scale * raw / max(probabilities[i], 1e-12)
            estimates[i] = self.options.smoothing * estimates[i] + (1.0 - self.options.smoothing) * reward
            rewards[i] = reward
        s["rounds"] += 1
        new_probabilities = mixture(estimates, s["rounds"] + 1)
        s.update(
            estimates=estimates.tolist(),
            probabilities=new_probabilities.tolist(),
            last_rewards=rewards,
            last_means=means,
            observations=0,
            loss_sums=[0.0] * len(self.names),
            token_sums=[0] * len(self.names),
        )
        meta = {"round": s["rounds"], "step": s["last_step"], "exploration": exploration(s["rounds"] + 1, len(self.names))}
        return Decision(state=_encode(s), probabilities=s["probabilities"], meta=meta)

    def describe(self, state: bytes) -> dict[str, Any]:
        s = self._load(state)
        return {
            "exploration": exploration(s["rounds"] + 1, len(self.names)) if s["rounds"] else None,
            "last_losses": {n: m for n, m in zip(self.names, s["last_means"]) if m is not None},
            "rewards": {n: r for n, r in zip(self.names, s["last_rewards"]) if r is not None},
            "predicted_reward": None,
            "history_length": s["rounds"],
            "estimates": dict(zip(self.names, s["estimates"])),
            "reward": self.options.reward,
            "observations_in_round": s["observations"],
            "last_step": s["last_step"],
        }


def _encode(s: dict[str, Any]) -> bytes:
    return json.dumps(s, allow_nan=False, sort_keys=True, separators=(",", ":")).encode()
