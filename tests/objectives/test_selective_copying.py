"""Selective copying: the whole context is there, every answer occurs in it between its
delimiters, delimiters are unique where the text allows, queries before or after."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.objectives import SelectiveCopying
from objective_server.objectives.selective_copying import (
    MAX_DELIMITER,
    end_delimiter_lengths,
    place_spans,
    start_delimiter_lengths,
)
from objective_server.special_tokens import CONTEXT, DONE, END, QUERY, SEPARATOR, START

from .strategies import (
    FIRST_TEXT_ID,
    SPECIAL,
    property_test,
    rng_of,
    seeds,
    selective_copyings,
    split_at,
    texts,
)


def parse(ex, objective, n: int):
    """(context, [(start delimiter, end delimiter)], [answers]) from an example."""
    tokens = ex.input.tolist()
    assert tokens[0] == SPECIAL["[SELECT]"]
    at = tokens.index(SPECIAL[CONTEXT])
    context = np.array(tokens[at + 1:at + 1 + n])
    if objective.query_position == "after":
        assert at == 1
        query_part = tokens[at + 1 + n:]
    else:
        assert at + 1 + n == len(tokens)
        query_part = tokens[1:at]
    queries = []
    markers, pieces = split_at(np.array(query_part), {SPECIAL[QUERY], SPECIAL[END]}.__contains__)
    assert len(pieces[0]) == 0 and markers[0::2] == [SPECIAL[QUERY]] * (len(markers) // 2)
    assert markers[1::2] == [SPECIAL[END]] * (len(markers) // 2)
    for start_piece, end_piece in zip(pieces[1::2], pieces[2::2]):
        assert start_piece[0] == SPECIAL[START]
        queries.append((start_piece[1:], end_piece))
    seps, answers = split_at(ex.label, {SPECIAL[SEPARATOR], SPECIAL[DONE]}.__contains__)
    assert seps == [SPECIAL[SEPARATOR]] * (len(seps) - 1) + [SPECIAL[DONE]]
    assert len(answers[-1]) == 0
    return context, queries, answers[:-1]


def occurrences(context: np.ndarray, start: np.ndarray, answer: np.ndarray, end: np.ndarray):
    """Where `answer` stands in the context right between `start` and `end`."""
    a, L, b = len(start), len(answer), len(end)
    return [p for p in range(a, len(context) - L - b + 1)
            if np.array_equal(context[p - a:p], start) and np.array_equal(context[p:p + L], answer)
            and np.array_equal(context[p + L:p + L + b], end)]


@property_test
@given(objective=selective_copyings(), raw=texts(max_size=600), seed=seeds)
def test_every_answer_occurs_in_the_context_between_its_delimiters(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    n = len(raw)
    context, queries, answers = parse(ex, objective, n)
    assert np.array_equal(context, raw)  # the whole context, untruncated
    assert 1 <= len(answers) == len(queries) <= objective.n_spans
    shortest, longest = objective.span_length
    if n - 2 >= objective.n_spans * shortest:
        assert len(answers) == objective.n_spans  # fewer spans only when they cannot fit
    for (start, end), answer in zip(queries, answers):
        assert 1 <= len(start) <= MAX_DELIMITER and 1 <= len(end) <= MAX_DELIMITER
        assert 1 <= len(answer) <= longest
        assert occurrences(context, start, answer, end)


@property_test
@given(objective=selective_copyings(), raw=texts(max_size=600, distinct=True), seed=seeds)
def test_spans_do_not_overlap_and_queries_are_answerable(objective, raw, seed):
    ex = objective.build(raw, rng_of(seed), SPECIAL)
    context, queries, answers = parse(ex, objective, len(raw))
    taken = np.zeros(len(raw), dtype=bool)
    for (start, end), answer in zip(queries, answers):
        (p,) = occurrences(context, start, answer, end)
        assert not taken[p:p + len(answer)].any()
        taken[p:p + len(answer)] = True
        # Distinct tokens: the start delimiter is unique, so reading from it up to the end
        # delimiter gives exactly the answer.
        assert np.count_nonzero(context == start[0]) == 1


def _count(context: np.ndarray, window: np.ndarray, positions) -> int:
    return sum(np.array_equal(context[p:p + len(window)], window) for p in positions)


@property_test
@given(raw=texts(min_size=12, max_size=200), n_spans=st.integers(1, 4), seed=seeds)
def test_delimiters_prefer_answerable_lengths(raw, n_spans, seed):
    context = raw.astype(np.int32)
    n = len(context)
    starts, ends = place_spans(n, n_spans, (2, 12), rng_of(seed))
    before = start_delimiter_lengths(context, starts, rng_of(seed + 1))
    after = end_delimiter_lengths(context, starts, ends, rng_of(seed + 2))
    for s, e, a, b in zip(starts, ends, before, after):
        longest_a, longest_b = min(MAX_DELIMITER, s), min(MAX_DELIMITER, n - e)
        assert 1 <= a <= longest_a and 1 <= b <= longest_b
        unique = [_count(context, context[s - x:s], range(n)) == 1 for x in range(1, longest_a + 1)]
        if any(unique):
            assert unique[a - 1]
        else:
            assert a == longest_a
        clear = [_count(context, context[e:e + y], range(s, e)) == 0
                 for y in range(1, longest_b + 1)]
        if any(clear):
            assert clear[b - 1]
        else:
            assert b == longest_b


@given(n=st.integers(3, 400), n_spans=st.integers(1, 4), shortest=st.integers(1, 40),
       extra=st.integers(0, 40), seed=seeds)
def test_place_spans_keeps_room_for_delimiters(n, n_spans, shortest, extra, seed):
    starts, ends = place_spans(n, n_spans, (shortest, shortest + extra), rng_of(seed))
    assert 1 <= len(starts) <= n_spans
    assert starts[0] >= 1 and ends[-1] <= n - 1
    assert np.all(ends > starts) and np.all(starts[1:] >= ends[:-1])


def test_spec_example_shape():
    # "ABCDEF" with the span "DE": [CONTEXT] ABCDEF [QUERY] [START] BC [END] F -> DE [DONE].
    objective = SelectiveCopying(n_spans=1, span_length=(2, 2), length=8)
    raw = np.arange(FIRST_TEXT_ID, FIRST_TEXT_ID + 8)
    for seed in range(20):
        ex = objective.build(raw, rng_of(seed), SPECIAL)
        context, [(start, end)], [answer] = parse(ex, objective, 8)
        p = int(answer[0] - FIRST_TEXT_ID)
        assert len(answer) == 2 and np.array_equal(start, raw[p - len(start):p])
        assert np.array_equal(end, raw[p + 2:p + 2 + len(end)])
        assert ex.label[-1] == SPECIAL[DONE]


@given(objective=selective_copyings(), space=st.integers(0, 5000), seed=seeds, data=st.data())
def test_raw_length_bound_holds_for_the_longest_raw(objective, space, seed, data):
    n = objective.raw_length(space, rng_of(seed))
    longest = min(objective.length, space - 2 - objective.n_spans * (20 + objective.span_length[1]))
    if n == 0:  # refused only when the longest raw that fits is too short to build from
        assert longest < objective.min_raw
        return
    assert n == longest
    ex = objective.build(data.draw(texts(n=n)), rng_of(seed), SPECIAL)
    assert ex.size <= space


def test_bad_span_length_is_refused():
    with pytest.raises(ValueError, match="span_length"):
        SelectiveCopying(span_length=(8, 4))
    with pytest.raises(ValueError, match="span_length"):
        SelectiveCopying(span_length=(0, 4))
