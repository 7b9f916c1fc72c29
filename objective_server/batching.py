"""Batch generation: a pure function of its address.

    batch = f(objectives, mixture, corpus, seed, batch_size, seq_len, rank, world_size, step)

How corpus tokens are assigned (so that ranks never overlap and an epoch covers the corpus once):
the training tokens are cut into windows of `seq_len` tokens (the most a row can consume: every
example occupies more row positions than the corpus tokens it is made from). Row b of rank r at step
s is global row g = (s * world_size + r) * batch_size + b; epoch e = g // n_windows visits every
window once in an order given by a keyed bijection of the window indices (a Feistel network, so no
permutation table is ever materialised), and each epoch shifts the window grid by a keyed offset so
that the tails a row leaves unused in one epoch are read in another. A split shorter than seq_len
is refused rather than repeated within a row.

Within a row, examples are drawn one after another: a configuration is sampled from the mixture,
it says how many corpus tokens fit in the space left, and the example is cut from the row's window
at a running cursor. A configuration that cannot fit is resampled a few times; when none fits, the
rest of the row is padding: input 0 whatever id [PAD] has (birdie-method.md §3; segment 0 and label
-100 mask it). All randomness of row g comes from one generator keyed by (seed, split, g): the same
address gives byte-identical arrays in any process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from objective_server.objectives.base import Objective
from objective_server.packing import Batch, write_example
from objective_server.rng import key_of, keyed_rng
from objective_server.special_tokens import SpecialTokens

# The revision of what this module and the objectives generate: bump it with every change that
# alters the bytes of any batch at an address (tests/test_batching.py pins them). A run records the
# revision that created it, and a server of another revision refuses it rather than serve other
# bytes at addresses already served. 1: up to 2026-11-22's session 3. 2: padding input ids 0,
# exact prefix-LM split bounds, autoencoding+deshuffling always has two pieces to permute.
GENERATOR_REVISION = 2

# Tries to find a configuration that fits the space left in a row before padding the rest.
RESAMPLES = 4
# Rows never hold examples shorter than this (positions); the rest is padding.
MIN_EXAMPLE_SPACE = 8


def window_count(n_tokens: int, seq_len: int, split: str) -> int:
    """Windows of seq_len tokens in a split. A split shorter than one row is refused: each row
    would hold its text more than once (a next-token example would become a copying task)."""
    if n_tokens < seq_len:
        raise ValueError(f"the {split} split holds {n_tokens} tokens, fewer than seq_len = {seq_len}: "
                         "its rows would repeat its text; prepare more text or use a shorter seq_len")
    return n_tokens // seq_len


def window_permutation(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n), applied elementwise to `index` (Feistel network + cycle walking)."""
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(index)
    half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half_bits) - 1)
    round_keys = [np.uint64((key >> (16 * i)) & 0xFFFF_FFFF_FFFF) for i in range(6)]
    out = index.copy()
    todo = np.ones(out.shape, dtype=bool)
    while True:
        v = out[todo]
        left, right = v >> np.uint64(half_bits), v & mask
        for rk in round_keys:
            left, right = right, left ^ (_mix(right ^ rk) & mask)
        v = (left << np.uint64(half_bits)) | right
        out[todo] = v
        todo[todo] = v >= n  # cycle walking: re-encrypt until inside [0, n)
        if not todo.any():
            return out.astype(np.int64)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixed 64-bit hash."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_windows(global_rows: np.ndarray, n_tokens: int, seq_len: int, seed: int, split: str) -> np.ndarray:
    """Start offset (in corpus tokens, before wrapping) of each global row's window."""
    n_windows = window_count(n_tokens, seq_len, split)
    epochs = global_rows // n_windows
    starts = np.empty(len(global_rows), dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        windows = window_permutation(global_rows[sel] % n_windows, n_windows, key_of(seed, split, "windows", int(epoch)))
        shift = int(keyed_rng(seed, split, "shift", int(epoch)).integers(seq_len)) if n_windows > 1 else 0
        starts[sel] = windows * seq_len + shift
    return starts


def fill_row(
    batch: Batch,
    row: int,
    window: np.ndarray,
    objectives: Sequence[Objective],
    cumulative: np.ndarray,
    rng: np.random.Generator,
    special: SpecialTokens,
    objective_ids: Sequence[int] | None = None,
) -> int:
    """Pack examples cut from `window` into `batch[row]`; returns the corpus tokens consumed."""
    seq_len = batch.shape[1]
    offset = cursor = 0
    segment = 1
    generate = special.generate
    while seq_len - offset >= MIN_EXAMPLE_SPACE:
        space = seq_len - offset
        for _ in range(RESAMPLES):
            k = int(np.searchsorted(cumulative, rng.random(), side="right"))
            k = min(k, len(objectives) - 1)
            n = objectives[k].raw_length(space, rng)
            if n:
                break
        else:
            break
        example = objectives[k].build(window[cursor : cursor + n], rng, special)
        cursor += n
        oid = k if objective_ids is None else objective_ids[k]
        offset = write_example(batch, row, offset, segment, example, oid, generate)
        segment += 1
    return cursor


def generate_batch(
    objectives: Sequence[Objective],
    probabilities: Sequence[float],
    tokens: np.ndarray,
    special: SpecialTokens,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    rank: int,
    world_size: int,
    step: int,
) -> Batch:
    """The training batch at address (rank, world_size, step) under the given mixture."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if step < 0:
        raise ValueError("step must be >= 0")
    cumulative = _cumulative(probabilities, len(objectives))
    first = (step * world_size + rank) * batch_size
    rows = np.arange(first, first + batch_size, dtype=np.int64)
    starts = row_windows(rows, len(tokens), seq_len, seed, "train")
    batch = Batch.empty(batch_size, seq_len)
    for b, (g, start) in enumerate(zip(rows, starts)):
        window = _window(tokens, int(start), seq_len)
        batch.raw_tokens += fill_row(batch, b, window, objectives, cumulative, keyed_rng(seed, "train", int(g)), special)
    return batch


def validation_batch(
    objective: Objective,
    objective_id: int,
    tokens: np.ndarray,
    special: SpecialTokens,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    index: int,
) -> Batch:
    """Fixed held-out batch `index` of one configuration, in exactly the training format."""
    if index < 0:
        raise ValueError("index must be >= 0")
    rows = np.arange(index * batch_size, (index + 1) * batch_size, dtype=np.int64)
    starts = row_windows(rows, len(tokens), seq_len, seed, "validation")
    batch = Batch.empty(batch_size, seq_len)
    only = np.ones(1)
    for b, (g, start) in enumerate(zip(rows, starts)):
        window = _window(tokens, int(start), seq_len)
        rng = keyed_rng(seed, "validation", objective.name, int(g))
        batch.raw_tokens += fill_row(batch, b, window, [objective], only, rng, special, [objective_id])
    return batch


def _cumulative(probabilities: Sequence[float], k: int) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (k,):
        raise ValueError(f"mixture has {p.shape} probabilities for {k} objectives")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("mixture probabilities must be finite, non-negative and not all zero")
    return np.cumsum(p / p.sum())


def _window(tokens: np.ndarray, start: int, seq_len: int) -> np.ndarray:
    """seq_len corpus tokens from `start`, wrapping around the end of the corpus once at most (the
    corpus holds at least seq_len tokens), as int32."""
    n = len(tokens)
    start %= n
    if start + seq_len <= n:
        return np.asarray(tokens[start : start + seq_len], dtype=np.int32)
    return np.take(tokens, np.arange(start, start + seq_len), mode="wrap").astype(np.int32)
