"""Human-readable views of what objectives produce: decoded input and label text per example."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from objective_server.packing import Batch, unpack_row


def decoded_examples(
    batch: Batch,
    decode: Callable[[np.ndarray], str],
    names: Sequence[str],
    rows: Sequence[int] | None = None,
    limit: int | None = None,
    special: Mapping[int, str] | None = None,
) -> list[dict]:
    """One dict per packed example: row, offset, objective name, token counts, decoded text.

    With `special` (token id -> its text, e.g. 18 -> "[m0]"), each dict also has "input_special"
    and "label_special": the [start, end) character spans of its texts that are special tokens,
    as opposed to corpus text that happens to spell one."""
    out: list[dict] = []
    for row in range(batch.shape[0]) if rows is None else rows:
        for ex in unpack_row(batch, row):
            if limit is not None and len(out) >= limit:
                return out
            example = {
                "row": int(row),
                "offset": ex.offset,
                "objective": names[ex.objective_id],
                "input_tokens": len(ex.input),
                "label_tokens": len(ex.label),
                "input": decode(ex.input),
                "label": decode(ex.label),
            }
            if special is not None:
                for part, ids in (("input", ex.input), ("label", ex.label)):
                    example[f"{part}_special"] = special_token_spans(ids, example[part], decode, special)
            out.append(example)
    return out


def special_token_spans(
    ids: np.ndarray, text: str, decode: Callable[[np.ndarray], str], special: Mapping[int, str]
) -> list[tuple[int, int]]:
    """The [start, end) spans of `text` (= decode(ids)) where its special tokens are.

    Each special token is looked for from where the text of the ids before it ends, so text that
    spells a special token ("[EOD]" in a document about tokenizers) is not taken for one."""
    ids = np.asarray(ids).reshape(-1)
    spans: list[tuple[int, int]] = []
    end = 0
    for k in np.flatnonzero(np.isin(ids, np.fromiter(special, dtype=np.int64))):
        name = special[int(ids[k])]
        start = text.find(name, max(end, len(decode(ids[:k])) if k else 0))
        if start < 0:  # a decoder that adds or drops spaces around tokens: the next one after the last
            start = text.find(name, end)
        if start < 0:
            continue
        end = start + len(name)
        spans.append((start, end))
    return spans
