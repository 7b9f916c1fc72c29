"""Autoencoding: the label is the original; the input's pieces and sentinels cover it; with
deshuffling the pieces are permuted (never the identity when there are two or more)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.objectives import Autoencoding
from objective_server.objectives.autoencoding import non_identity_permutation, permuted_segments
from objective_server.objectives.spans import GUARANTEED_SENTINELS, noise_count, span_count

from .strategies import (
    SPECIAL,
    autoencodings,
    mean_spans,
    property_test,
    rates,
    rng_of,
    seeds,
    split_at,
    texts,
)


def pieces_of(ex) -> tuple[list[int], list[np.ndarray]]:
    sentinels, pieces = split_at(ex.input[1:], set(SPECIAL.sentinel_ids).__contains__)
    assert len(pieces[-1]) == 0  # the input ends with a sentinel (the text ends with noise)
    return sentinels, pieces[:-1]


def positions_in(raw: np.ndarray, piece: np.ndarray) -> int:
    """Where a piece of a text of distinct tokens starts, checking it is contiguous there."""
    start = int(np.flatnonzero(raw == piece[0])[0])
    assert np.array_equal(raw[start:start + len(piece)], piece)
    return start


@property_test
@given(objective=autoencodings, seed=seeds, data=st.data())
def test_label_is_the_original_and_pieces_cover_the_kept_tokens(objective, seed, data):
    raw = data.draw(texts(min_size=objective.min_raw))
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    n = len(raw)
    assert np.array_equal(ex.label, raw)
    assert ex.input[0] == SPECIAL["[AE_DESHUFFLE]" if objective.deshuffle else "[AE]"]
    sentinels, pieces = pieces_of(ex)
    # Raw longer than raw_length allows may need more spans than the tokenizer has sentinels.
    spans = min(span_count(n, objective.rate, objective.mean_span, objective.min_spans()),
                len(SPECIAL.sentinel_ids))
    assert sentinels == list(SPECIAL.sentinel_ids[:spans])  # in place: m0, m1, ... in order
    assert all(len(p) >= 1 for p in pieces)
    kept = n - noise_count(n, objective.rate)
    assert sum(len(p) for p in pieces) == kept
    assert not Counter(np.concatenate(pieces).tolist()) - Counter(raw.tolist())  # from the text
    assert ex.size == 1 + kept + spans + n
    if spans == span_count(n, objective.rate, objective.mean_span, objective.min_spans()):
        assert ex.size == objective.size(n)


@property_test
@given(objective=autoencodings, seed=seeds, data=st.data())
def test_pieces_are_the_text_between_noise_spans(objective, seed, data):
    raw = data.draw(texts(min_size=objective.min_raw, distinct=True))
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    _, pieces = pieces_of(ex)
    starts = [positions_in(raw, p) for p in pieces]
    in_text_order = np.argsort(starts)
    ordered = [pieces[i] for i in in_text_order]
    # In text order: the first piece opens the text, every piece is followed by a noise gap.
    assert starts[in_text_order[0]] == 0
    ends = [s + len(p) for s, p in zip(sorted(starts), ordered)]
    assert all(end < nxt for end, nxt in zip(ends, sorted(starts)[1:]))
    assert ends[-1] < len(raw)
    if objective.deshuffle:  # min_raw leaves two pieces at least, and they are out of order
        assert len(pieces) >= 2 and not np.array_equal(in_text_order, np.arange(len(pieces)))
    if not objective.deshuffle:
        assert np.array_equal(in_text_order, np.arange(len(pieces)))


@given(n=st.integers(8, 3000), rate=rates, mean_span=mean_spans)
def test_deshuffling_needs_the_fewest_raw_tokens_that_give_two_pieces(n, rate, mean_span):
    objective = Autoencoding(deshuffle=True, rate=rate, mean_span=mean_span)
    noise = noise_count(n, rate)
    two_pieces = noise >= 2 and n - noise >= 2
    assert (n >= objective.min_raw) == two_pieces
    assert (span_count(n, rate, mean_span, objective.min_spans()) >= 2) == two_pieces
    assert Autoencoding(rate=rate, mean_span=mean_span).min_raw == 8  # one piece is enough


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.15, 0.5, 0.85, 0.95])
@pytest.mark.parametrize("mean_span", [1, 3, 8, 32])
def test_every_deshuffled_example_in_small_spaces_has_two_pieces_out_of_order(rate, mean_span):
    objective = Autoencoding(deshuffle=True, rate=rate, mean_span=mean_span, length=400)
    built = 0
    for space in range(8, 400):
        n = objective.raw_length(space, rng_of(0))
        if n == 0:
            assert built == 0  # only spaces too small for min_raw tokens give nothing
            continue
        raw = np.arange(1000, 1000 + n)
        _, pieces = pieces_of(objective.build(raw, rng_of(space), SPECIAL))
        starts = [positions_in(raw, p) for p in pieces]
        assert len(pieces) >= 2 and starts != sorted(starts), (space, n)
        built += 1
    assert built > 0


@given(k=st.integers(1, 6), seed=seeds)
def test_non_identity_permutation(k, seed):
    order = non_identity_permutation(k, rng_of(seed))
    assert sorted(order.tolist()) == list(range(k))
    if k >= 2:
        assert order.tolist() != list(range(k))


def test_non_identity_permutation_is_uniform_over_the_others():
    rng = rng_of(9)
    seen = [tuple(non_identity_permutation(3, rng)) for _ in range(5000)]
    counts = {p: seen.count(p) for p in set(seen)}
    assert len(counts) == 5 and all(850 < c < 1150 for c in counts.values())


def test_permuted_segments():
    tokens = np.array([10, 11, 20, 30, 31, 32])
    out = permuted_segments(tokens, np.array([2, 1, 3]), np.array([2, 0, 1]))
    assert out.tolist() == [30, 31, 32, 10, 11, 20]


@given(objective=autoencodings, space=st.integers(0, 5000))
def test_raw_length_is_the_longest_that_fits_with_guaranteed_sentinels(objective, space):
    n = objective.raw_length(space, rng_of(0))

    def usable(m: int) -> bool:
        spans = span_count(m, objective.rate, objective.mean_span, objective.min_spans())
        return m <= objective.length and objective.size(m) <= space and spans <= GUARANTEED_SENTINELS

    if n:
        assert usable(n) and not usable(n + 1)
    else:
        assert not usable(objective.min_raw)
