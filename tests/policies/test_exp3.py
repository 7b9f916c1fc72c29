"""The exp3 online-mixing baseline, driven by simulated training losses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from objective_server.policies import make_policy
from objective_server.policies.exp3 import Exp3Policy, exploration, mixture
from objective_server.runs import RunConfig
from objective_server.store.protocol import Aggregate

from .simulation import NAMES, PAYING, SATURATING, LossDynamics, run_config, simulate_training


def train(step: int, losses: dict[str, float], tokens: int = 100) -> Aggregate:
    return Aggregate("train", step, 1, losses, {n: tokens for n in losses})


def test_exploration_rate_is_odms() -> None:
    assert exploration(1, 6) == pytest.approx(1 / 6)
    assert exploration(1000, 6) == pytest.approx(math.sqrt(math.log(6) / 6000))
    assert exploration(5, 1) == 0.0
    rates = [exploration(t, 6) for t in range(1, 500)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_mixture_from_estimates() -> None:
    np.testing.assert_allclose(mixture(np.zeros(4), 100), 0.25)
    probabilities = mixture(np.array([0.0, 5.0, 10.0, 0.0]), 100)
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[2] > probabilities[1] > probabilities[0] == pytest.approx(probabilities[3])
    assert probabilities.min() >= exploration(100, 4) - 1e-12
    np.testing.assert_allclose(mixture(np.array([0.0, 50.0]), 1), 0.5)  # round 1 is uniform


def test_moves_weight_toward_arms_whose_loss_still_falls() -> None:
    config = run_config("exp3")
    history, state = simulate_training(config, Exp3Policy(config), steps=2000)
    late = np.array(history[-500:]).mean(axis=0)
    assert late[PAYING].min() > late[SATURATING].max()
    assert late[SATURATING].mean() < 1 / 6 - 0.02 < 1 / 6 + 0.01 < late[PAYING].mean()
    described = Exp3Policy(config).describe(state)
    assert described["history_length"] == 200
    assert max(described["estimates"][NAMES[i]] for i in SATURATING) < min(
        described["estimates"][NAMES[i]] for i in PAYING
    )


def test_progress_is_scale_free_where_raw_loss_is_not() -> None:
    """Saturated arms with a HIGH loss floor: ODM's raw-loss reward keeps favouring them, the
    progress reward (the default) does not."""
    dynamics = LossDynamics(floor=np.array([2.0, 1.8, 1.5, 5.0, 5.0, 1.0]))
    late = {}
    for reward in ("loss", "progress"):
        config = run_config("exp3", {"reward": reward})
        history, _ = simulate_training(config, Exp3Policy(config, reward=reward), steps=2000, dynamics=dynamics)
        late[reward] = np.array(history[-500:]).mean(axis=0)
    assert late["loss"][SATURATING].mean() > late["loss"][PAYING].mean()
    assert late["progress"][SATURATING].mean() < late["progress"][PAYING].mean()


def test_publishes_once_per_round() -> None:
    config = run_config("exp3", {"update_every": 5})
    policy = make_policy(config)
    assert isinstance(policy, Exp3Policy) and policy.observes == ("train",)
    state = policy.initial_state()
    published = []
    for step in range(20):
        decision = policy.update(state, train(step, {n: 5.0 - 0.01 * step for n in NAMES}))
        state = decision.state
        if decision.probabilities is not None:
            published.append(step)
            assert sum(decision.probabilities) == pytest.approx(1.0)
            assert decision.meta["round"] == len(published)
    assert published == [4, 9, 14, 19]


def test_deterministic_and_replicas_continue_each_other() -> None:
    config = run_config("exp3", {"update_every": 3}, seed=1)
    one, _ = simulate_training(config, Exp3Policy(config, update_every=3), steps=300)
    again, _ = simulate_training(config, Exp3Policy(config, update_every=3), steps=300)
    assert [p.tolist() for p in one] == [p.tolist() for p in again]

    # A fresh policy object for every observation, as replicas behind a load balancer would be.
    class Replicas:
        def initial_state(self) -> bytes:
            return make_policy(config).initial_state()

        def update(self, state, observation):
            return make_policy(config).update(bytes(state), observation)

    replicated, _ = simulate_training(config, Replicas(), steps=300)  # type: ignore[arg-type]
    assert [p.tolist() for p in one] == [p.tolist() for p in replicated]


def test_an_arm_without_tokens_keeps_its_estimate() -> None:
    config = run_config("exp3", {"update_every": 1})
    policy = Exp3Policy(config, update_every=1)
    state = policy.initial_state()
    for step, loss in enumerate((5.0, 4.0, 3.0)):
        state = policy.update(state, train(step, {n: loss for n in NAMES})).state
    before = policy.describe(state)["estimates"]
    losses = {n: 2.0 for n in NAMES[1:]}
    tokens = {**{n: 100 for n in NAMES[1:]}, NAMES[0]: 0}
    state = policy.update(state, Aggregate("train", 3, 1, losses, tokens)).state
    after = policy.describe(state)
    assert after["estimates"][NAMES[0]] == before[NAMES[0]]
    assert after["estimates"][NAMES[1]] > before[NAMES[1]]
    assert NAMES[0] not in after["rewards"] and NAMES[1] in after["rewards"]


def test_rewards_are_importance_weighted_by_the_rounds_probabilities() -> None:
    """The same raw reward earns an arm played at probability p a reward of raw / p (here the
    initial mixture's); a round in which no arm had tokens changes no estimate."""
    weights = [4.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    options = {"update_every": 1, "reward": "loss"}
    config = RunConfig(name="sim", arms=[{"objective": n, "probability": w} for n, w in zip(NAMES, weights)],
                       policy={"name": "exp3", "options": options})
    policy = Exp3Policy(config, **options)
    state = policy.update(policy.initial_state(), train(0, {n: 4.0 for n in NAMES})).state
    described = policy.describe(state)
    for name, p in zip(NAMES, config.initial_probabilities):
        assert described["rewards"][name] == pytest.approx(4.0 / p)
        assert described["estimates"][name] == pytest.approx(0.1 * 4.0 / p)
    decision = policy.update(state, Aggregate("train", 1, 1, {}, {n: 0 for n in NAMES}))
    assert policy.describe(decision.state)["estimates"] == described["estimates"]
    assert np.isfinite(decision.probabilities).all() and sum(decision.probabilities) == pytest.approx(1.0)


@pytest.mark.parametrize("reward", ["progress", "loss"])
def test_extreme_losses_keep_rewards_and_probabilities_finite(reward: str) -> None:
    """Any loss a post may carry (0 to 1e6, tiny ones included): a rise from a near-zero loss is a
    huge relative change, but must stay a number (JSON refuses inf, and the run's updates would
    fail forever)."""
    config = run_config("exp3", {"update_every": 1, "reward": reward})
    policy = Exp3Policy(config, update_every=1, reward=reward)
    state = policy.initial_state()
    for step, losses in enumerate(([1e-310, 0.0, 1e6], [1e6, 1e-310, 0.0], [1.0, 1e6, 5e-324], [0.0, 1e-300, 1e6])):
        decision = policy.update(state, train(step, dict(zip(NAMES, losses)), tokens=2**40))
        state = decision.state
        probabilities = np.array(decision.probabilities)
        assert np.isfinite(probabilities).all() and probabilities.sum() == pytest.approx(1.0)
        assert probabilities.min() >= exploration(step + 2, len(NAMES)) - 1e-12
    assert all(math.isfinite(e) for e in policy.describe(state)["estimates"].values())


def test_describe_has_the_mixture_fields_at_the_top_level() -> None:
    config = run_config("exp3", {"update_every": 2})
    policy = make_policy(config)
    state = policy.initial_state()
    assert policy.describe(state)["exploration"] is None
    for step in range(4):
        state = policy.update(state, train(step, {n: 4.0 - 0.1 * step for n in NAMES})).state
    described = policy.describe(state)
    for key in ("exploration", "last_losses", "rewards", "predicted_reward", "history_length"):
        assert key in described
    assert described["history_length"] == 2
    assert described["last_losses"][NAMES[0]] == pytest.approx(3.75)  # mean of steps 2 and 3
    assert described["exploration"] == pytest.approx(exploration(3, len(NAMES)))
    json.dumps(described)


def test_bad_input_and_options_are_rejected() -> None:
    config = run_config("exp3")
    policy = Exp3Policy(config)
    state = policy.initial_state()
    with pytest.raises(ValueError, match="training"):
        policy.update(state, Aggregate("validation", 1, 1, {NAMES[0]: 1.0}, {NAMES[0]: 1}))
    with pytest.raises(ValueError, match="not in this run"):
        policy.update(state, train(1, {"copying.len999": 1.0}))
    with pytest.raises(ValidationError):
        Exp3Policy(config, update_every=0)
    with pytest.raises(ValidationError):
        Exp3Policy(config, reward="accuracy")
    with pytest.raises(ValidationError):
        make_policy(run_config("exp3", {"eta": 1.0}))
