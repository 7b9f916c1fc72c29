"""Deshuffling: tokens (not characters) permuted, exactly the configured share displaced."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from objective_server.objectives import Deshuffling

from .strategies import SPECIAL, deshufflings, property_test, rng_of, seeds, texts


@property_test
@given(objective=deshufflings, raw=texts(), seed=seeds)
def test_input_is_a_permutation_of_the_label(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    assert ex.input[0] == SPECIAL["[DESHUFFLE]"]
    assert np.array_equal(ex.label, raw) and len(ex.input) == len(raw) + 1
    assert np.array_equal(np.sort(ex.input[1:]), np.sort(raw))


@property_test
@given(objective=deshufflings, raw=texts(distinct=True), seed=seeds)
def test_configured_share_of_positions_is_displaced(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    displaced = np.count_nonzero(ex.input[1:] != raw)
    n = len(raw)
    assert displaced == min(max(round(objective.fraction * n), 2), n)


def test_full_shuffle_moves_every_token():
    raw = np.arange(1000, 1500)
    ex = Deshuffling(fraction=1.0).build(raw, rng_of(5), SPECIAL)
    assert np.count_nonzero(ex.input[1:] == raw) == 0


def test_displaced_positions_differ_between_seeds():
    raw = np.arange(1000, 1200)
    a, b = (Deshuffling(fraction=0.5).build(raw, rng_of(s), SPECIAL).input for s in (1, 2))
    assert not np.array_equal(a, b)


@given(objective=deshufflings, space=st.integers(0, 5000))
def test_raw_length_uses_all_the_space_it_may(objective, space):
    n = objective.raw_length(space, rng_of(0))
    expected = min(objective.length, (space - 1) // 2)
    assert n == (expected if expected >= objective.min_raw else 0)
