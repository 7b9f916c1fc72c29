"""Prefix LM: split point uniform in [n(f-d), n(f+d)], d = min(f, 1-f), both parts >= 4."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.objectives import PrefixLM
from objective_server.objectives.prefix_lm import split_bounds

from .strategies import SPECIAL, prefix_lms, property_test, rng_of, seeds, texts


@property_test
@given(objective=prefix_lms, raw=texts(), seed=seeds)
def test_split_obeys_the_bounds(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    n, split = len(raw), len(ex.input) - 1
    assert ex.input[0] == SPECIAL["[S]"]
    assert np.array_equal(np.concatenate([ex.input[1:], ex.label]), raw)
    assert split >= 4 and n - split >= 4
    low, high = exact_range(n, objective.fraction)
    if max(low, 4) <= min(high, n - 4):  # the range meets the part-size rule
        assert low <= split <= high


def exact_range(n, fraction):
    """[n(f-d), n(f+d)] rounded inwards, in exact arithmetic on the fraction as written."""
    f = Fraction(str(fraction))
    d = min(f, 1 - f)
    return math.ceil(n * (f - d)), math.floor(n * (f + d))


# Multiples of 100 make n * f an integer for every percentage: where float error would show.
@given(n=st.one_of(st.integers(8, 20_000), st.integers(1, 200).map(lambda k: 100 * k)),
       fraction=st.one_of(st.integers(1, 99).map(lambda p: p / 100),
                          st.integers(1, 999_999).map(lambda k: k / 10**6)))
def test_split_bounds_are_the_exact_range_clipped_to_the_part_sizes(n, fraction):
    low, high = exact_range(n, fraction)
    expected_low = min(max(low, 4), n - 4)
    assert split_bounds(n, fraction) == (expected_low, max(min(high, n - 4), expected_low))


@pytest.mark.parametrize("n, fraction, bounds", [
    (40, 0.55, (4, 36)),  # n(f - d) is 4 exactly; in floats 4.0000000000000036, so 5
    (20, 0.8, (12, 16)),  # 12, not 12.000000000000002
    (100, 0.65, (30, 96)),  # 30, not 30.000000000000004
])
def test_split_bounds_on_exact_products(n, fraction, bounds):
    assert split_bounds(n, fraction) == bounds


def test_split_is_uniform_over_its_range():
    objective, raw = PrefixLM(fraction=0.75), np.arange(1000, 1400)
    rng = rng_of(11)
    splits = np.array([len(objective.build(raw, rng, SPECIAL).input) - 1 for _ in range(4000)])
    # Uniform on [200, 396] (the upper end cut by the 4-token rule): mean 298, all values seen.
    assert splits.min() == 200 and splits.max() == 396
    assert abs(splits.mean() - 298) < 3
    assert len(np.unique(splits)) > 180


@given(objective=prefix_lms, space=st.integers(0, 5000))
def test_raw_length_uses_all_the_space_it_may(objective, space):
    n = objective.raw_length(space, rng_of(0))
    expected = min(objective.length, space - 1)
    assert n == (expected if expected >= objective.min_raw else 0)
