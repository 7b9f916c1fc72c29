"""Copying: read the text, write it out again."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from objective_server.objectives.assembly import at_least, joined, tokens_of
from objective_server.objectives.base import Example
from objective_server.objectives.naming import NamedObjective, NameField
from objective_server.special_tokens import SpecialTokens


class Copying(NamedObjective):
    family: Literal["copying"] = "copying"
    length: int = Field(256, ge=8, description="most raw tokens per example")

    name_fields = (NameField("length", "len", "int"),)

    def paradigm(self) -> str:
        return "[COPY]"

    def raw_length(self, space: int, rng: np.random.Generator) -> int:
        return at_least(min(self.length, (space - 1) // 2), self.min_raw)

    def build(self, raw: np.ndarray, rng: np.random.Generator, special: SpecialTokens) -> Example:
        tokens = tokens_of(raw, self)
        return Example(input=joined([special[self.paradigm()]], tokens), label=tokens.copy())
