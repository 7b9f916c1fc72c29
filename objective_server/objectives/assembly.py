"""Small array helpers every objective uses to check its tokens and size and join its pieces."""

from __future__ import annotations

import bisect
from typing import Callable

import numpy as np

from objective_server.objectives.base import Objective


def tokens_of(raw: np.ndarray, objective: Objective) -> np.ndarray:
    """`raw` as a 1-D int32 array, refused with a clear error when the objective cannot use it."""
    tokens = np.asarray(raw)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":  # signed or unsigned integers
        raise ValueError(f"{objective.name}: raw tokens must be a 1-D integer array, "
                         f"got shape {tokens.shape} of {tokens.dtype}")
    if len(tokens) < objective.min_raw:
        raise ValueError(f"{objective.name}: needs at least {objective.min_raw} raw tokens, "
                         f"got {len(tokens)}")
    return tokens.astype(np.int32, copy=False)


def joined(*parts: np.ndarray | list[int]) -> np.ndarray:
    """The parts (arrays or lists of ids) concatenated into one new int32 array."""
    return np.concatenate(parts, dtype=np.int32)


def longest_fitting(size_of: Callable[[int], int], upper: int, space: int, min_raw: int) -> int:
    """The largest n in [min_raw, upper] with size_of(n) <= space, or 0 if there is none.

    `size_of` maps a raw length to the example size (exact or a deterministic upper bound) and
    must be non-decreasing in n, so the fitting lengths are a prefix of the range: bisect it.
    """
    lengths = range(min_raw, upper + 1)
    fitting = bisect.bisect_right(lengths, space, key=size_of)
    return lengths[fitting - 1] if fitting else 0


def at_least(n: int, min_raw: int) -> int:
    """n if an example can be built from n raw tokens, else 0 (what raw_length answers)."""
    return n if n >= min_raw else 0
