"""`birdie`: the paper's reward-driven mixture controller (birdie-method.md §4).

At every evaluation (per-configuration validation losses of all ranks) the policy

1. turns the loss change since the previous evaluation into a reward per configuration
   (`rewards.loss_reward`) and completes the history row `[losses_prev, action_prev] -> rewards`;
2. trains the reward model (`reward_model.RewardModel`, a small gated SSM) on the whole history for
   `train_steps` AdamW steps, continuing from the weights and optimiser state of the last update;
3. from the control step on, chooses the next mixture: with the exploration probability of this
   step a random mixture that favours one or two random families, otherwise the average of the
   `top_k` of `candidates` random mixtures ranked by the model's family-weighted predicted reward,
   each read AT the candidate's own row `[current_losses, candidate]` after the history.
   Before the control step the initial mixture stays (the history is still recorded).

Everything the next update needs is in the state bytes: a JSON header (history, losses, actions,
rewards, what was shown) followed by `torch.save` of the model and optimiser state. Randomness is
keyed by (run seed, purpose, evaluation step) and torch runs single-threaded with deterministic
algorithms inside `update`, so the same seed and loss history give the same mixtures in any process
or replica.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from objective_server.policies.base import Decision, Policy
from objective_server.policies.reward_model import RewardModel, fit, flat_optimizer_state, make_optimizer
from objective_server.policies.rewards import family_rewards, family_weights, loss_reward, total_reward
from objective_server.rng import key_of, keyed_rng
from objective_server.runs import RunConfig, control_step
from objective_server.store.protocol import Aggregate

# v2: the reward model's optimizer state is one flat tensor (reward_model.make_optimizer). A v1
# state (one optimizer state per parameter) is read and converted, so runs continue across upgrades.
STATE_MAGIC = b"birdie-policy-v2"
_V1_MAGIC = b"birdie-policy-v1"
_HEADER_LENGTH = struct.Struct("<Q")


class BirdieOptions(BaseModel):
    """`policy.options` of a birdie run; the defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: int = Field(2048, ge=1, description="random candidate mixtures scored per decision")
    top_k: int = Field(8, ge=1, description="best candidates averaged into the chosen mixture")
    train_steps: int = Field(200, ge=0, description="reward-model steps per evaluation")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    width: int = Field(256, ge=1, description="reward-model width")
    layers: int = Field(4, ge=1, description="reward-model gated-SSM layers")
    control_step: int | None = Field(
        None, ge=0, description="first step the controller chooses; None: 250 scaled like the schedule"
    )
    explore_max: float = Field(0.5, ge=0, le=1, description="exploration probability after the start")
    explore_min: float = Field(0.2, ge=0, le=1, description="exploration probability from the decay end")
    explore_full_fraction: float = Field(
        0.025, ge=0, le=1, description="fully exploring start, as a fraction of total_steps"
    )
    explore_decay_fraction: float = Field(
        0.5, gt=0, le=1, description="the cosine decay ends at this fraction of total_steps"
    )
    explore_floor: float = Field(
        0.01, ge=0, lt=1, description="probability an exploring mixture leaves each unchosen family"
    )

    @model_validator(mode="after")
    def _check(self) -> BirdieOptions:
        if self.top_k > self.candidates:
            raise ValueError(f"top_k ({self.top_k}) must not exceed candidates ({self.candidates})")
        if self.explore_min > self.explore_max:
            raise ValueError(f"explore_min ({self.explore_min}) must not exceed explore_max ({self.explore_max})")
        return self


# --- pure pieces --------------------------------------------------------------------------------


def exploration_rate(step: int, total_steps: int, options: BirdieOptions) -> float:
    """Probability that the decision at `step` explores: 1 during the short start, then a cosine
    from explore_max down to explore_min at explore_decay_fraction of the run, then explore_min."""
    full_until = options.explore_full_fraction * total_steps
    if step < full_until:
        return 1.0
    decay_end = options.explore_decay_fraction * total_steps
    progress = 1.0 if decay_end <= full_until else min(1.0, (step - full_until) / (decay_end - full_until))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return options.explore_min + (options.explore_max - options.explore_min) * cosine


