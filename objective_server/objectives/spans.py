"""Span-corruption arithmetic shared by infilling and autoencoding (not an objective itself).

It follows T5's `random_spans_noise_mask`: of n tokens, `round(n * rate)` (clipped to [1, n-1])
are noise; they form `max(1, round(noise / mean_span))` spans; noise and non-noise segments
alternate, non-noise first, so the text ends with a noise span. Two bounds T5 does not need are
added, both only ever lowering the span count: at most as many spans as non-noise tokens (every
non-noise segment keeps >= 1 token, e.g. at 85 % noise), and at most as many spans as there are
sentinels.
"""

from __future__ import annotations

import bisect
import math
from abc import abstractmethod
from functools import cached_property
from typing import Annotated

import numpy as np
from pydantic import Field

from objective_server.objectives.assembly import longest_fitting
from objective_server.objectives.naming import NamedObjective, rounded_fraction, rounded_number
from objective_server.special_tokens import SpecialTokens

# Every tokenizer has at least this many sentinels (SpecialTokens.from_mapping refuses fewer).
# `raw_length` has no tokenizer at hand, so it keeps span counts within this guaranteed number.
GUARANTEED_SENTINELS = 100


def noise_count(n: int, rate: float) -> int:
    """Noise tokens among n: round(n * rate) (half to even, as T5) clipped to [1, n - 1]."""
    return min(max(round(n * rate), 1), n - 1)


def span_count(n: int, rate: float, mean_span: float, min_spans: int = 1,
               max_spans: int | None = None) -> int:
    """Noise spans among n tokens; see the module docstring for the bounds.

    `min_spans` raises the count where the tokens allow it (autoencoding with deshuffling wants
    two pieces to permute); `max_spans` caps it (the number of sentinels).
    """
    noise = noise_count(n, rate)
    spans = max(round(noise / mean_span), 1, min(min_spans, noise))
    spans = min(spans, n - noise)
    return spans if max_spans is None else min(spans, max_spans)


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of `n_items` into `n_segments` parts, each >= 1 (int64)."""
    if not 1 <= n_segments <= n_items:
        raise ValueError(f"cannot split {n_items} items into {n_segments} non-empty segments")
    bounds = np.empty(n_segments + 1, dtype=np.int64)
    bounds[0], bounds[-1] = 0, n_items
    bounds[1:-1] = rng.choice(n_items - 1, n_segments - 1, replace=False) + 1
    bounds[1:-1].sort()
    return bounds[1:] - bounds[:-1]


def random_spans(n: int, rate: float, mean_span: float, rng: np.random.Generator,
                 min_spans: int = 1, max_spans: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lengths of the alternating segments: (non-noise lengths, noise lengths), equally many.

    Segment i of the text is `nonnoise[i]` kept tokens followed by `noise[i]` noise tokens.
    """
    if n < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {n}")
    noise = noise_count(n, rate)
    spans = span_count(n, rate, mean_span, min_spans, max_spans)
    return random_segmentation(n - noise, spans, rng), random_segmentation(noise, spans, rng)


def noise_mask(nonnoise_lengths: np.ndarray, noise_lengths: np.ndarray) -> np.ndarray:
    """Boolean mask over the text, True on noise tokens, from the alternating segment lengths."""
    lengths = np.empty(2 * len(noise_lengths), dtype=np.int64)
    lengths[0::2], lengths[1::2] = nonnoise_lengths, noise_lengths
    return np.repeat(np.arange(len(lengths)) % 2 == 1, lengths)


def with_sentinels(tokens: np.ndarray, segment_lengths: np.ndarray, sentinels: tuple[int, ...],
                   before: bool, head: int | None = None) -> np.ndarray:
    """`tokens`, cut into consecutive segments, with sentinel i put before or after segment i,
    optionally after a first token `head` (int32)."""
    count = len(segment_lengths)
    offset = 0 if head is None else 1
    out = np.empty(offset + len(tokens) + count, dtype=np.int32)
    if head is not None:
        out[0] = head
    # Sentinel i lands after the tokens of segments before it (and i itself, when after) and
    # the i sentinels before it.
    ends = np.cumsum(segment_lengths)
    at = offset + np.arange(count) + (ends - segment_lengths if before else ends)
    is_token = np.ones(len(out), dtype=bool)
    is_token[:offset] = False
    is_token[at] = False
    out[at] = sentinels[:count]
    out[is_token] = tokens
    return out


