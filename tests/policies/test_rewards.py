"""The reward function and family weighting (birdie-method.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.policies.rewards import family_rewards, family_weights, loss_reward, total_reward


@pytest.mark.parametrize(
    ("old", "new", "expected", "decimals"),
    [(4.5, 4.2, 0.952, 3), (0.6, 0.5207, 0.954, 3), (2.0, 1.9, 0.18, 2), (1.0, 0.9, 0.70, 2)],
)
def test_golden_values(old: float, new: float, expected: float, decimals: int) -> None:
    (reward,) = loss_reward([old], [new])
    assert round(float(reward), decimals) == expected


def test_vectorised_matches_one_at_a_time() -> None:
    old, new = [4.5, 0.6, 2.0, 1.0], [4.2, 0.5207, 1.9, 0.9]
    together = loss_reward(old, new)
    apart = [float(loss_reward([o], [n])[0]) for o, n in zip(old, new)]
    np.testing.assert_array_equal(together, apart)


def test_formula_by_hand() -> None:
    old, new = 3.0, 2.9
    d = (new - old) / (old + 1e-8)
    expected = -100 * math.e * math.tanh(math.e * math.sqrt(old * new) * d**3)
    assert float(loss_reward([old], [new])[0]) == pytest.approx(expected, rel=1e-12)


def test_clipped_to_plus_minus_one() -> None:
    rewards = loss_reward([4.0, 4.0, 4.0], [2.0, 8.0, 4.0])
    np.testing.assert_array_equal(rewards, [1.0, -1.0, 0.0])


def test_nan_counts_as_no_reward() -> None:
    # A negative loss makes sqrt(old * new) NaN; NaN inputs stay NaN through the formula.
    rewards = loss_reward([1.0, float("nan"), 2.0], [-0.5, 1.0, 1.9])
    assert rewards[0] == 0.0 and rewards[1] == 0.0
    assert rewards[2] == pytest.approx(0.18, abs=5e-3)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        loss_reward([1.0, 2.0], [1.0])


@given(
    old=st.floats(0.01, 20, allow_nan=False),
    ratio=st.floats(0.01, 3, allow_nan=False),
)
def test_falling_loss_is_rewarded_rising_loss_penalised(old: float, ratio: float) -> None:
    new = old * ratio
    (reward,) = loss_reward([old], [new])
    assert -1.0 <= reward <= 1.0
    if new < old:
        assert reward >= 0.0
    elif new > old:
        assert reward <= 0.0


@given(old=st.floats(0.1, 10), fall=st.floats(0.0, 0.3), more=st.floats(0.0, 0.3))
def test_a_bigger_fall_never_earns_less(old: float, fall: float, more: float) -> None:
    small, big = loss_reward([old, old], [old * (1 - fall), old * (1 - fall - more)])
    assert big >= small - 1e-12


FAMILIES = ["infilling", "infilling", "infilling", "copying", "next_token"]


def test_family_weights_are_one_over_family_size() -> None:
    np.testing.assert_allclose(family_weights(FAMILIES), [1 / 3, 1 / 3, 1 / 3, 1.0, 1.0])


def test_family_reward_is_the_mean_and_total_the_sum_over_families() -> None:
    rewards = [0.9, 0.3, 0.0, 0.5, -0.2]
    by_family = family_rewards(rewards, FAMILIES)
    assert by_family == pytest.approx({"infilling": 0.4, "copying": 0.5, "next_token": -0.2})
    assert total_reward(rewards, FAMILIES) == pytest.approx(0.4 + 0.5 - 0.2)
    assert total_reward(rewards, FAMILIES) == pytest.approx(float(family_weights(FAMILIES) @ rewards))


def test_splitting_a_family_into_more_configurations_does_not_change_its_weight() -> None:
    one = total_reward([0.6, 0.2], ["copying", "next_token"])
    many = total_reward([0.6, 0.6, 0.6, 0.6, 0.2], ["copying"] * 4 + ["next_token"])
    assert one == pytest.approx(many)


def test_family_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        family_weights([])
    with pytest.raises(ValueError):
        total_reward([0.1, 0.2], ["copying"])
    with pytest.raises(ValueError):
        family_rewards([0.1], ["copying", "infilling"])
