"""What an objective configuration is.

An objective configuration (objective + parameters) is one arm of the mixture. It is a frozen
pydantic model, so run configs can name it in YAML/JSON, and it has two pure methods:

- `raw_length(space, rng)`: how many corpus tokens to draw so that the example it builds fits in
  `space` row positions (input + label). 0 means it cannot fit; the packer then ends the row.
- `build(raw, rng, special)`: turn those corpus tokens into an `Example`.

Invariant every objective keeps (and the property tests check): for any n <= raw_length(space, rng)
with n >= min_raw, `len(ex.input) + len(ex.label) <= space`, the input starts with the paradigm
token and both parts are non-empty. No I/O, no globals, no hidden randomness: all of it comes from
the `rng` argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from objective_server.special_tokens import SpecialTokens


@dataclass(frozen=True)
class Example:
    """One objective example: `input` is the bidirectional prefix, `label` the causal suffix."""

    input: np.ndarray  # int32, starts with the paradigm token
    label: np.ndarray  # int32, non-empty

    @property
    def size(self) -> int:
        return len(self.input) + len(self.label)


class Objective(BaseModel, ABC):
    """Base of every objective configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: ClassVar[str]
    # Fewest corpus tokens an example of this objective is made from (a configuration may need more).
    min_raw: ClassVar[int] = 8

    @property
    @abstractmethod
    def name(self) -> str:
        """Stable, readable, URL-safe name, e.g. `infilling.span3.mask15.len512`."""

    @abstractmethod
    def paradigm(self) -> str:
        """The paradigm token (a string from special_tokens.PARADIGMS) that starts the input."""

    @abstractmethod
    def raw_length(self, space: int, rng: np.random.Generator) -> int:
        """Corpus tokens to draw so that the example fits in `space` positions; 0 if none fit."""

    @abstractmethod
    def build(self, raw: np.ndarray, rng: np.random.Generator, special: SpecialTokens) -> Example:
        """The example made from corpus tokens `raw` (1-D int array)."""

    def params(self) -> dict:
        return self.model_dump()
