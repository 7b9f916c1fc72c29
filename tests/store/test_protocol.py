"""The store's records on their own: the timeline lookup and the checks on a loss post."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.store import Aggregate, LossPost, Timeline


def test_version_at_takes_the_last_entry_effective_by_then():
    timeline = Timeline((0, 5, 5, 9), max_served=8)
    assert [timeline.version_at(s) for s in (0, 4, 5, 8, 9, 10**9)] == [0, 0, 2, 2, 3, 3]
    assert timeline.latest_version == 3
    assert timeline.entries == ((0, 0), (5, 1), (5, 2), (9, 3))
    with pytest.raises(ValueError, match="step"):
        timeline.version_at(-1)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=20), st.integers(0, 60))
def test_version_at_matches_a_linear_scan(increments, step):
    effective = [0]
    for increment in increments:
        effective.append(effective[-1] + increment)
    timeline = Timeline(tuple(effective), max_served=-1)
    assert timeline.version_at(step) == max(v for v, e in enumerate(effective) if e <= step)


def test_loss_post_copies_and_normalises_its_values():
    losses, tokens = {"a": 1, "b": 2.5}, {"a": 3, "b": 0}
    post = LossPost(1, 0, 1, "train", losses, tokens)
    losses["a"] = 100.0
    assert post.losses == {"a": 1.0, "b": 2.5} and isinstance(post.losses["a"], float)
    assert post.tokens == {"a": 3, "b": 0}
    assert post.key == ("train", 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step": -1}, "step"),
        ({"step": 1.5}, "step"),
        ({"rank": 2}, "rank"),
        ({"rank": -1}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"world_size": True}, "world_size"),
        ({"split": "test"}, "split"),
        ({"losses": {"a": 1.0}, "tokens": {"b": 1}}, "same configurations"),
        ({"losses": {"a": math.nan}, "tokens": {"a": 1}}, "finite"),
        ({"losses": {"a": math.inf}, "tokens": {"a": 1}}, "finite"),
        ({"losses": {"a": "1"}, "tokens": {"a": 1}}, "finite"),
        ({"losses": {"a": 1.0}, "tokens": {"a": -1}}, r"in \[0, 1099511627776\]"),
        ({"losses": {"a": 1.0}, "tokens": {"a": 2**40 + 1}}, r"in \[0, 1099511627776\]"),  # int64 sums
        ({"losses": {"a": 1.0}, "tokens": {"a": 1.0}}, "integer"),
        ({"losses": {"": 1.0}, "tokens": {"": 1}}, "non-empty"),
    ],
)
def test_loss_post_rejects_malformed_input(kwargs, message):
    fields = {"step": 0, "rank": 0, "world_size": 2, "split": "train", "losses": {"a": 1.0}, "tokens": {"a": 1}}
    with pytest.raises(ValueError, match=message):
        LossPost(**{**fields, **kwargs})


def test_aggregate_means_are_token_weighted_and_skip_empty_configurations():
    aggregate = Aggregate.from_sums("validation", 3, 2, {"a": 30.0, "b": 0.0}, {"a": 12, "b": 0})
    assert aggregate.losses == {"a": 2.5}
    assert aggregate.tokens == {"a": 12, "b": 0}
    assert aggregate.key == ("validation", 3)
