"""Autoencoding (BART-like): read the text with spans cut out, write the whole original text.

Input: [AE], then the text with each noise span replaced by a sentinel (T5 span arithmetic, see
spans.py). With `deshuffle`, the paradigm is [AE_DESHUFFLE] and the kept pieces between the
spans are also put in a random order that is never the identity (the reference code never
shuffled). Sentinels stay where they are: the i-th sentinel still follows the i-th piece of the
input, so it marks "a gap follows" without revealing where the piece stood; the model has to
recover the order from the content. With deshuffling an example needs enough raw tokens for two
noise spans and two kept pieces (`min_raw`, e.g. 10 at 15 % noise), so there is always an order to
recover; fewer tokens would give plain autoencoding under the [AE_DESHUFFLE] paradigm.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from objective_server.objectives.assembly import tokens_of
from objective_server.objectives.base import Example
from objective_server.objectives.naming import NameField
from objective_server.objectives.spans import (
    SpanCorruption,
    noise_count,
    span_count,
    with_sentinels,
)
from objective_server.special_tokens import SpecialTokens


def non_identity_permutation(k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(k) other than the identity (when k >= 2)."""
    order = rng.permutation(k)
    while k >= 2 and np.array_equal(order, np.arange(k)):
        order = rng.permutation(k)  # rejection: a 1/k! chance, at most 1/2 (k = 2)
    return order


def permuted_segments(tokens: np.ndarray, lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The consecutive segments of `tokens` (of `lengths`) rearranged as segment order[0], ..."""
    starts = np.cumsum(lengths) - lengths
    new_lengths = lengths[order]
    new_starts = np.cumsum(new_lengths) - new_lengths
    # Every output position reads from its segment's old start plus its offset in the segment.
    source = np.repeat(starts[order] - new_starts, new_lengths) + np.arange(len(tokens))
    return tokens[source]


class Autoencoding(SpanCorruption):
    family: Literal["autoencoding"] = "autoencoding"
    deshuffle: bool = False

    name_fields = (NameField("deshuffle", "deshuffle", "flag"),
                   NameField("mean_span", "span", "number"), NameField("rate", "mask", "percent"),
                   NameField("length", "len", "int"))

    def paradigm(self) -> str:
        return "[AE_DESHUFFLE]" if self.deshuffle else "[AE]"

    def min_spans(self) -> int:
        return 2 if self.deshuffle else 1

    def size(self, n: int) -> int:
        # Input: paradigm, kept tokens, one sentinel per span; label: all n tokens.
        spans = span_count(n, self.rate, self.mean_span, self.min_spans())
        return 1 + (n - noise_count(n, self.rate)) + spans + n

    def build(self, raw: np.ndarray, rng: np.random.Generator, special: SpecialTokens) -> Example:
        tokens = tokens_of(raw, self)
        kept_lengths, _, noise = self.spans(len(tokens), rng, special)
        kept = tokens[~noise]
        if self.deshuffle:
            order = non_identity_permutation(len(kept_lengths), rng)
            kept = permuted_segments(kept, kept_lengths, order)
            kept_lengths = kept_lengths[order]
        body = with_sentinels(kept, kept_lengths, special.sentinel_ids, before=False,
                              head=special[self.paradigm()])
        return Example(input=body, label=tokens.copy())
