"""Copying: the label is the input text."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from .strategies import SPECIAL, copyings, property_test, rng_of, seeds, texts


@property_test
@given(objective=copyings, raw=texts(), seed=seeds)
def test_label_equals_input_text(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    assert ex.input[0] == SPECIAL["[COPY]"]
    assert np.array_equal(ex.input[1:], ex.label) and np.array_equal(ex.label, raw)


@given(objective=copyings, space=st.integers(0, 5000))
def test_raw_length_uses_all_the_space_it_may(objective, space):
    n = objective.raw_length(space, rng_of(0))
    expected = min(objective.length, (space - 1) // 2)
    assert n == (expected if expected >= objective.min_raw else 0)
