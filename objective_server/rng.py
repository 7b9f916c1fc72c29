"""Counter-based, keyed randomness.

Every random choice in batch generation comes from a generator keyed by what it is for, e.g.
(seed, "train", rank, step, row), never from process state, pid or time: the same key gives the
same stream on any host, in any process, in any order of requests.
"""

from __future__ import annotations

import hashlib

import numpy as np


def key_of(*parts: object) -> int:
    """A 128-bit integer key from any str/int parts (stable across processes and platforms)."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little")


def keyed_rng(*parts: object) -> np.random.Generator:
    """A Philox generator (counter-based) keyed by `parts`."""
    return np.random.Generator(np.random.Philox(key=key_of(*parts)))
