"""manifest.json of a prepared corpus: one schema, written by `prepare`, checked by `store`.

Directory layout (format version 1):

    manifest.json        this schema
    tokenizer.json       Hugging Face tokenizers file (special tokens included)
    {split}.tokens       raw little-endian token ids (dtype `token_dtype`); every document is
                         followed by one [EOD], so a window cut across documents shows the boundary
    {split}.docs         little-endian int64 offsets, n_docs + 1 of them; document i is
                         tokens[off[i]:off[i+1]], its trailing [EOD] included
for split in ("train", "validation").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT = "birdie-token-store"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
OFFSET_DTYPE = "<i8"


def tokens_file(split: str) -> str:
    return f"{split}.tokens"


def docs_file(split: str) -> str:
    return f"{split}.docs"


def token_dtype_for(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every id."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitInfo(_Strict):
    n_docs: int = Field(ge=1)
    n_tokens: int = Field(ge=1)
    tokens_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    docs_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TokenizerInfo(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    origin: Literal["trained", "loaded"]
    source: str | None = None  # path of the loaded tokenizer.json
    added_special_tokens: list[str] = []  # canonical tokens a loaded tokenizer lacked
    padding_note: str | None = None  # set when id 0 is not a special token (see tokenizer.py)


class PrepareOptionsRecord(_Strict):
    validation_fraction: float
    seed: int
    vocab_size: int | None  # the size asked for when training; None for a loaded tokenizer
    tokenizer_sample_bytes: int | None


class Manifest(_Strict):
    format: Literal["birdie-token-store"] = FORMAT
    format_version: int
    created_at: str
    vocab_size: int = Field(ge=1)
    token_dtype: Literal["uint16", "uint32"]
    special_tokens: dict[str, int]
    tokenizer: TokenizerInfo
    splits: dict[Literal["train", "validation"], SplitInfo]
    inputs: dict[str, Any]  # the document source's own description (paths and sizes, ...)
    options: PrepareOptionsRecord
