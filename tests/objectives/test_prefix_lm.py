"""Prefix LM: split point uniform in [n(f-d), n(f+d)], d = min(f, 1-f), both parts >= 4."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from objective_server.objectives import PrefixLM

from .strategies import SPECIAL, prefix_lms, property_test, rng_of, seeds, texts


@property_test
@given(objective=prefix_lms, raw=texts(), seed=seeds)
def test_split_obeys_the_bounds(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    n, split = len(raw), len(ex.input) - 1
    assert ex.input[0] == SPECIAL["[S]"]
    assert np.array_equal(np.concatenate([ex.input[1:], ex.label]), raw)
    assert split >= 4 and n - split >= 4
    f = objective.fraction
    d = min(f, 1 - f)
    low, high = math.ceil(n * (f - d)), math.floor(n * (f + d))
    if max(low, 4) <= min(high, n - 4):  # the range meets the part-size rule
        assert low <= split <= high


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
