"""Selective copying: read a context and queries, copy out the spans the queries point at.

The context is the raw text, complete (the reference code truncated it until requested spans
were gone). `n_spans` non-overlapping spans are placed uniformly at random inside it; each query
names its span by a start delimiter (the 1-8 tokens right before it) and an end delimiter (the
1-8 tokens right after it):

    input:  [SELECT] [CONTEXT] context ([QUERY] [START] start-delim [END] end-delim)*
            (or the queries first, then [CONTEXT] context, for query_position="before")
    label:  span [SEP] span ... [DONE]   (in query order, which is random)

Delimiter lengths are drawn among those that make the query answerable where possible: the
start delimiter occurring nowhere else in the context, and the end delimiter not occurring
inside the span (so the answer is the text from the start delimiter up to the first end
delimiter). Where no length achieves that (repetitive text), the longest allowed is used.
A context too short for all spans gets fewer (and shorter) spans instead of failing.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from objective_server.objectives.assembly import at_least, joined, tokens_of
from objective_server.objectives.base import Example
from objective_server.objectives.naming import NamedObjective, NameField
from objective_server.special_tokens import CONTEXT, DONE, END, QUERY, SEPARATOR, START, SpecialTokens

MAX_DELIMITER = 8
# Per query: [QUERY] [START] start-delim [END] end-delim in the input, [SEP] or [DONE] in the label.
QUERY_OVERHEAD = 3 + 2 * MAX_DELIMITER + 1
# [SELECT] [CONTEXT]
FIXED_OVERHEAD = 2
_DELIMITER_LENGTHS = np.arange(1, MAX_DELIMITER + 1)
# A token id no tokenizer has, to pad the context so every window has full width.
_OUTSIDE = -1


def place_spans(n: int, n_spans: int, span_length: tuple[int, int], rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of non-overlapping spans placed uniformly in a context of n >= 3 tokens.

    Each span keeps at least one token before and after it for its delimiters; spans that do
    not fit at their minimum length are dropped (at least one is kept, shortened if need be).
    """
    room = n - 2
    shortest, longest = span_length
    count = max(1, min(n_spans, room // shortest))
    longest = max(1, min(longest, room // count))
    lengths = rng.integers(min(shortest, longest), longest + 1, size=count)
    # Sorted uniform offsets split the free room into gaps before, between and after the spans.
    offsets = np.sort(rng.integers(0, room - lengths.sum() + 1, size=count))
    starts = 1 + offsets + np.cumsum(lengths) - lengths
    return starts, starts + lengths


def _draw_length(good: np.ndarray, longest: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row, a length drawn uniformly among the good ones (1-based columns of `good`, which
    are good from some length on), or the longest allowed when none is good."""
    good_count = (good & (_DELIMITER_LENGTHS <= longest[:, None])).sum(axis=1)
    choices = np.maximum(good_count, 1)
    # The good lengths are the last `good_count` allowed ones, up to `longest`.
    return longest - choices + 1 + (rng.random(len(longest)) * choices).astype(np.int64)


def start_delimiter_lengths(context: np.ndarray, starts: np.ndarray, rng: np.random.Generator
                            ) -> np.ndarray:
    """For each span start, a start-delimiter length preferring ones unique in the context."""
    n = len(context)
    padded = np.concatenate([np.full(MAX_DELIMITER, _OUTSIDE, dtype=context.dtype), context])
    # matching[i, t]: the tokens just before position t equal those just before span i's
    # start, over the lengths checked so far; grown one token further back per step.
    matching = np.ones((len(starts), n + 1), dtype=bool)
    occurrences = np.ones((len(starts), MAX_DELIMITER), dtype=np.int64)
    for back in range(1, MAX_DELIMITER + 1):
        previous = padded[MAX_DELIMITER - back:MAX_DELIMITER - back + n + 1]  # context[t - back]
        matching &= previous == previous[starts][:, None]
        occurrences[:, back - 1] = matching.sum(axis=1)
        if (occurrences[:, back - 1] == 1).all():
            break  # unique already: longer delimiters only match fewer places (kept at 1)
    return _draw_length(occurrences == 1, np.minimum(MAX_DELIMITER, starts), rng)


def end_delimiter_lengths(context: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """For each span, an end-delimiter length preferring ones that do not occur in the span."""
    padded = np.concatenate([context, np.full(MAX_DELIMITER, _OUTSIDE, dtype=context.dtype)])
    lengths = ends - starts
    offsets = np.arange(lengths.max())
    # matching[i, j]: the tokens from span i's j-th position on equal its end delimiter, over
    # the lengths checked so far; grown one token further per step. Rows are as long as the
    # longest span; shorter spans' extra columns start False (and point at their own start).
    matching = offsets < lengths[:, None]
    positions = np.where(matching, starts[:, None] + offsets, starts[:, None])
    occurs = np.zeros((len(starts), MAX_DELIMITER), dtype=bool)
    for ahead in range(MAX_DELIMITER):
        matching &= padded[positions + ahead] == padded[ends + ahead][:, None]
        occurs[:, ahead] = matching.any(axis=1)
        if not occurs[:, ahead].any():
            break  # occurs nowhere in a span: longer delimiters do not either (kept False)
    return _draw_length(~occurs, np.minimum(MAX_DELIMITER, len(context) - ends), rng)


class SelectiveCopying(NamedObjective):
    family: Literal["selective_copying"] = "selective_copying"
    n_spans: int = Field(1, ge=1, le=4, description="spans to copy (fewer if the context is short)")
    query_position: Literal["before", "after"] = Field(
        "after", description="whether the queries come before or after the context")
    span_length: tuple[int, int] = Field((4, 32), description="shortest and longest span")
    length: int = Field(1024, ge=8, description="most context tokens per example")

    name_fields = (NameField("n_spans", "spans", "int"), NameField("query_position", "", "word"),
                   NameField("span_length", "span", "range", omit_default=True),
                   NameField("length", "len", "int"))

    @model_validator(mode="after")
    def _check_span_length(self) -> "SelectiveCopying":
        shortest, longest = self.span_length
        if not 1 <= shortest <= longest:
            raise ValueError(f"span_length must be (shortest, longest) with 1 <= shortest <= "
                             f"longest, got {self.span_length}")
        return self

    def paradigm(self) -> str:
        return "[SELECT]"

    def raw_length(self, space: int, rng: np.random.Generator) -> int:
        # Deterministic bound: every delimiter at its longest, every span at its longest.
        overhead = FIXED_OVERHEAD + self.n_spans * (QUERY_OVERHEAD + self.span_length[1])
        return at_least(min(self.length, space - overhead), self.min_raw)

    def build(self, raw: np.ndarray, rng: np.random.Generator, special: SpecialTokens) -> Example:
        context = tokens_of(raw, self)
        starts, ends = place_spans(len(context), self.n_spans, self.span_length, rng)
        before = start_delimiter_lengths(context, starts, rng)
        after = end_delimiter_lengths(context, starts, ends, rng)
        query_head = [special[QUERY], special[START]]
        queries, answers = [], []
        for i in rng.permutation(len(starts)):
            s, e = starts[i], ends[i]
            queries += [query_head, context[s - before[i]:s], [special[END]], context[e:e + after[i]]]
            answers += [context[s:e], [special[SEPARATOR]]]
        answers[-1] = [special[DONE]]
        head = [special[self.paradigm()]]
        if self.query_position == "after":
            body = joined(head, [special[CONTEXT]], context, *queries)
        else:
            body = joined(head, *queries, [special[CONTEXT]], context)
        return Example(input=body, label=joined(*answers))
