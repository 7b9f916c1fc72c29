"""The Birdie controller driven by a simulated training run (see simulation.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from objective_server.policies import make_policy
from objective_server.policies.birdie import (
    BirdieOptions,
    BirdiePolicy,
    decode_header,
    decode_tensors,
    encode_state,
    exploration_rate,
    explores,
    exploring_mixture,
    predicted_scores,
    random_mixtures,
)
from objective_server.policies.reward_model import RewardModel
from objective_server.rng import keyed_rng
from objective_server.runs import RunConfig
from objective_server.store.protocol import Aggregate

from .simulation import NAMES, PAYING, SATURATING, run_config, simulate_validation

# Small and quick where a test does not depend on the paper's sizes.
FAST = {"candidates": 256, "train_steps": 20, "width": 16, "layers": 1}
# A short run: 8 evaluations, control from step 50 (250 scaled by 400 / 20000 = 5).
SHORT = {"total_steps": 400, "eval_steps": [10, 50, 100, 150, 200, 250, 300, 350]}


def validation(step: int, losses: dict[str, float]) -> Aggregate:
    return Aggregate("validation", step, 1, losses, {n: 100 for n in losses})


def uniform_losses(value: float) -> dict[str, float]:
    return {n: value for n in NAMES}


# --- exploration --------------------------------------------------------------------------------


def test_exploration_schedule() -> None:
    options = BirdieOptions()
    total = 20_000
    assert exploration_rate(0, total, options) == 1.0
    assert exploration_rate(499, total, options) == 1.0  # the fully exploring start: 2.5 % of the run
    assert exploration_rate(500, total, options) == pytest.approx(0.5)
    assert exploration_rate(5_250, total, options) == pytest.approx(0.35)  # half-way down the cosine
    assert exploration_rate(10_000, total, options) == pytest.approx(0.2)
    assert exploration_rate(19_000, total, options) == pytest.approx(0.2)
    rates = [exploration_rate(s, total, options) for s in range(500, 10_001, 250)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    # Cosine, not linear: a quarter of the way the rate is 0.2 + 0.3 * (1 + cos(pi / 4)) / 2.
    quarter = 500 + (10_000 - 500) / 4
    assert exploration_rate(quarter, total, options) == pytest.approx(0.2 + 0.15 * (1 + math.cos(math.pi / 4)))


def test_exploration_coin_is_keyed_and_has_the_scheduled_frequency() -> None:
    coins = [explores(7, step, 0.3) for step in range(4000)]
    assert abs(np.mean(coins) - 0.3) < 0.03
    assert coins == [explores(7, step, 0.3) for step in range(4000)]
    assert coins != [explores(8, step, 0.3) for step in range(4000)]
    assert not any(explores(7, step, 0.0) for step in range(100))
    assert all(explores(7, step, 1.0) for step in range(100))


def test_exploring_mixture_favours_one_or_two_families() -> None:
    families = ["infilling"] * 4 + ["copying"] * 2 + ["next_token", "prefix_lm", "deshuffling"]
    floor = 0.01
    chosen_counts = set()
    for i in range(200):
        mixture = exploring_mixture(families, keyed_rng("test", i), floor)
        assert mixture.min() >= 0 and mixture.sum() == pytest.approx(1.0)
        per_family = {f: mixture[[j for j, g in enumerate(families) if g == f]].sum() for f in set(families)}
        small = [f for f, p in per_family.items() if p == pytest.approx(floor)]
        chosen = [f for f in per_family if f not in small]
        assert len(chosen) in (1, 2) and len(small) == len(per_family) - len(chosen)
        chosen_counts.add(len(chosen))
        assert sum(per_family[f] for f in chosen) == pytest.approx(1 - floor * len(small))
    assert chosen_counts == {1, 2}


def test_candidate_mixtures_are_normalised_uniform_draws() -> None:
    candidates = random_mixtures(keyed_rng("test"), 2048, 6)
    np.testing.assert_allclose(candidates.sum(axis=1), 1.0)
    assert candidates.min() > 0
    assert candidates.mean(axis=0) == pytest.approx(np.full(6, 1 / 6), abs=0.01)


def test_explorations_follow_the_schedule_in_a_run() -> None:
    config = run_config("birdie", FAST, seed=3, **SHORT)
    records, _ = simulate_validation(config, lambda: BirdiePolicy(config, **FAST))
    policy = BirdiePolicy(config, **FAST)
    for record in records:
        rate = exploration_rate(record.step, 400, policy.options)
        assert record.decision.meta["exploration"] == pytest.approx(rate)
        in_control = record.step >= policy.control_step
        assert record.decision.meta["explored"] == (in_control and explores(3, record.step, rate))
    assert any(r.decision.meta["explored"] for r in records)
    assert any(r.decision.probabilities is not None and not r.decision.meta["explored"] for r in records)


# --- control ------------------------------------------------------------------------------------


def test_initial_mixture_until_control_but_history_is_recorded() -> None:
    config = run_config("birdie", FAST, total_steps=2000)
    policy = BirdiePolicy(config, **FAST)
    assert policy.control_step == 25 == config.evaluation_steps[2]
    state = policy.initial_state()
    for step, loss in ((1, 6.0), (5, 5.0)):
        decision = policy.update(state, validation(step, uniform_losses(loss)))
        assert decision.probabilities is None
        state = decision.state
    described = policy.describe(state)
    assert described["history_length"] == 1 and not described["in_control"]
    header, _ = decode_header(state)
    assert header["actions"] == [config.initial_probabilities] * 2
    decision = policy.update(state, validation(25, uniform_losses(4.5)))
    assert decision.probabilities is not None
    assert sum(decision.probabilities) == pytest.approx(1.0) and min(decision.probabilities) >= 0
    assert policy.describe(decision.state)["in_control"]


def test_no_choice_without_history_even_after_the_control_step() -> None:
    options = {**FAST, "control_step": 0}
    config = run_config("birdie", options, **SHORT)
    policy = BirdiePolicy(config, **options)
    first = policy.update(policy.initial_state(), validation(10, uniform_losses(5.0)))
    assert first.probabilities is None
    second = policy.update(first.state, validation(50, uniform_losses(4.0)))
    assert second.probabilities is not None


def test_simulated_run_moves_probability_from_saturated_to_paying_configurations() -> None:
    options = {"candidates": 2048, "train_steps": 60, "width": 32, "layers": 2}
    config = run_config("birdie", options, seed=0)
    records, state = simulate_validation(config, lambda: BirdiePolicy(config, **options))
    chosen = [
        r.probabilities for r in records
        if r.step >= 500 and r.decision.probabilities is not None and not r.decision.meta["explored"]
    ]
    assert len(chosen) >= 8
    chosen = np.array(chosen)
    initial = 1 / len(NAMES)
    saturated = chosen[:, SATURATING].mean()
    paying = chosen[:, PAYING].mean()
    assert saturated < 0.75 * initial < initial < paying
    # The copying configurations really are saturated by then: their rewards are ~0.
    described = BirdiePolicy(config, **options).describe(state)
    assert all(abs(described["rewards"][NAMES[i]]) < 1e-3 for i in SATURATING)
    assert described["history_length"] == len(records) - 1


def test_the_reward_models_predictions_decide_the_mixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard against the reference code's defect: predictions read where they are all the same
    (a padding position) make the ranking, and so the mixture, arbitrary."""
    options = {**FAST, "control_step": 0, "explore_max": 0.0, "explore_min": 0.0, "explore_full_fraction": 0.0}
    config = run_config("birdie", options, **SHORT)
    policy = BirdiePolicy(config, **options)
    state = policy.initial_state()
    for step, loss in ((10, 6.0), (50, 5.0), (100, 4.6)):
        state = policy.update(state, validation(step, uniform_losses(loss))).state
    observation = validation(150, {n: 4.3 - 0.2 * i for i, n in enumerate(NAMES)})

    real = policy.update(state, observation)
    assert real.probabilities is not None
    assert policy.describe(real.state)["score_spread"] > 0  # predictions differ between candidates

    def constant(self: RewardModel, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.full((rows.shape[0], self.num_configs), 0.5)

    monkeypatch.setattr(RewardModel, "predict_next", constant)
    blind = policy.update(state, observation)
    assert blind.probabilities is not None
    assert np.abs(np.subtract(real.probabilities, blind.probabilities)).max() > 0.02
    assert policy.describe(blind.state)["score_spread"] == 0.0


def test_the_mixture_is_the_average_of_the_top_candidates_read_at_their_own_row() -> None:
    options = {**FAST, "control_step": 0, "explore_max": 0.0, "explore_min": 0.0, "explore_full_fraction": 0.0}
    config = run_config("birdie", options, seed=4, **SHORT)
    policy = BirdiePolicy(config, **options)
    state = policy.initial_state()
    for step in (10, 50, 100):
        losses = {n: 6.0 - step / 50 * (i % 3) for i, n in enumerate(NAMES)}
        decision = policy.update(state, validation(step, losses))
        state = decision.state
    # Recompute the ranking from the model the update stored, the history and the keyed candidates.
    header, offset = decode_header(state)
    model, _ = policy._restore(decode_tensors(state, offset))
    rows = len(header["rewards"])
    history = torch.tensor([header["losses"][t] + header["actions"][t] for t in range(rows)])
    candidates = random_mixtures(keyed_rng(4, "birdie", "candidates", 100), options["candidates"], len(NAMES))
    current = np.array(header["losses"][-1])
    scores = predicted_scores(model, model.prefix_states(history), current, candidates, policy.weights)
    best = np.argsort(-scores, kind="stable")[: policy.options.top_k]
    np.testing.assert_allclose(decision.probabilities, candidates[best].mean(axis=0), atol=1e-12)
    assert decision.meta["predicted_reward"] > np.median(scores)
    assert decision.meta["predicted_reward"] == header["predicted"][-1] == policy.describe(state)["predicted_reward"]


# --- determinism and replicas -------------------------------------------------------------------


def mixtures(records) -> list[list[float] | None]:
    return [r.decision.probabilities for r in records]


def test_replicas_continuing_each_others_state_match_one_process() -> None:
    config = run_config("birdie", FAST, seed=5, **SHORT)
    one = BirdiePolicy(config, **FAST)
    single, single_state = simulate_validation(config, lambda: one)
    # A fresh policy object per update, and the state copied through bytes as a store would.
    replicas, replica_state = simulate_validation(
        config, lambda: make_policy(config), on_state=lambda s: bytes(bytearray(s))
    )
    assert mixtures(single) == mixtures(replicas)
    assert [r.decision.meta for r in single] == [r.decision.meta for r in replicas]
    assert single_state == replica_state
    assert any(p is not None for p in mixtures(single))


def test_another_process_continues_the_state_exactly(tmp_path: Path) -> None:
    config = run_config("birdie", FAST, seed=2, **SHORT)
    policy = BirdiePolicy(config, **FAST)
    records, state = simulate_validation(config, lambda: policy)
    observation = validation(380, {n: 3.0 + 0.1 * i for i, n in enumerate(NAMES)})
    here = policy.update(state, observation)

    (tmp_path / "state.bin").write_bytes(state)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    script = f"""
import json, pathlib, sys
from objective_server.policies import make_policy
from objective_server.runs import RunConfig
from objective_server.store.protocol import Aggregate
d = pathlib.Path({str(tmp_path)!r})
policy = make_policy(RunConfig.model_validate_json((d / "config.json").read_text()))
decision = policy.update((d / "state.bin").read_bytes(),
                         Aggregate("validation", 380, 1, {json.dumps(observation.losses)}, {json.dumps(observation.tokens)}))
(d / "out.bin").write_bytes(decision.state)
(d / "out.json").write_text(json.dumps(decision.probabilities))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert json.loads((tmp_path / "out.json").read_text()) == here.probabilities
    assert (tmp_path / "out.bin").read_bytes() == here.state


def per_parameter_state(state: bytes, model: RewardModel) -> bytes:
    """The same policy state in format v1: the optimizer state split per parameter, in
    `model.parameters()` order, as a per-parameter AdamW's state_dict holds it."""
    header, offset = decode_header(state)
    tensors = decode_tensors(state, offset)
    (group,) = tensors["optimizer"]["param_groups"]
    flat = tensors["optimizer"]["state"][0]
    per_parameter, start = {}, 0
    for i, p in enumerate(model.parameters()):
        end = start + p.numel()
        per_parameter[i] = {"step": flat["step"].clone(), **{
            key: flat[key][start:end].reshape(p.shape).clone() for key in ("exp_avg", "exp_avg_sq")
        }}
        start = end
    assert start == flat["exp_avg"].numel()
    params = list(range(len(per_parameter)))
    tensors["optimizer"] = {"state": per_parameter, "param_groups": [{**group, "params": params}]}
    return b"birdie-policy-v1" + encode_state(header, tensors)[len(b"birdie-policy-v2") :]


def test_a_v1_state_with_per_parameter_optimizer_state_continues_exactly() -> None:
    """Runs started before the flat optimizer continue after an upgrade: a v1 state gives the same
    decision and the same (v2) state as its v2 twin."""
    config = run_config("birdie", FAST, seed=3, **SHORT)
    policy = BirdiePolicy(config, **FAST)
    _, state = simulate_validation(config, lambda: policy)
    old = per_parameter_state(state, RewardModel(len(NAMES), FAST["width"], FAST["layers"]))
    assert old.startswith(b"birdie-policy-v1") and old != state
    observation = validation(380, {n: 3.0 + 0.1 * i for i, n in enumerate(NAMES)})
    now, upgraded = policy.update(state, observation), policy.update(old, observation)
    assert upgraded.probabilities == now.probabilities
    assert upgraded.state == now.state


def test_same_seed_and_history_give_the_same_mixtures_another_seed_does_not() -> None:
    def run(seed: int):
        config = run_config("birdie", FAST, seed=seed, **SHORT)
        return mixtures(simulate_validation(config, lambda: BirdiePolicy(config, **FAST))[0])

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_update_leaves_torch_settings_and_global_rng_alone() -> None:
    config = run_config("birdie", FAST, **SHORT)
    policy = BirdiePolicy(config, **FAST)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    state = policy.initial_state()
    for step in (10, 50, 100):
        state = policy.update(state, validation(step, uniform_losses(6.0 - step / 100))).state
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    torch.testing.assert_close(torch.rand(3), expected)


def test_paper_defaults_for_one_update() -> None:
    config = run_config("birdie", {}, **SHORT)
    policy = make_policy(config)
    assert isinstance(policy, BirdiePolicy)
    assert policy.options == BirdieOptions()
    assert (policy.options.candidates, policy.options.top_k, policy.options.train_steps) == (2048, 8, 200)
    assert (policy.options.width, policy.options.layers, policy.options.lr) == (256, 4, 5e-4)
    header, _ = decode_header(policy.initial_state())
    header.update(
        steps=[10, 50], losses=[[6.0] * 6, [5.0 - 0.1 * i for i in range(6)]],
        actions=[config.initial_probabilities] * 2, rewards=[[1.0] * 6],
        exploration=[1.0, 1.0], explored=[False, False], predicted=[None, None],
    )
    decision = policy.update(encode_state(header, None), validation(100, {n: 4.5 - 0.15 * i for i, n in enumerate(NAMES)}))
    assert decision.probabilities is not None and sum(decision.probabilities) == pytest.approx(1.0)
    described = policy.describe(decision.state)
    assert described["history_length"] == 2
    assert described["model_loss"] is not None and described["predicted_reward"] is not None
    _, offset = decode_header(decision.state)
    tensors = decode_tensors(decision.state, offset)
    assert tensors["model"]["layers.0.gates.weight"].shape == (1024, 256)
    assert len(tensors["model"]) > 0 and tensors["optimizer"]["state"]


# --- what /mixture shows, and errors ------------------------------------------------------------


def test_describe_has_the_mixture_fields_at_the_top_level() -> None:
    config = run_config("birdie", FAST, **SHORT)
    policy = BirdiePolicy(config, **FAST)
    empty = policy.describe(policy.initial_state())
    assert empty["history_length"] == 0 and empty["last_losses"] == {} and empty["rewards"] == {}
    state = policy.initial_state()
    for step, loss in ((10, 6.0), (50, 5.0), (100, 4.5)):
        state = policy.update(state, validation(step, uniform_losses(loss))).state
    described = policy.describe(state)
    for key in ("exploration", "last_losses", "rewards", "predicted_reward", "history_length"):
        assert key in described
    assert described["last_losses"] == uniform_losses(4.5)
    assert set(described["rewards"]) == set(NAMES)
    assert described["rewards"][NAMES[0]] == pytest.approx(1.0)  # 5.0 -> 4.5 is a 10 % fall
    assert described["history_length"] == 2
    assert described["exploration"] == pytest.approx(exploration_rate(100, 400, policy.options))
    assert isinstance(described["predicted_reward"], float)
    json.dumps(described)  # the server returns it as JSON


def test_a_configuration_without_validation_tokens_keeps_its_last_loss() -> None:
    config = run_config("birdie", FAST, **SHORT)
    policy = BirdiePolicy(config, **FAST)
    state = policy.update(policy.initial_state(), validation(10, uniform_losses(5.0))).state
    partial = {n: 4.0 for n in NAMES[1:]}
    state = policy.update(state, validation(50, partial)).state
    described = policy.describe(state)
    assert described["last_losses"][NAMES[0]] == 5.0
    assert described["rewards"][NAMES[0]] == 0.0
    assert described["imputed_losses"] == [NAMES[0]]


def test_no_reward_from_a_loss_that_was_not_measured() -> None:
    """A reward is the change between two measured losses: when the old one was imputed (the mean
    of the other configurations at the first evaluation, or a stale carried-over loss), there is no
    old -> new change to reward (as NaN -> 0), not a spurious +-1 from another configuration's level."""
    config = run_config("birdie", FAST, **SHORT)
    policy = BirdiePolicy(config, **FAST)
    rest = {n: 5.0 for n in NAMES[1:]}
    state = policy.update(policy.initial_state(), validation(10, rest)).state  # NAMES[0] imputed as 5.0
    state = policy.update(state, validation(50, {**rest, NAMES[0]: 0.5})).state
    assert policy.describe(state)["rewards"][NAMES[0]] == 0.0
    state = policy.update(state, validation(100, {n: 4.0 for n in NAMES[1:]})).state  # carried over: 0.5
    state = policy.update(state, validation(150, {**rest, NAMES[0]: 0.4})).state
    rewards = policy.describe(state)["rewards"]
    assert rewards[NAMES[0]] == 0.0 and rewards[NAMES[1]] < -0.9  # the measured ones still count


@pytest.mark.parametrize(
    "names",
    [["copying.len64"], ["copying.len64", "next_token.len2047"], ["copying.len64", "copying.len256", "next_token.len2047"]],
)
def test_one_configuration_single_configuration_families_zero_and_identical_losses(names: list[str]) -> None:
    """K = 1, families of one configuration, losses at 0 and unchanged (d = 0): every update gives a
    finite mixture, exploring or chosen."""
    options = {**FAST, "candidates": 32, "train_steps": 3, "control_step": 0}
    config = RunConfig(name="edge", arms=[{"objective": n, "probability": 1.0} for n in names],
                       total_steps=400, policy={"name": "birdie", "options": options})
    policy = BirdiePolicy(config, **options)
    state, explored = policy.initial_state(), set()
    for step, loss in ((10, 0.0), (50, 0.0), (100, 3.0), (150, 3.0), (200, 0.0), (250, 2.0), (300, 2.0)):
        decision = policy.update(state, validation(step, {n: loss for n in names}))
        state = decision.state
        if step > 10:
            p = np.array(decision.probabilities)
            assert p.shape == (len(names),) and np.isfinite(p).all() and p.min() >= 0
            assert p.sum() == pytest.approx(1.0)
            explored.add(decision.meta["explored"])
    assert explored == {True, False}
    assert all(r == 0.0 for r in policy.describe(state)["rewards"].values())  # 2.0 -> 2.0


def test_bad_input_is_rejected_with_a_clear_error_and_late_evaluations_ignored() -> None:
    config = run_config("birdie", FAST, **SHORT)
    policy = BirdiePolicy(config, **FAST)
    state = policy.update(policy.initial_state(), validation(50, uniform_losses(5.0))).state
    for late in (10, 50):  # a late or repeated evaluation changes nothing
        ignored = policy.update(state, validation(late, uniform_losses(4.0)))
        assert ignored.state == state and ignored.probabilities is None and "ignored" in ignored.meta
    with pytest.raises(ValueError, match="validation"):
        policy.update(state, Aggregate("train", 60, 1, uniform_losses(4.0), {n: 1 for n in NAMES}))
    with pytest.raises(ValueError, match="not in this run"):
        policy.update(state, validation(60, {**uniform_losses(4.0), "copying.len999": 1.0}))
    empty = policy.update(state, validation(60, {}))  # every rank scored zero tokens: nothing to learn
    assert empty.state == state and empty.probabilities is None and empty.meta["ignored"] == "no validation tokens"
    with pytest.raises(ValueError, match="magic"):
        policy.update(b"{}", validation(60, uniform_losses(4.0)))
    other = RunConfig(name="other", arms=[a.model_dump() for a in config.arms[:3]], total_steps=400)
    with pytest.raises(ValueError, match="other objective configurations"):
        BirdiePolicy(other, **FAST).describe(state)


def test_bad_options_are_rejected() -> None:
    config = run_config("birdie", {}, **SHORT)
    with pytest.raises(ValidationError):
        BirdiePolicy(config, candidates=4, top_k=8)
    with pytest.raises(ValidationError):
        BirdiePolicy(config, candidate=2048)  # misspelt
    with pytest.raises(ValidationError):
        BirdiePolicy(config, explore_max=1.5)
    with pytest.raises(ValidationError):
        BirdiePolicy(config, explore_max=0.1, explore_min=0.2)
    with pytest.raises(ValidationError):
        make_policy(run_config("birdie", {"width": 0}, **SHORT))
