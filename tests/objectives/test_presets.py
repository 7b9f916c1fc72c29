"""Presets: the Birdie grid, UL2, decoder-UL2 and NTP mixtures, sized for the row length."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from objective_server.objectives import FAMILIES, Infilling, parse_objective
from objective_server.objectives.presets import list_presets, preset

from .strategies import SPECIAL, rng_of

SEQ_LENS = (128, 512, 2048, 8192)


def test_list_presets():
    assert list_presets() == ["birdie", "ul2", "decoder-ul2", "ntp"]


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("name", ["birdie", "ul2", "decoder-ul2", "ntp"])
def test_every_configuration_is_sound_at_its_row_length(name, seq_len):
    arms = preset(name, seq_len=seq_len)
    assert math.isclose(sum(p for _, p in arms), 1.0)
    assert all(p > 0 for _, p in arms)
    names = [o.name for o, _ in arms]
    assert len(set(names)) == len(names)
    for objective, _ in arms:
        assert parse_objective(objective.name) == objective
        # The name states the raw length an example really uses in a row of seq_len.
        assert objective.raw_length(seq_len, rng_of(0)) == objective.length


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_birdie_is_uniform_over_families_then_within(seq_len):
    arms = preset("birdie", seq_len=seq_len)
    by_family = defaultdict(list)
    for objective, p in arms:
        by_family[objective.family].append(p)
    assert set(by_family) == set(FAMILIES)
    for probabilities in by_family.values():
        assert math.isclose(sum(probabilities), 1 / 7)
        assert all(math.isclose(p, probabilities[0]) for p in probabilities)


def test_birdie_grid_at_2048():
    objectives = [o for o, _ in preset("birdie")]
    assert len(objectives) >= 20
    infilling = {(o.rate, o.mean_span) for o in objectives if o.family == "infilling"}
    assert infilling == {(r, s) for r in (0.05, 0.15, 0.5) for s in (3, 8, 32)}
    selective = {(o.n_spans, o.query_position) for o in objectives
                 if o.family == "selective_copying"}
    assert selective == {(k, q) for k in (1, 2, 3, 4) for q in ("before", "after")}
    assert {o.length for o in objectives if o.family == "copying"} >= {64, 256}
    assert {o.fraction for o in objectives if o.family == "deshuffling"} == {0.5, 1.0}
    autoencoding = {(o.rate, o.mean_span, o.deshuffle) for o in objectives
                    if o.family == "autoencoding"}
    assert autoencoding == {(r, s, d) for r in (0.15, 0.85) for s in (3, 8, 32)
                            for d in (False, True)}
    assert {o.family for o in objectives} == set(FAMILIES)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_autoencoding_at_85_percent_noise_has_the_mean_spans_the_docs_state(seq_len):
    # presets.py and README: span 3 becomes about 0.85 / 0.15 = 5.7 (one kept token per span);
    # spans 8 and 32 are as named.
    for objective, _ in preset("birdie", seq_len=seq_len):
        if objective.family != "autoencoding" or objective.rate != 0.85:
            continue
        raw = np.arange(1000, 1000 + objective.length)
        ex = objective.build(raw, rng_of(0), SPECIAL)
        spans = int(np.isin(ex.input, SPECIAL.sentinels).sum())
        kept = len(ex.input) - 1 - spans
        mean_span = (len(raw) - kept) / spans
        if objective.mean_span == 3:
            assert kept == spans and 5.3 < mean_span < 5.8, objective.name
        else:
            assert abs(mean_span / objective.mean_span - 1) < 0.2, objective.name


def test_ul2():
    arms = preset("ul2")
    denoisers = {(o.mean_span, o.rate): p for o, p in arms if isinstance(o, Infilling)}
    assert set(denoisers) == {(3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)}
    paradigms = {(o.mean_span, o.rate): o.paradigm() for o, _ in arms if isinstance(o, Infilling)}
    assert paradigms[(3, 0.15)] == paradigms[(8, 0.15)] == "[R]"
    assert {paradigms[k] for k in [(3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)]} == {"[X]"}
    (prefix,) = [(o, p) for o, p in arms if o.family == "prefix_lm"]
    assert prefix[0].fraction == 0.75 and math.isclose(prefix[1], 0.2)


def test_decoder_ul2():
    arms = {(o.family, getattr(o, "mean_span", None), getattr(o, "rate", None)): p
            for o, p in preset("decoder-ul2")}
    assert arms == pytest.approx({("next_token", None, None): 0.6,
                                  ("prefix_lm", None, None): 0.2,
                                  ("infilling", 3, 0.15): 0.1,
                                  ("infilling", 32, 0.5): 0.1})


def test_ntp():
    [(objective, p)] = preset("ntp", seq_len=1024)
    assert objective.family == "next_token" and p == 1.0 and objective.length == 1023


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="birdie, ul2, decoder-ul2, ntp"):
        preset("t5")


def test_too_short_rows_are_refused():
    with pytest.raises(ValueError, match="seq_len"):
        preset("birdie", seq_len=64)
