"""Next-token prediction: a true LM example, the prefix holds none of the text."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from objective_server.objectives import NextToken

from .strategies import SPECIAL, next_tokens, property_test, rng_of, seeds, texts


@property_test
@given(objective=next_tokens, raw=texts(), seed=seeds)
def test_input_is_the_paradigm_token_alone_and_label_the_text(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    assert ex.input.tolist() == [SPECIAL["[NTP]"]]
    assert np.array_equal(ex.label, raw)


@given(objective=next_tokens, space=st.integers(0, 5000))
def test_raw_length_uses_all_the_space_it_may(objective, space):
    n = objective.raw_length(space, rng_of(0))
    expected = min(objective.length, space - 1)
    assert n == (expected if expected >= objective.min_raw else 0)


def test_name():
    assert NextToken(length=2047).name == "next_token.len2047"
