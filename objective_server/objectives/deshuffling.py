"""Deshuffling: read the text with some of its tokens moved, write the original.

round(fraction * n) positions are chosen and their tokens are rotated along a random cycle
through them (Sattolo's construction), so every chosen position receives another position's
token: exactly the configured share is displaced. Tokens are permuted, never characters, so the
length never changes (the reference code shuffled characters and re-tokenised).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from objective_server.objectives.assembly import at_least, joined, tokens_of
from objective_server.objectives.base import Example
from objective_server.objectives.naming import NamedObjective, NameField, rounded_fraction
from objective_server.special_tokens import SpecialTokens


def displaced_count(n: int, fraction: float) -> int:
    """Positions to displace among n: round(fraction * n), at least 2 (a cycle needs two)."""
    return min(max(round(n * fraction), 2), n)


def cyclic_shuffle(tokens: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of `tokens` with `count` random positions' tokens rotated along a random cycle."""
    # choice() returns the positions in random order; reading that order as one cycle gives a
    # uniformly random cyclic permutation of them, which leaves none in place.
    cycle = rng.choice(len(tokens), count, replace=False)
    shuffled = tokens.copy()
    shuffled[cycle] = tokens[np.roll(cycle, 1)]
    return shuffled


class Deshuffling(NamedObjective):
    family: Literal["deshuffling"] = "deshuffling"
    fraction: Annotated[float, rounded_fraction(0, 1, high_inclusive=True)] = Field(
        0.5, description="share of token positions displaced (the paper uses 0.5 and 1.0)")
    length: int = Field(1024, ge=8, description="most raw tokens per example")

    name_fields = (NameField("fraction", "frac", "percent"), NameField("length", "len", "int"))

    def paradigm(self) -> str:
        return "[DESHUFFLE]"

    def raw_length(self, space: int, rng: np.random.Generator) -> int:
        return at_least(min(self.length, (space - 1) // 2), self.min_raw)

    def build(self, raw: np.ndarray, rng: np.random.Generator, special: SpecialTokens) -> Example:
        tokens = tokens_of(raw, self)
        shuffled = cyclic_shuffle(tokens, displaced_count(len(tokens), self.fraction), rng)
        return Example(input=joined([special[self.paradigm()]], shuffled), label=tokens.copy())
