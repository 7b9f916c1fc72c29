"""Read a prepared corpus (layout in manifest.py): memory-mapped token ids per split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from tokenizers import Tokenizer

from objective_server.corpus import manifest as layout
from objective_server.corpus.errors import CorpusError
from objective_server.corpus.tokenizer import decode, encode, read_tokenizer_file
from objective_server.corpus.tokenizer import vocab_size as vocab_size_of
from objective_server.special_tokens import SpecialTokens

_HASH_BLOCK = 8 << 20


@dataclass(frozen=True, eq=False)
class CorpusSplit:
    """One split: `tokens` (read-only memmap) and `doc_offsets` (document i is
    tokens[doc_offsets[i]:doc_offsets[i + 1]], its trailing [EOD] included)."""

    name: str
    tokens: np.ndarray
    doc_offsets: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (a view), its trailing [EOD] included."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range: the {self.name} split has {self.n_docs}")
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class TokenStore:
    """A prepared corpus on disk. `open` checks it; `split` maps the token files lazily."""

    def __init__(self, path: Path, manifest: layout.Manifest):
        self.path = path
        self._manifest = manifest
        self.manifest: dict[str, Any] = manifest.model_dump(mode="json")
        self.vocab_size: int = manifest.vocab_size
        self.token_dtype = np.dtype(manifest.token_dtype).newbyteorder("<")
        try:
            self.special = SpecialTokens.from_mapping(manifest.special_tokens)
        except ValueError as e:
            raise CorpusError(f"{path}: {layout.MANIFEST_FILE}: {e}") from None
        self._splits: dict[str, CorpusSplit] = {}

    @property
    def fingerprint(self) -> str:
        """16 hex digits naming this corpus's content: the tokenizer and every split's token and
        document files (their sha256 from the manifest). Two corpora with the same fingerprint
        serve the same batches for the same run config."""
        parts = [self._manifest.tokenizer.sha256]
        for split in sorted(self._manifest.splits):
            info = self._manifest.splits[split]
            parts += [split, info.tokens_sha256, info.docs_sha256]
        return hashlib.blake2b(" ".join(parts).encode(), digest_size=8).hexdigest()

    def __repr__(self) -> str:
        counts = ", ".join(
            f"{s}: {i.n_docs} docs / {i.n_tokens} tokens" for s, i in self._manifest.splits.items()
        )
        return f"TokenStore({str(self.path)!r}, vocab {self.vocab_size}, {counts})"

    @classmethod
    def open(cls, path: str | Path) -> TokenStore:
        """Open a prepared corpus, checking its manifest, file sizes and tokenizer (not the token
        files' contents: `verify`)."""
        path = Path(path)
        if not path.is_dir():
            raise CorpusError(f"{path}: no such prepared corpus folder")
        manifest_path = path / layout.MANIFEST_FILE
        if not manifest_path.is_file():
            raise CorpusError(f"{path}: not a prepared corpus ({layout.MANIFEST_FILE} is missing)")
        try:
            raw = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorpusError(f"{manifest_path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CorpusError(f"{manifest_path}: expected a JSON object")
        if raw.get("format") != layout.FORMAT:
            raise CorpusError(f"{manifest_path}: not a {layout.FORMAT} manifest")
        if raw.get("format_version") != layout.FORMAT_VERSION:
            raise CorpusError(
                f"{manifest_path}: format version {raw.get('format_version')!r} is not supported "
                f"(this code reads version {layout.FORMAT_VERSION}; prepare the corpus again)"
            )
        try:
            manifest = layout.Manifest.model_validate(raw)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise CorpusError(
                f"{manifest_path}: invalid at {where}: {first['msg']} "
                f"({e.error_count()} problem(s))"
            ) from None
        store = cls(path, manifest)
        store._check_files()
        store._check_tokenizer()
        return store

    def _check_files(self) -> None:
        missing = set(layout.SPLITS) - set(self._manifest.splits)
        if missing:
            raise CorpusError(f"{self.path}: manifest lacks split(s) {sorted(missing)}")
        expected = {layout.TOKENIZER_FILE: None}
        for split, info in self._manifest.splits.items():
            expected[layout.tokens_file(split)] = info.n_tokens * self.token_dtype.itemsize
            expected[layout.docs_file(split)] = (info.n_docs + 1) * 8
        for name, size in expected.items():
            file = self.path / name
            if not file.is_file():
                raise CorpusError(f"{self.path}: {name} is missing")
            actual = file.stat().st_size
            if size is not None and actual != size:
                raise CorpusError(
                    f"{file}: {actual} bytes, the manifest implies {size} (truncated or "
                    "overwritten; prepare the corpus again)"
                )

    def _check_tokenizer(self) -> None:
        """tokenizer.json is the one prepared with (sha256, a few ms) and agrees with the
        manifest's vocab_size and special token ids, which batches and models are built from."""
        file = self.path / layout.TOKENIZER_FILE
        if _sha256_of_file(file) != self._manifest.tokenizer.sha256:
            raise CorpusError(f"{file}: not the tokenizer this corpus was prepared with (its "
                              "sha256 differs from the manifest's); prepare the corpus again")
        manifest_file = self.path / layout.MANIFEST_FILE
        n_ids = vocab_size_of(self.tokenizer)
        if n_ids != self.vocab_size:
            raise CorpusError(f"{manifest_file}: vocab_size {self.vocab_size}, but {file} has "
                              f"{n_ids} ids; prepare the corpus again")
        for token, token_id in self._manifest.special_tokens.items():
            actual = self.tokenizer.token_to_id(token)
            if actual != token_id:
                raise CorpusError(
                    f"{manifest_file}: special token {token} is id {token_id}, but {file} has "
                    f"{'it at ' + str(actual) if actual is not None else 'no such token'}; "
                    "prepare the corpus again")

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._manifest.splits)

    def split(self, name: str) -> CorpusSplit:
        """The "train" or "validation" split, memory-mapped (cached)."""
        if name not in self._manifest.splits:
            raise CorpusError(f"no split {name!r} (splits: {', '.join(self.splits)})")
        if name not in self._splits:
            info = self._manifest.splits[name]
            tokens = np.memmap(self.path / layout.tokens_file(name), dtype=self.token_dtype,
                               mode="r", shape=(info.n_tokens,))
            offsets = np.memmap(self.path / layout.docs_file(name), dtype=layout.OFFSET_DTYPE,
                                mode="r", shape=(info.n_docs + 1,))
            # Cheap end checks here; the full monotonicity check is in verify().
            if offsets[0] != 0 or offsets[-1] != info.n_tokens:
                raise CorpusError(
                    f"{self.path / layout.docs_file(name)}: offsets run from {int(offsets[0])} "
                    f"to {int(offsets[-1])}, expected 0 to {info.n_tokens}"
                )
            self._splits[name] = CorpusSplit(name=name, tokens=tokens, doc_offsets=offsets)
        return self._splits[name]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The corpus tokenizer, configured like preparation used it: special-token strings in
        text are encoded as text, and no padding or truncation."""
        return read_tokenizer_file(self.path / layout.TOKENIZER_FILE)

    def decode(self, ids: Any) -> str:
        """Text of token ids (any int sequence or array), special tokens shown as "[EOD]" etc."""
        array = np.asarray(ids).reshape(-1)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            bad = array[(array < 0) | (array >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} out of range [0, {self.vocab_size})")
        return decode(self.tokenizer, array)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (int32); no special tokens added, "[EOD]" in text stays text."""
        return encode(self.tokenizer, text)

    def verify(self) -> None:
        """Recompute every file's sha256 against the manifest and check the offsets; CorpusError
        naming the first problem."""
        expected = {layout.TOKENIZER_FILE: self._manifest.tokenizer.sha256}
        for split, info in self._manifest.splits.items():
            expected[layout.tokens_file(split)] = info.tokens_sha256
            expected[layout.docs_file(split)] = info.docs_sha256
        for name, sha256 in expected.items():
            actual = _sha256_of_file(self.path / name)
            if actual != sha256:
                raise CorpusError(f"{self.path / name}: sha256 {actual} differs from the manifest")
        for name in self._manifest.splits:
            offsets = self.split(name).doc_offsets
            if np.any(np.diff(offsets) < 1):
                raise CorpusError(f"{self.path / layout.docs_file(name)}: offsets not increasing")
            eod_at_ends = self.split(name).tokens[offsets[1:] - 1] == self.special.eod
            if not np.all(eod_at_ends):
                raise CorpusError(f"{self.path / layout.tokens_file(name)}: a document does not "
                                  "end with [EOD]")
