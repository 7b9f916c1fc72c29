"""Named mixtures of objective configurations with their initial probabilities.

- `birdie`: all seven families over a grid close to the paper's (about 55 configurations at
  seq_len 2048); uniform over families, then uniform within each family. At 85 % noise every noise
  span needs a kept token before it, which caps the span count at the kept tokens: the two
  `autoencoding*.span3.mask85` configurations cut noise spans of mean 0.85 / 0.15 = 5.7 tokens
  between single kept tokens (span 8 and 32 are as named). The names keep stating the parameters
  asked for, so runs that name them are unchanged.
- `ul2`: UL2's seven denoisers: R (3, 15 %), (8, 15 %); X (3, 50 %), (8, 50 %), (64, 15 %),
  (64, 50 %); S (prefix LM 75 %). S gets 20 % and the six R/X denoisers share the rest evenly.
- `decoder-ul2`: 60 % NTP, 20 % prefix LM, 10 % infilling (3, 15 %), 10 % infilling (32, 50 %).
- `ntp`: next-token prediction only.

Lengths are chosen for the row length `seq_len`: grid lengths scale with seq_len / 2048, and a
length that cannot be used in full (the example would not fit in one row, or the span-corrupting
objectives would need more spans than every tokenizer has sentinels) is cut to the longest that
can, so that every configuration's name states the raw length it really uses.
"""

from __future__ import annotations

from itertools import product
from typing import Callable

from objective_server.objectives.autoencoding import Autoencoding
from objective_server.objectives.base import Objective
from objective_server.objectives.copying import Copying
from objective_server.objectives.deshuffling import Deshuffling
from objective_server.objectives.infilling import Infilling
from objective_server.objectives.next_token import NextToken
from objective_server.objectives.prefix_lm import PrefixLM
from objective_server.objectives.selective_copying import SelectiveCopying
from objective_server.rng import keyed_rng

Mixture = list[tuple[Objective, float]]
REFERENCE_SEQ_LEN = 2048
MIN_SEQ_LEN = 128


def _fitted(cls: type[Objective], seq_len: int, length: int | None = None, **params) -> Objective:
    """`cls(length=..., **params)` with the length (default: the whole row) cut to what one
    example in a row of seq_len positions can use."""
    wanted = cls(length=length or seq_len, **params)
    usable = wanted.raw_length(seq_len, keyed_rng("presets"))  # deterministic for every objective
    return wanted if usable == wanted.length else cls(length=usable, **params)


def _scaled(length_at_2048: int, seq_len: int) -> int:
    return max(length_at_2048 * seq_len // REFERENCE_SEQ_LEN, 8)


def _uniform_over_families(objectives: list[Objective]) -> Mixture:
    # Cut lengths can make two grid points the same configuration; keep it once.
    objectives = list(dict.fromkeys(objectives))
    family_sizes: dict[str, int] = {}
    for o in objectives:
        family_sizes[o.family] = family_sizes.get(o.family, 0) + 1
    return [(o, 1 / (len(family_sizes) * family_sizes[o.family])) for o in objectives]


def birdie(seq_len: int) -> Mixture:
    def scaled(length: int) -> int:
        return _scaled(length, seq_len)

    # Selective copying spans shrink with short rows so that four queries still leave a context.
    span_length = (4, max(4, min(32, scaled(32))))
    objectives: list[Objective] = [
        _fitted(NextToken, seq_len),
        _fitted(PrefixLM, seq_len, fraction=0.75),
        *(_fitted(Infilling, seq_len, scaled(length), mean_span=span, rate=rate)
          for rate, span, length in product((0.05, 0.15, 0.5), (3, 8, 32), (512, 1024))),
        *(_fitted(SelectiveCopying, seq_len, scaled(length), n_spans=spans,
                  query_position=position, span_length=span_length)
          for spans, position, length in product((1, 2, 3, 4), ("before", "after"), (384, 1536))),
        *(_fitted(Copying, seq_len, scaled(length)) for length in (64, 256, 1024)),
        *(_fitted(Deshuffling, seq_len, scaled(length), fraction=fraction)
          for fraction, length in product((0.5, 1.0), (256, 1024))),
        *(_fitted(Autoencoding, seq_len, scaled(1024), mean_span=span, rate=rate,
                  deshuffle=deshuffle)
          for rate, span, deshuffle in product((0.15, 0.85), (3, 8, 32), (False, True))),
    ]
    return _uniform_over_families(objectives)


def ul2(seq_len: int) -> Mixture:
    denoisers = [_fitted(Infilling, seq_len, mean_span=span, rate=rate)
                 for span, rate in ((3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5))]
    return [(o, 0.8 / len(denoisers)) for o in denoisers] + [
        (_fitted(PrefixLM, seq_len, fraction=0.75), 0.2)]


def decoder_ul2(seq_len: int) -> Mixture:
    return [
        (_fitted(NextToken, seq_len), 0.6),
        (_fitted(PrefixLM, seq_len, fraction=0.75), 0.2),
        (_fitted(Infilling, seq_len, mean_span=3, rate=0.15), 0.1),
        (_fitted(Infilling, seq_len, mean_span=32, rate=0.5), 0.1),
    ]


def ntp(seq_len: int) -> Mixture:
    return [(_fitted(NextToken, seq_len), 1.0)]


PRESETS: dict[str, Callable[[int], Mixture]] = {
    "birdie": birdie,
    "ul2": ul2,
    "decoder-ul2": decoder_ul2,
    "ntp": ntp,
}


def list_presets() -> list[str]:
    return list(PRESETS)


def preset(name: str, seq_len: int = REFERENCE_SEQ_LEN) -> Mixture:
    """The preset's (configuration, initial probability) pairs for rows of seq_len positions."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"presets need seq_len >= {MIN_SEQ_LEN}, got {seq_len}")
    return PRESETS[name](seq_len)
