"""Prefix language modelling (UL2's S-denoiser): read the start of the text, continue it.

For fraction f the split point is uniform in [n(f-d), n(f+d)] with d = min(f, 1-f), so it
averages f*n; both parts keep at least 4 tokens.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from objective_server.objectives.assembly import at_least, joined, tokens_of
from objective_server.objectives.base import Example
from objective_server.objectives.naming import NamedObjective, NameField, rounded_fraction
from objective_server.special_tokens import SpecialTokens

MIN_PART = 4


@lru_cache(maxsize=1 << 16)  # pure, and each configuration asks for the same few thousand lengths
def split_bounds(n: int, fraction: float) -> tuple[int, int]:
    """Inclusive range of prefix lengths for n tokens (both parts >= MIN_PART when n allows)."""
    # Exact arithmetic on the fraction as written (0.55 is 55/100): in floats n * (f - d) can land
    # just above an integer that it equals, and ceil then moves the bound by one.
    f = Fraction(str(fraction))
    spread = min(f, 1 - f)
    low = max(math.ceil(n * (f - spread)), MIN_PART)
    high = min(math.floor(n * (f + spread)), n - MIN_PART)
    # A fraction near 0 or 1 can put the whole range outside [MIN_PART, n - MIN_PART]; the
    # part-size rule wins then, which leaves the single split closest to the range.
    low = min(low, n - MIN_PART)
    return low, max(high, low)


class PrefixLM(NamedObjective):
    family: Literal["prefix_lm"] = "prefix_lm"
    fraction: Annotated[float, rounded_fraction(0, 1)] = Field(
        0.75, description="mean share of the text in the prefix")
    length: int = Field(2048, ge=2 * MIN_PART, description="most raw tokens per example")

    name_fields = (NameField("fraction", "frac", "percent"), NameField("length", "len", "int"))

    def paradigm(self) -> str:
        return "[S]"

    def raw_length(self, space: int, rng: np.random.Generator) -> int:
        return at_least(min(self.length, space - 1), self.min_raw)

    def build(self, raw: np.ndarray, rng: np.random.Generator, special: SpecialTokens) -> Example:
        tokens = tokens_of(raw, self)
        low, high = split_bounds(len(tokens), self.fraction)
        split = int(rng.integers(low, high + 1))
        return Example(input=joined([special[self.paradigm()]], tokens[:split]),
                       label=tokens[split:].copy())
