"""Hypothesis strategies and helpers shared by the objective tests."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from objective_server.objectives import (
    Autoencoding,
    Copying,
    Deshuffling,
    Infilling,
    NextToken,
    PrefixLM,
    SelectiveCopying,
)
from objective_server.rng import keyed_rng
from objective_server.special_tokens import SpecialTokens, canonical_tokens

SPECIAL = SpecialTokens.default()
# A tokenizer with only the guaranteed 100 sentinels.
FEW_SENTINELS = SpecialTokens.from_mapping({t: i for i, t in enumerate(canonical_tokens(100))})
FIRST_TEXT_ID = 1000  # text ids start here, above every special id
SENTINEL_IDS = frozenset(SPECIAL.sentinel_ids)

# Timing varies on a shared 2-core machine; examples are cheap, so run plenty.
property_test = settings(deadline=None, max_examples=150,
                         suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**32 - 1)
lengths = st.integers(8, 3000)
rates = st.floats(0.01, 0.95)
mean_spans = st.one_of(st.sampled_from([1, 1.5, 2, 3, 8, 32, 64]), st.floats(1, 100))


def rng_of(seed: int) -> np.random.Generator:
    return keyed_rng("objective-test", seed)


@st.composite
def texts(draw, n: int | None = None, min_size: int = 8, max_size: int = 700,
          distinct: bool = False) -> np.ndarray:
    """Raw token ids >= FIRST_TEXT_ID; small vocabularies give repetitive (even constant) text."""
    size = n if n is not None else draw(st.integers(min_size, max_size))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    if distinct:
        ids = FIRST_TEXT_ID + rng.permutation(max(size, 1) * 2)[:size]
    else:
        vocab = draw(st.sampled_from([1, 2, 5, 100, 60000]))
        ids = FIRST_TEXT_ID + rng.integers(0, vocab, size)
    dtype = draw(st.sampled_from([np.uint16, np.int32, np.int64]))
    return ids.astype(dtype)


next_tokens = st.builds(NextToken, length=lengths)
prefix_lms = st.builds(PrefixLM, fraction=st.floats(0.01, 0.99), length=lengths)
infillings = st.builds(Infilling, mean_span=mean_spans, rate=rates, length=lengths)
copyings = st.builds(Copying, length=lengths)
deshufflings = st.builds(Deshuffling, fraction=st.sampled_from([0.5, 1.0, 0.1, 0.33]),
                         length=lengths)
autoencodings = st.builds(Autoencoding, mean_span=mean_spans, rate=rates, length=lengths,
                          deshuffle=st.booleans())


@st.composite
def selective_copyings(draw) -> SelectiveCopying:
    shortest = draw(st.integers(1, 40))
    longest = draw(st.integers(shortest, 64))
    return SelectiveCopying(n_spans=draw(st.integers(1, 4)),
                            query_position=draw(st.sampled_from(["before", "after"])),
                            span_length=(shortest, longest), length=draw(lengths))


objectives = st.one_of(next_tokens, prefix_lms, infillings, copyings, deshufflings,
                       autoencodings, selective_copyings())


def split_at(tokens: np.ndarray, is_marker) -> tuple[list[int], list[np.ndarray]]:
    """Markers found in `tokens` and the pieces between them (the piece before each marker)."""
    markers, pieces, current = [], [], []
    for t in tokens.tolist():
        if is_marker(t):
            markers.append(t)
            pieces.append(np.array(current, dtype=np.int64))
            current = []
        else:
            current.append(t)
    pieces.append(np.array(current, dtype=np.int64))
    return markers, pieces