def explores(seed: int, step: int, rate: float) -> bool:
    """The keyed coin: does the decision at `step` explore (probability `rate`)?"""
    return bool(keyed_rng(seed, "birdie", "explore", step).random() < rate)


def exploring_mixture(families: list[str], rng: np.random.Generator, floor: float) -> np.ndarray:
    """Random weight on one or two random families, `floor` on each other family (spread evenly
    over its configurations; at most half the mass in all)."""
    unique = list(dict.fromkeys(families))
    chosen_count = int(rng.integers(1, 3)) if len(unique) > 1 else 1
    chosen = {unique[i] for i in rng.choice(len(unique), size=chosen_count, replace=False)}
    rest = [f for f in unique if f not in chosen]
    rest_mass = min(floor * len(rest), 0.5)
    shares = rng.random(chosen_count) + 1e-12
    family_mass = dict(zip(sorted(chosen, key=unique.index), (1.0 - rest_mass) * shares / shares.sum()))
    mixture = np.zeros(len(families))
    for family in unique:
        members = [i for i, f in enumerate(families) if f == family]
        if family in chosen:
            weights = rng.random(len(members)) + 1e-12
            mixture[members] = family_mass[family] * weights / weights.sum()
        else:
            mixture[members] = rest_mass / len(rest) / len(members)
    return mixture / mixture.sum()