def t5_inputs_targets_length(inputs_length: int, rate: float, mean_span: float) -> tuple[int, int]:
    """T5's `random_spans_helper`: raw tokens to read for encoder inputs of `inputs_length`.

    Returns (raw tokens length, targets length). As in T5, inputs are the non-noise tokens plus
    one sentinel per span plus EOS, targets the noise tokens plus one sentinel per span plus EOS;
    the raw length is the longest whose inputs fit (T5 scans up from `inputs_length - 1`; inputs
    grow with the raw length, so a bisection finds the same one); at rate 0.5 the raw length
    drops by one when the targets would outgrow the inputs.
    """

    def lengths(raw: int) -> tuple[int, int]:
        # T5 rounds without clipping here, unlike in the mask itself.
        noise = round(raw * rate)
        spans = round(noise / mean_span)
        return raw - noise + spans + 1, noise + spans + 1

    if inputs_length < 2 or not 0 < rate < 1 or mean_span < 1:
        raise ValueError(f"bad T5 span arguments: {inputs_length=}, {rate=}, {mean_span=}")
    # Inputs grow by about (1 - rate) per raw token, so the answer lies below this bound.
    candidates = range(inputs_length - 1, int(inputs_length / (1 - rate)) + 4)
    fitting = bisect.bisect_right(candidates, inputs_length, key=lambda raw: lengths(raw)[0])
    raw_length = candidates[fitting - 1]
    targets_length = lengths(raw_length)[1]
    if rate == 0.5 and targets_length > inputs_length:
        raw_length -= 1
        targets_length -= 1
    return raw_length, targets_length


class SpanCorruption(NamedObjective):
    """Base of the objectives that cut noise spans out of the text (infilling, autoencoding)."""

    mean_span: Annotated[float, rounded_number] = Field(
        3, ge=1, description="mean noise span length in tokens")
    rate: Annotated[float, rounded_fraction(0, 1)] = Field(0.15, description="noise share")
    length: int = Field(512, ge=8, description="most raw tokens per example")

    def min_spans(self) -> int:
        return 1

    @cached_property
    def min_raw(self) -> int:  # type: ignore[override]
        """Fewest raw tokens an example is made from: 8, or more where min_spans() spans need
        more (each span needs a noise token and a kept piece before it: min_spans() = 2 gives
        autoencoding with deshuffling two pieces to permute)."""
        k = self.min_spans()
        # Enough for both noise_count >= k and n - noise_count >= k, whatever the rounding.
        upper = max(super().min_raw, math.ceil((k + 1) / min(self.rate, 1 - self.rate)))
        lengths = range(super().min_raw, upper + 1)
        return lengths[bisect.bisect_left(
            lengths, True, key=lambda n: span_count(n, self.rate, self.mean_span, k) >= k)]

    @abstractmethod
    def size(self, n: int) -> int:
        """Exact example size for raw length n (the span count is a function of n)."""

    @cached_property
    def _raw_lengths(self) -> dict[int, int]:
        """raw_length's answers by space: a function of the space alone (no randomness), asked for
        the same few thousand spaces again and again (a bisection each: 30-40 us)."""
        return {}

    def raw_length(self, space: int, rng: np.random.Generator) -> int:
        """Longest raw length whose example fits `space` and whose span count stays within the
        sentinels every tokenizer has (sizes and span counts grow with n)."""
        known = self._raw_lengths.get(space)
        if known is not None:
            return known

        def size_within_sentinels(n: int) -> int:
            spans = span_count(n, self.rate, self.mean_span, self.min_spans())
            return self.size(n) if spans <= GUARANTEED_SENTINELS else space + 1

        n = longest_fitting(size_within_sentinels, min(self.length, space - 1), space, self.min_raw)
        self._raw_lengths[space] = n
        return n

    def spans(self, n: int, rng: np.random.Generator, special: SpecialTokens
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kept segment lengths, noise span lengths, noise mask) for a text of n tokens.

        The span count is capped at this tokenizer's sentinels, which only matters for raw
        longer than raw_length allows: spans then merge rather than share a sentinel.
        """
        kept_lengths, noise_lengths = random_spans(n, self.rate, self.mean_span, rng,
                                                   self.min_spans(), len(special.sentinel_ids))
        return kept_lengths, noise_lengths, noise_mask(kept_lengths, noise_lengths)
