"""The fixed (B, L) batch every trainer receives, and how examples are written into it.

For an example with input x (N tokens) and label y (M tokens) written at offset s of a row
(birdie-method.md §3):

    input_ids[s : s+N+M]      = x + [GEN] + y[:-1]
    label_ids[s : s+N+M]      = [-100]*N + y          (already shifted: CE(logits[t], label_ids[t]))
    attention_mask[s : s+N+M] = [1]*N + [3]*M         (1 prefix, 3 suffix, 0 padding)
    segment_ids               = 1, 2, 3, ... per example in the row, 0 on padding
    position_ids              = 0 .. N+M-1 per example
    objective_ids             = id of the configuration that made the example, -1 on padding

Padding is on the right: input 0, label -100, mask 0, segment 0, position 0, objective -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from objective_server.objectives.base import Example

IGNORE_INDEX = -100
PADDING, PREFIX, SUFFIX = 0, 1, 3
NO_OBJECTIVE = -1


@dataclass
class Batch:
    """One packed batch: six int32 (B, L) arrays plus what produced them."""

    FIELDS: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "label_ids",
        "attention_mask",
        "segment_ids",
        "position_ids",
        "objective_ids",
    )

    input_ids: np.ndarray
    label_ids: np.ndarray
    attention_mask: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    objective_ids: np.ndarray
    # Corpus tokens the examples were made from (for coverage statistics).
    raw_tokens: int = 0
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, batch_size: int, seq_len: int) -> "Batch":
        """All padding: input 0 (whatever id [PAD] has), no labels, mask and segments 0."""
        shape = (batch_size, seq_len)
        return cls(
            input_ids=np.zeros(shape, dtype=np.int32),
            label_ids=np.full(shape, IGNORE_INDEX, dtype=np.int32),
            attention_mask=np.zeros(shape, dtype=np.int32),
            segment_ids=np.zeros(shape, dtype=np.int32),
            position_ids=np.zeros(shape, dtype=np.int32),
            objective_ids=np.full(shape, NO_OBJECTIVE, dtype=np.int32),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.FIELDS}

    @property
    def fill_rate(self) -> float:
        """Share of positions holding example tokens (not padding)."""
        return float(np.count_nonzero(self.segment_ids)) / self.segment_ids.size

    @property
    def n_examples(self) -> int:
        return int(self.segment_ids.max(axis=1).sum())

    def equals(self, other: "Batch") -> bool:
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in self.FIELDS)


def write_example(
    batch: Batch, row: int, offset: int, segment: int, example: Example, objective_id: int, generate_id: int
) -> int:
    """Write `example` into `batch` at (row, offset); returns the offset after it."""
    x, y = example.input, example.label
    n, m = len(x), len(y)
    end = offset + n + m
    if end > batch.shape[1]:
        raise ValueError(f"example of {n + m} tokens does not fit at offset {offset} of a row of {batch.shape[1]}")
    s = offset
    inp = batch.input_ids[row]
    inp[s : s + n] = x
    inp[s + n] = generate_id
    inp[s + n + 1 : end] = y[:-1]
    lab = batch.label_ids[row]
    lab[s : s + n] = IGNORE_INDEX
    lab[s + n : end] = y
    batch.attention_mask[row, s : s + n] = PREFIX
    batch.attention_mask[row, s + n : end] = SUFFIX
    batch.segment_ids[row, s:end] = segment
    batch.position_ids[row, s:end] = _ARANGE[: n + m]
    batch.objective_ids[row, s:end] = objective_id
    return end


@dataclass(frozen=True)
class PackedExample:
    """One example read back out of a packed row."""

    objective_id: int
    input: np.ndarray  # the prefix tokens
    label: np.ndarray  # the suffix labels
    offset: int


def unpack_row(batch: Batch, row: int) -> list[PackedExample]:
    """The examples of one row, in order (the inverse of `write_example`)."""
    seg = batch.segment_ids[row]
    starts = np.flatnonzero((seg != 0) & (np.diff(seg, prepend=0) != 0))
    out = []
    for s in starts:
        e = s + int(np.count_nonzero(seg[s:] == seg[s]))
        mask = batch.attention_mask[row, s:e]
        prefix = mask == PREFIX
        out.append(
            PackedExample(
                objective_id=int(batch.objective_ids[row, s]),
                input=batch.input_ids[row, s:e][prefix],
                label=batch.label_ids[row, s:e][~prefix],
                offset=int(s),
            )
        )
    return out


# position_ids are slices of one shared ramp (no per-example allocation).
_ARANGE = np.arange(1 << 20, dtype=np.int32)
