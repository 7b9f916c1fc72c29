"""Infilling (T5/UL2 span corruption): fill in the spans that were cut out of the text.

Input: the paradigm token ([R], or [X] for UL2's extreme settings: rate >= 50 % or mean span
>= 32), then the text with each noise span replaced by its sentinel. Label: each sentinel followed
by the tokens of its span, in text order. Spans follow T5's arithmetic (see spans.py).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from objective_server.objectives.assembly import tokens_of
from objective_server.objectives.base import Example
from objective_server.objectives.naming import NameField
from objective_server.objectives.spans import SpanCorruption, span_count, with_sentinels
from objective_server.special_tokens import SpecialTokens


class Infilling(SpanCorruption):
    family: Literal["infilling"] = "infilling"

    name_fields = (NameField("mean_span", "span", "number"), NameField("rate", "mask", "percent"),
                   NameField("length", "len", "int"))

    def paradigm(self) -> str:
        return "[X]" if self.rate >= 0.5 or self.mean_span >= 32 else "[R]"

    def size(self, n: int) -> int:
        # The paradigm token, all n tokens, and each span's sentinel once in input and label.
        return 1 + n + 2 * span_count(n, self.rate, self.mean_span)

    def build(self, raw: np.ndarray, rng: np.random.Generator, special: SpecialTokens) -> Example:
        tokens = tokens_of(raw, self)
        kept_lengths, noise_lengths, noise = self.spans(len(tokens), rng, special)
        sentinels = special.sentinel_ids
        body = with_sentinels(tokens[~noise], kept_lengths, sentinels, before=False,
                              head=special[self.paradigm()])
        label = with_sentinels(tokens[noise], noise_lengths, sentinels, before=True)
        return Example(input=body, label=label)
