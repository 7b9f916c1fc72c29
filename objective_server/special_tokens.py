"""The special tokens every objective needs, and their ids in a tokenizer.

Padding is id 0. The canonical order below is the order in which a freshly trained tokenizer
receives them (ids 0, 1, 2, ...); a loaded tokenizer gets them appended and the ids are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAD = "[PAD]"
EOD = "[EOD]"
GENERATE = "[GEN]"

# Paradigm tokens: the first token of every example's input says which task it is.
PARADIGMS = (
    "[NTP]",  # next-token prediction
    "[S]",  # prefix LM (UL2's sequential denoiser)
    "[R]",  # regular span corruption (UL2)
    "[X]",  # extreme span corruption (UL2)
    "[COPY]",
    "[DESHUFFLE]",
    "[AE]",  # autoencoding
    "[AE_DESHUFFLE]",  # autoencoding with deshuffling
    "[SELECT]",  # selective copying
)

# Selective copying's markers.
CONTEXT = "[CONTEXT]"
QUERY = "[QUERY]"
START = "[START]"
END = "[END]"
SEPARATOR = "[SEP]"
DONE = "[DONE]"
MARKERS = (CONTEXT, QUERY, START, END, SEPARATOR, DONE)

DEFAULT_SENTINELS = 256


def sentinel(i: int) -> str:
    return f"[m{i}]"


def canonical_tokens(n_sentinels: int = DEFAULT_SENTINELS) -> list[str]:
    """All special tokens in canonical order; PAD first so that it gets id 0."""
    return [PAD, EOD, GENERATE, *PARADIGMS, *MARKERS, *(sentinel(i) for i in range(n_sentinels))]


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens in one tokenizer."""

    ids: dict[str, int]
    sentinel_ids: tuple[int, ...] = field(default=())

    @classmethod
    def default(cls, n_sentinels: int = DEFAULT_SENTINELS) -> "SpecialTokens":
        """Ids 0..n-1 in canonical order: what a freshly trained tokenizer assigns."""
        return cls.from_mapping({tok: i for i, tok in enumerate(canonical_tokens(n_sentinels))})

    @classmethod
    def from_mapping(cls, ids: dict[str, int]) -> "SpecialTokens":
        missing = [t for t in canonical_tokens(0) if t not in ids]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        sentinels = []
        while sentinel(len(sentinels)) in ids:
            sentinels.append(ids[sentinel(len(sentinels))])
        if len(sentinels) < 100:
            raise ValueError(f"tokenizer has {len(sentinels)} sentinels; at least 100 are needed")
        return cls(ids=dict(ids), sentinel_ids=tuple(sentinels))

    def __getitem__(self, token: str) -> int:
        return self.ids[token]

    @property
    def pad(self) -> int:
        return self.ids[PAD]

    @property
    def eod(self) -> int:
        return self.ids[EOD]

    @property
    def generate(self) -> int:
        return self.ids[GENERATE]

    @property
    def sentinels(self) -> np.ndarray:
        return np.asarray(self.sentinel_ids, dtype=np.int32)

    def to_json(self) -> dict[str, int]:
        return dict(self.ids)
