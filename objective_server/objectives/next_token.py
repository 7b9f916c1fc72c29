"""Next-token prediction: a true language model example.

The input is the paradigm token alone and the label is the whole text, so nothing of the text is
visible bidirectionally (the reference code put the text into the prefix, which made it copying).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from objective_server.objectives.assembly import at_least, tokens_of
from objective_server.objectives.base import Example
from objective_server.objectives.naming import NamedObjective, NameField
from objective_server.special_tokens import SpecialTokens


class NextToken(NamedObjective):
    family: Literal["next_token"] = "next_token"
    length: int = Field(2048, ge=8, description="most raw tokens per example")

    name_fields = (NameField("length", "len", "int"),)

    def paradigm(self) -> str:
        return "[NTP]"

    def raw_length(self, space: int, rng: np.random.Generator) -> int:
        return at_least(min(self.length, space - 1), self.min_raw)

    def build(self, raw: np.ndarray, rng: np.random.Generator, special: SpecialTokens) -> Example:
        tokens = tokens_of(raw, self)
        return Example(input=np.array([special[self.paradigm()]], dtype=np.int32),
                       label=tokens.copy())
