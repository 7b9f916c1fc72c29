"""Human-readable views of what objectives produce: decoded input and label text per example."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from objective_server.packing import Batch, unpack_row


def decoded_examples(
    batch: Batch,
    decode: Callable[[np.ndarray], str],
    names: Sequence[str],
    rows: Sequence[int] | None = None,
    limit: int | None = None,
) -> list[dict]:
    """One dict per packed example: row, offset, objective name, token counts, decoded text."""
    out: list[dict] = []
    for row in range(batch.shape[0]) if rows is None else rows:
        for ex in unpack_row(batch, row):
            if limit is not None and len(out) >= limit:
                return out
            out.append(
                {
                    "row": int(row),
                    "offset": ex.offset,
                    "objective": names[ex.objective_id],
                    "input_tokens": len(ex.input),
                    "label_tokens": len(ex.label),
                    "input": decode(ex.input),
                    "label": decode(ex.label),
                }
            )
    return out
