"""Small real corpora written to disk in each supported format."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Enough to train a tokenizer above the minimum vocabulary quickly.
SMALL_VOCAB = 600

_WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one "
    "had not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him see "
    "time could no make than first been its who now people my made over did down only way find "
    "use may water long little very after words called just where most know get through back "
    "much before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take why "
    "help put different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end "
    "along while might next sound below saw something thought both few those always show large "
    "often together asked house world going want school important until form food keep children "
    "café naïve façade 日本語 Ελληνικά emoji🙂 Optional[X] list[S] [EOD] [PAD] [m0] tab\tstop"
).split(" ")


def english_documents(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    """`n` documents of random words (some lines, some unicode, some literal special-token text)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        count = int(rng.integers(min_words, max_words + 1))
        words = [_WORDS[j] for j in rng.integers(0, len(_WORDS), count)]
        lines = [" ".join(words[k : k + 12]) for k in range(0, len(words), 12)]
        docs.append(f"Document {i}. " + "\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: Sequence[str], field: str = "text", **extra: object) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc, **extra}) + "\n")
    return path


def write_txt(path: Path, docs: Sequence[str]) -> Path:
    """Documents separated by blank lines (so documents must not contain blank lines)."""
    assert all("\n\n" not in d for d in docs)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    return path


def write_parquet(path: Path, docs: Sequence[str], column: str = "text",
                  row_group_size: int | None = None, large: bool = False) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = pa.large_string() if large else pa.string()
    table = pa.table({"id": pa.array(range(len(docs))), column: pa.array(list(docs), type=kind)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
