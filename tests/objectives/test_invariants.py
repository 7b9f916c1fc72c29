"""Invariants every objective keeps (base.py): fits `space`, paradigm first, non-empty label,
int32, pure (same rng seed, same example), tolerant of any raw of at least min_raw tokens."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.special_tokens import PARADIGMS

from .strategies import FEW_SENTINELS, SPECIAL, objectives, property_test, rng_of, seeds, texts


@property_test
@given(objective=objectives, space=st.integers(0, 4000), seed=seeds, data=st.data())
def test_example_fits_space_and_is_well_formed(objective, space, seed, data):
    n_max = objective.raw_length(space, rng_of(seed))
    assert 0 <= n_max <= objective.length
    assert n_max == 0 or n_max >= objective.min_raw
    if n_max == 0:
        return
    raw = data.draw(texts(n=data.draw(st.integers(objective.min_raw, n_max))))
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    assert ex.size <= space
    assert ex.input.dtype == np.int32 and ex.label.dtype == np.int32
    assert ex.input.ndim == 1 and ex.label.ndim == 1
    assert objective.paradigm() in PARADIGMS
    assert ex.input[0] == SPECIAL[objective.paradigm()]
    assert len(ex.label) >= 1


@property_test
@given(objective=objectives, seed=seeds, data=st.data())
def test_same_seed_same_example_and_raw_untouched(objective, seed, data):
    raw = data.draw(texts(min_size=objective.min_raw))
    before = raw.copy()
    a = objective.build(raw, rng_of(seed), SPECIAL)
    b = objective.build(raw, rng_of(seed), SPECIAL)
    assert np.array_equal(a.input, b.input) and np.array_equal(a.label, b.label)
    assert np.array_equal(raw, before)
    # Outputs are fresh arrays, never views of the caller's tokens.
    assert not np.shares_memory(a.label, raw) and not np.shares_memory(a.input, raw)


@property_test
@given(objective=objectives, seed=seeds, data=st.data())
def test_any_raw_length_builds_even_with_the_fewest_sentinels(objective, seed, data):
    # Raw longer than raw_length would allow (e.g. infilling needing > 100 spans) must still
    # build: spans merge rather than share sentinels.
    raw = data.draw(texts(min_size=objective.min_raw, max_size=3000))
    ex = objective.build(raw, rng_of(seed), FEW_SENTINELS)
    assert ex.input[0] == FEW_SENTINELS[objective.paradigm()] and len(ex.label) >= 1
    sentinels = np.asarray(FEW_SENTINELS.sentinel_ids)
    used = ex.input[np.isin(ex.input, sentinels)]
    assert len(used) == len(np.unique(used))  # one sentinel per span


@property_test
@given(objective=objectives)
def test_too_short_or_malformed_raw_is_refused(objective):
    with pytest.raises(ValueError, match="at least"):
        objective.build(np.arange(1000, 1000 + objective.min_raw - 1), rng_of(0), SPECIAL)
    with pytest.raises(ValueError, match="1-D integer"):
        objective.build(np.full((2, 50), 1000), rng_of(0), SPECIAL)
    with pytest.raises(ValueError, match="1-D integer"):
        objective.build(np.full(50, 1000.0), rng_of(0), SPECIAL)
