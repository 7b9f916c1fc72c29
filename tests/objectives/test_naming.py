"""Configuration names and parsing: names round-trip, dicts parse, bad configs are refused."""

from __future__ import annotations

import pytest
from hypothesis import given

from objective_server.objectives import (
    FAMILIES,
    OBJECTIVE_CLASSES,
    Autoencoding,
    Infilling,
    PrefixLM,
    SelectiveCopying,
    parse_objective,
)

from .strategies import objectives, property_test

URL_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789._-")


@property_test
@given(objective=objectives)
def test_names_and_params_round_trip(objective):
    assert set(objective.name) <= URL_SAFE
    assert objective.name.split(".")[0] == objective.family
    assert parse_objective(objective.name) == objective
    assert parse_objective(objective.params()) == objective
    assert hash(parse_objective(objective.name)) == hash(objective)


@pytest.mark.parametrize("objective, name", [
    (Infilling(mean_span=3, rate=0.15, length=512), "infilling.span3.mask15.len512"),
    (Infilling(mean_span=2.5, rate=0.125, length=64), "infilling.span2p5.mask12p5.len64"),
    (PrefixLM(fraction=0.75, length=2047), "prefix_lm.frac75.len2047"),
    (Autoencoding(mean_span=8, rate=0.85, length=512, deshuffle=True),
     "autoencoding.deshuffle.span8.mask85.len512"),
    (SelectiveCopying(n_spans=2, query_position="after", length=1024),
     "selective_copying.spans2.after.len1024"),
    (SelectiveCopying(n_spans=3, query_position="before", span_length=(8, 64), length=384),
     "selective_copying.spans3.before.span8to64.len384"),
])
def test_readable_names(objective, name):
    assert objective.name == name
    assert parse_objective(name) == objective


def test_families():
    assert FAMILIES == ("next_token", "prefix_lm", "infilling", "copying", "deshuffling",
                        "autoencoding", "selective_copying")
    for family, cls in OBJECTIVE_CLASSES.items():
        assert cls().family == family
    assert Autoencoding(deshuffle=True).family == "autoencoding"


def test_dict_parses_with_defaults():
    o = parse_objective({"family": "infilling", "mean_span": 3, "rate": 0.15})
    assert o == Infilling(mean_span=3, rate=0.15, length=512)


@pytest.mark.parametrize("spec, message", [
    ({"family": "span_corruption"}, "family"),
    ({"mean_span": 3}, "family"),
    ({"family": "infilling", "rate": 0}, "rate"),
    ({"family": "infilling", "rate": 1.0}, "rate"),
    ({"family": "infilling", "rate": 1.5}, "rate"),
    ({"family": "infilling", "rate": 1e-9}, "rate"),  # 0 once kept to 6 decimals
    ({"family": "infilling", "mean_span": 0.5}, "mean_span"),
    ({"family": "infilling", "length": 4}, "length"),
    ({"family": "infilling", "masking": 0.15}, "masking"),
    ({"family": "prefix_lm", "fraction": 1.0}, "fraction"),
    ({"family": "deshuffling", "fraction": 1.5}, "fraction"),
    ({"family": "deshuffling", "fraction": 0}, "fraction"),
    ({"family": "selective_copying", "n_spans": 5}, "n_spans"),
    ({"family": "selective_copying", "n_spans": 0}, "n_spans"),
    ({"family": "selective_copying", "query_position": "middle"}, "query_position"),
    ({"family": "autoencoding", "deshuffle": "sometimes"}, "deshuffle"),
])
def test_bad_configs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_objective(spec)


@pytest.mark.parametrize("name, message", [
    ("span_corruption.len512", "unknown family"),
    ("", "unknown family"),
    ("infilling.span3.len512", "mask"),
    ("infilling.span3.mask15.len512.extra", "unexpected"),
    ("infilling.span3.mask15", "len"),
    ("infilling.span3.mask150.len512", "rate"),
    ("selective_copying.spans2.sideways.len1024", "query_position"),
    ("selective_copying.spans9.after.len1024", "n_spans"),
    ("copying.len-5", "len"),
])
def test_bad_names_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        parse_objective(name)


def test_neither_dict_nor_name_is_refused():
    with pytest.raises(ValueError, match="dict or a name"):
        parse_objective(3)