def random_mixtures(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """`count` mixtures over `size` configurations: uniform draws, normalised (float64)."""
    draws = rng.random((count, size)) + 1e-12
    return draws / draws.sum(axis=1, keepdims=True)


def average_of_best(candidates: np.ndarray, scores: np.ndarray, top_k: int) -> np.ndarray:
    """The mean of the `top_k` best-scoring candidate mixtures, renormalised."""
    # Stable sort: equal scores keep candidate order, so ties cannot make two replicas differ.
    best = np.argsort(-scores, kind="stable")[:top_k]
    mixture = candidates[best].mean(axis=0)
    return mixture / mixture.sum()


def predicted_scores(
    model: RewardModel, states: torch.Tensor, losses: np.ndarray, mixtures: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Family-weighted sum of the predicted rewards at each row `[losses, mixture]` (float64).

    The history's per-layer states (`model.prefix_states`) are computed once by the caller; each
    row then takes one step from them, and its prediction is read AT its own position."""
    rows = np.concatenate([np.broadcast_to(losses, mixtures.shape), mixtures], axis=1)
    predictions = model.predict_next(states, torch.from_numpy(rows).float())
    return predictions.double().numpy() @ weights


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """One thread and deterministic algorithms for the duration (restored afterwards): float sums
    then happen in the same order in every process, whatever its core count."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


# --- state bytes --------------------------------------------------------------------------------


def encode_state(header: dict[str, Any], tensors: dict[str, Any] | None) -> bytes:
    """MAGIC | header length | JSON header | torch.save(tensors) (absent before the model exists)."""
    text = json.dumps(header, allow_nan=False, sort_keys=True, separators=(",", ":")).encode()
    blob = b""
    if tensors is not None:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        blob = buffer.getvalue()
    return STATE_MAGIC + _HEADER_LENGTH.pack(len(text)) + text + blob


def decode_header(state: bytes) -> tuple[dict[str, Any], int]:
    """The JSON header and the offset of the tensor blob."""
    if not state.startswith((STATE_MAGIC, _V1_MAGIC)):
        raise ValueError("not a birdie policy state (wrong magic)")
    start = len(STATE_MAGIC) + _HEADER_LENGTH.size
    (length,) = _HEADER_LENGTH.unpack_from(state, len(STATE_MAGIC))
    return json.loads(state[start : start + length]), start + length


def decode_tensors(state: bytes, offset: int) -> dict[str, Any] | None:
    if offset >= len(state):
        return None
    # weights_only: the state comes from a shared store, so never unpickle arbitrary objects.
    tensors = torch.load(io.BytesIO(state[offset:]), weights_only=True)
    if state.startswith(_V1_MAGIC):
        tensors["optimizer"] = flat_optimizer_state(tensors["optimizer"])
    return tensors


# --- the policy ---------------------------------------------------------------------------------


class BirdiePolicy(Policy):
    name = "birdie"
    observes = ("validation",)

    def __init__(self, config: RunConfig, **options: Any) -> None:
        super().__init__(config)
        self.options = BirdieOptions(**options)
        self.names = config.names
        self.families = [o.family for o in config.objectives]
        self.weights = family_weights(self.families)
        self.control_step = (
            self.options.control_step if self.options.control_step is not None else control_step(config.total_steps)
        )

    # -- state --

    def initial_state(self) -> bytes:
        header = {
            "names": self.names,
            "steps": [],
            "losses": [],
            "actions": [],
            "rewards": [],
            "exploration": [],
            "explored": [],
            "predicted": [],
            "imputed": [],
            "in_control": False,
            "model_loss": None,
            "score_spread": None,
        }
        return encode_state(header, None)

    def _header(self, state: bytes) -> tuple[dict[str, Any], int]:
        header, offset = decode_header(state)
        if header["names"] != self.names:
            raise ValueError("policy state belongs to a run with other objective configurations")
        return header, offset

    def _new_model(self) -> RewardModel:
        # Initial weights keyed by the run seed, without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key_of(self.config.seed, "birdie", "reward-model") % 2**63)
            return RewardModel(len(self.names), self.options.width, self.options.layers)

    def _restore(self, tensors: dict[str, Any] | None) -> tuple[RewardModel, torch.optim.Optimizer]:
        model = self._new_model()
        optimizer = make_optimizer(model, self.options.lr, self.options.weight_decay)
        if tensors is not None:
            model.load_state_dict(tensors["model"])
            optimizer.load_state_dict(tensors["optimizer"])
        model.eval()
        return model, optimizer

    # -- one evaluation --

    def _loss_vector(self, observation: Aggregate, previous: list[float] | None) -> tuple[list[float], list[str]]:
        unknown = sorted(set(observation.losses) - set(self.names))
        if unknown:
            raise ValueError(f"losses for configurations not in this run: {unknown}")
        present = [observation.losses[n] for n in self.names if n in observation.losses]  # not empty: see update
        for name, value in observation.losses.items():
            if not math.isfinite(value):
                raise ValueError(f"loss of {name!r} is not finite: {value!r}")
        # A configuration without validation tokens keeps its last loss (reward 0 for it, and for the
        # next evaluation's change from this unmeasured loss: see update).
        fill = float(np.mean(present))
        imputed = [n for n in self.names if n not in observation.losses]
        losses = [
            float(observation.losses[n]) if n in observation.losses else (previous[i] if previous else fill)
            for i, n in enumerate(self.names)
        ]
        return losses, imputed

    def update(self, state: bytes, observation: Aggregate) -> Decision:
        if observation.split != "validation":
            raise ValueError(f"the birdie policy observes validation losses, got split {observation.split!r}")
        header, offset = self._header(state)
        step = observation.step
        if header["steps"] and step <= header["steps"][-1]:
            # A late evaluation (its last rank posted after a later evaluation completed) cannot be
            # put into the past of the history; raising would leave it pending forever.
            return Decision(state=state, meta={"step": step, "ignored": "not after the last evaluation"})
        if not observation.losses:
            # Every rank scored zero validation tokens: nothing to learn from, and nothing wrong with
            # the run either.
            return Decision(state=state, meta={"step": step, "ignored": "no validation tokens"})
        previous = header["losses"][-1] if header["losses"] else None
        losses, imputed = self._loss_vector(observation, previous)
        if previous is not None:  # completes the row [previous losses, action since] -> rewards
            # A loss imputed at the previous evaluation was not measured: no old -> new change to
            # reward there (NaN -> 0), rather than one against another configuration's or a stale loss.
            unmeasured = set(header["imputed"])
            old = [math.nan if n in unmeasured else v for n, v in zip(self.names, previous)]
            header["rewards"].append(loss_reward(old, losses).tolist())
        header["steps"].append(step)
        header["losses"].append(losses)
        header["imputed"] = imputed

        rate = exploration_rate(step, self.config.total_steps, self.options)
        rows = len(header["rewards"])
        # Permanent control from the control step, but never with no history to learn from.
        in_control = step >= self.control_step and rows >= 1
        tensors = decode_tensors(state, offset)
        explored, predicted, probabilities = False, None, None
        with deterministic_torch():
            if rows >= 1:
                model, optimizer = self._restore(tensors)
                history = torch.tensor(
                    [header["losses"][t] + header["actions"][t] for t in range(rows)], dtype=torch.float32
                )
                if self.options.train_steps > 0:
                    targets = torch.tensor(header["rewards"], dtype=torch.float32)
                    header["model_loss"] = _finite_or_none(
                        fit(model, optimizer, history, targets, self.options.train_steps, self.options.max_grad_norm)
                    )
                if in_control:
                    action, explored, predicted, header["score_spread"] = self._choose(
                        model, history, np.asarray(losses, dtype=np.float64), step, rate
                    )
                    probabilities = action.tolist()
                tensors = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

        header["in_control"] = in_control
        # The mixture that runs until the next evaluation: the new one, else the one running now.
        running = header["actions"][-1] if header["actions"] else self.config.initial_probabilities
        header["actions"].append(probabilities if probabilities is not None else running)
        header["exploration"].append(rate)
        header["explored"].append(explored)
        header["predicted"].append(predicted)
        meta = {
            "step": step,
            "explored": explored,
            "exploration": rate,
            "predicted_reward": predicted,
            "total_reward": total_reward(header["rewards"][-1], self.families) if header["rewards"] else None,
            "model_loss": header["model_loss"],
        }
        return Decision(state=encode_state(header, tensors), probabilities=probabilities, meta=meta)

    def _choose(
        self, model: RewardModel, history: torch.Tensor, losses: np.ndarray, step: int, rate: float
    ) -> tuple[np.ndarray, bool, float | None, float | None]:
        """(mixture, explored, its predicted score, spread of the candidates' scores)."""
        seed = self.config.seed
        states = model.prefix_states(history)
        spread = None
        explored = explores(seed, step, rate)
        if explored:
            rng = keyed_rng(seed, "birdie", "explore-mixture", step)
            action = exploring_mixture(self.families, rng, self.options.explore_floor)
        else:
            rng = keyed_rng(seed, "birdie", "candidates", step)
            candidates = random_mixtures(rng, self.options.candidates, len(self.names))
            scores = predicted_scores(model, states, losses, candidates, self.weights)
            action = average_of_best(candidates, scores, self.options.top_k)
            spread = _finite_or_none(float(scores.max() - scores.min()))
        predicted = _finite_or_none(float(predicted_scores(model, states, losses, action[None], self.weights)[0]))
        return action, explored, predicted, spread

    def describe(self, state: bytes) -> dict[str, Any]:
        header, _ = self._header(state)
        last_rewards = header["rewards"][-1] if header["rewards"] else None
        return {
            "exploration": header["exploration"][-1] if header["exploration"] else None,
            "last_losses": dict(zip(self.names, header["losses"][-1])) if header["losses"] else {},
            "rewards": dict(zip(self.names, last_rewards)) if last_rewards is not None else {},
            "predicted_reward": header["predicted"][-1] if header["predicted"] else None,
            "history_length": len(header["rewards"]),
            "evaluations": len(header["steps"]),
            "last_step": header["steps"][-1] if header["steps"] else None,
            "control_step": self.control_step,
            "in_control": header["in_control"],
            "explored": header["explored"][-1] if header["explored"] else False,
            "family_rewards": family_rewards(last_rewards, self.families) if last_rewards is not None else {},
            "total_reward": total_reward(last_rewards, self.families) if last_rewards is not None else None,
            "model_loss": header["model_loss"],
            "score_spread": header["score_spread"],
            "imputed_losses": header["imputed"],
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
