"""T5 span arithmetic: golden lengths, span counts, random partitions, sentinel placement."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.objectives.spans import (
    noise_count,
    noise_mask,
    random_segmentation,
    random_spans,
    span_count,
    t5_inputs_targets_length,
    with_sentinels,
)

from .strategies import mean_spans, property_test, rates, rng_of, seeds


@pytest.mark.parametrize("inputs_length, mean_span, rate, expected", [
    (512, 3, 0.15, (568, 114)),
    (512, 8, 0.15, (588, 100)),
    (512, 64, 0.15, (600, 92)),
    (2048, 3, 0.15, (2274, 456)),
])
def test_t5_length_helper_golden_values(inputs_length, mean_span, rate, expected):
    assert t5_inputs_targets_length(inputs_length, rate, mean_span) == expected


def _t5_scan(inputs_length: int, rate: float, mean_span: float) -> tuple[int, int]:
    """T5's helper as it is written there: scan the raw length upwards one token at a time."""

    def lengths(raw):
        noise = int(round(raw * rate))
        spans = int(round(noise / mean_span))
        return raw - noise + spans + 1, noise + spans + 1

    raw = inputs_length - 1
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    inputs, targets = lengths(raw)
    if rate == 0.5 and targets > inputs:
        raw, targets = raw - 1, targets - 1
    return raw, targets


@given(inputs_length=st.integers(2, 5000), rate=st.sampled_from([0.05, 0.15, 0.3, 0.5, 0.85]),
       mean_span=mean_spans)
def test_t5_length_helper_matches_the_upward_scan(inputs_length, rate, mean_span):
    assert t5_inputs_targets_length(inputs_length, rate, mean_span) == _t5_scan(
        inputs_length, rate, mean_span)


def test_t5_length_helper_refuses_bad_arguments():
    with pytest.raises(ValueError):
        t5_inputs_targets_length(512, 1.0, 3)
    with pytest.raises(ValueError):
        t5_inputs_targets_length(512, 0.15, 0)


@given(n=st.integers(2, 10_000), rate=rates, mean_span=mean_spans, min_spans=st.integers(1, 2))
def test_span_counts_follow_t5_within_bounds(n, rate, mean_span, min_spans):
    noise = noise_count(n, rate)
    assert noise == min(max(round(n * rate), 1), n - 1)
    spans = span_count(n, rate, mean_span, min_spans)
    t5 = max(1, round(noise / mean_span))
    assert 1 <= spans <= min(noise, n - noise)
    # Only the documented bounds move the count away from T5's.
    assert spans == min(max(t5, min(min_spans, noise)), n - noise)
    assert span_count(n, rate, mean_span, min_spans, max_spans=7) == min(spans, 7)


@given(items=st.integers(1, 3000), data=st.data(), seed=seeds)
def test_random_segmentation_is_a_composition(items, data, seed):
    segments = data.draw(st.integers(1, items))
    lengths = random_segmentation(items, segments, rng_of(seed))
    assert len(lengths) == segments and lengths.sum() == items and lengths.min() >= 1


def test_random_segmentation_is_uniform_over_compositions():
    # 5 items in 3 non-empty parts: C(4, 2) = 6 compositions, each with probability 1/6.
    rng = rng_of(7)
    counts = Counter(tuple(random_segmentation(5, 3, rng)) for _ in range(6000))
    assert len(counts) == 6
    assert all(850 < c < 1150 for c in counts.values()), counts


def test_random_segmentation_refuses_impossible_splits():
    with pytest.raises(ValueError, match="non-empty"):
        random_segmentation(3, 4, rng_of(0))
    with pytest.raises(ValueError, match="non-empty"):
        random_segmentation(3, 0, rng_of(0))


@property_test
@given(n=st.integers(2, 5000), rate=rates, mean_span=mean_spans, seed=seeds)
def test_random_spans_alternate_and_add_up(n, rate, mean_span, seed):
    kept, noise = random_spans(n, rate, mean_span, rng_of(seed))
    assert len(kept) == len(noise) == span_count(n, rate, mean_span)
    assert noise.sum() == noise_count(n, rate) and kept.sum() == n - noise.sum()
    assert kept.min() >= 1 and noise.min() >= 1
    mask = noise_mask(kept, noise)
    assert len(mask) == n and mask.sum() == noise.sum()
    # Non-noise first, noise last, and exactly 2 * spans alternating runs.
    assert not mask[0] and mask[-1]
    assert np.count_nonzero(np.diff(mask.astype(np.int8))) == 2 * len(noise) - 1


def test_sentinels_on_the_spec_example():
    # "Bird songs fill the early morning air." with spans "songs fill" and "morning air."
    words = ["Bird", "songs", "fill", "the", "early", "morning", "air."]
    ids = {w: 1000 + i for i, w in enumerate(words)}
    names = {v: k for k, v in ids.items()} | {0: "[m0]", 1: "[m1]"}
    tokens = np.array([ids[w] for w in words], dtype=np.int32)
    kept, noise = np.array([1, 2]), np.array([2, 2])
    mask = noise_mask(kept, noise)
    body = with_sentinels(tokens[~mask], kept, (0, 1), before=False)
    label = with_sentinels(tokens[mask], noise, (0, 1), before=True)
    assert [names[t] for t in body] == ["Bird", "[m0]", "the", "early", "[m1]"]
    assert [names[t] for t in label] == ["[m0]", "songs", "fill", "[m1]", "morning", "air."]
    with_head = with_sentinels(tokens[~mask], kept, (0, 1), before=False, head=77)
    assert with_head[0] == 77 and np.array_equal(with_head[1:], body)
    assert body.dtype == np.int32
