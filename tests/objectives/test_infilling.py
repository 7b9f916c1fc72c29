"""Infilling: sentinels map one-to-one to label spans and reconstruct the original."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.objectives import Infilling
from objective_server.objectives.spans import GUARANTEED_SENTINELS, noise_count, span_count

from .strategies import (
    FEW_SENTINELS,
    SPECIAL,
    infillings,
    property_test,
    rng_of,
    seeds,
    split_at,
    texts,
)


def reconstruct(ex, special) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """The text rebuilt by putting each label span where its sentinel stands in the input."""
    sentinels = set(special.sentinel_ids)
    in_sentinels, kept = split_at(ex.input[1:], sentinels.__contains__)
    label_sentinels, spans = split_at(ex.label, sentinels.__contains__)
    assert len(spans[0]) == 0  # the label starts with a sentinel
    spans = spans[1:]
    assert in_sentinels == label_sentinels  # same sentinels, same order, once each
    assert len(set(in_sentinels)) == len(in_sentinels)
    pieces = [np.concatenate([k, s]) for k, s in zip(kept, spans)] + [kept[-1]]
    return np.concatenate(pieces), in_sentinels, spans


@property_test
@given(objective=infillings, raw=texts(), seed=seeds)
def test_sentinels_map_to_spans_and_reconstruct_the_text(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    text, sentinels, spans = reconstruct(ex, SPECIAL)
    assert np.array_equal(text, raw)
    n = len(raw)
    assert sentinels == list(SPECIAL.sentinel_ids[: len(sentinels)])  # m0, m1, ... in order
    # Raw longer than raw_length allows may need more spans than the tokenizer has sentinels.
    expected_spans = min(span_count(n, objective.rate, objective.mean_span),
                         len(SPECIAL.sentinel_ids))
    assert len(spans) == expected_spans
    assert sum(len(s) for s in spans) == noise_count(n, objective.rate)
    assert all(len(s) >= 1 for s in spans)
    assert ex.size == 1 + n + 2 * len(spans)
    if expected_spans == span_count(n, objective.rate, objective.mean_span):
        assert ex.size == objective.size(n)


@property_test
@given(objective=infillings, raw=texts(min_size=600, max_size=3000), seed=seeds)
def test_more_spans_than_sentinels_merge_spans(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), FEW_SENTINELS)
    text, sentinels, _ = reconstruct(ex, FEW_SENTINELS)
    assert np.array_equal(text, raw)
    assert len(sentinels) == min(span_count(len(raw), objective.rate, objective.mean_span), 100)


@given(objective=infillings, space=st.integers(0, 5000))
def test_raw_length_is_the_longest_that_fits_with_guaranteed_sentinels(objective, space):
    n = objective.raw_length(space, rng_of(0))

    def usable(m: int) -> bool:
        spans = span_count(m, objective.rate, objective.mean_span)
        return m <= objective.length and objective.size(m) <= space and spans <= GUARANTEED_SENTINELS

    if n:
        assert usable(n) and not usable(n + 1)
    else:
        assert not usable(objective.min_raw)


def test_paradigm_follows_ul2():
    assert Infilling(mean_span=3, rate=0.15).paradigm() == "[R]"
    assert Infilling(mean_span=8, rate=0.15).paradigm() == "[R]"
    assert Infilling(mean_span=3, rate=0.5).paradigm() == "[X]"
    assert Infilling(mean_span=64, rate=0.15).paradigm() == "[X]"
    assert Infilling(mean_span=32, rate=0.05).paradigm() == "[X]"


def test_long_texts_are_shortened_to_keep_spans_within_sentinels():
    # (3, 50 %) needs a sentinel per 6 tokens: the 100 guaranteed ones cover about 600 tokens.
    objective = Infilling(mean_span=3, rate=0.5, length=2048)
    n = objective.raw_length(4096, rng_of(0))
    assert 590 <= n <= 610
    assert span_count(n, 0.5, 3) <= 100 < span_count(n + 1, 0.5, 3)


@pytest.mark.parametrize("mean_span, raw, inputs_length, targets_length", [
    (3, 568, 512, 114), (8, 588, 512, 100), (64, 600, 512, 92), (3, 2274, 2048, 456),
])
def test_examples_have_t5_lengths_at_the_golden_values(mean_span, raw, inputs_length, targets_length):
    # T5's inputs end with EOS where ours start with the paradigm token; its targets add an EOS.
    ex = Infilling(mean_span=mean_span, rate=0.15, length=raw).build(
        np.arange(1000, 1000 + raw), rng_of(0), SPECIAL)
    assert (len(ex.input), len(ex.label) + 1) == (inputs_length, targets_length)
