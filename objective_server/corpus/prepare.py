"""Prepare a corpus: documents -> tokenizer + memory-mappable token store (see manifest.py).

Two streaming passes over the documents, so the corpus may be larger than memory:
1. scan: count the documents, check every file reads cleanly (a malformed line deep inside a big
   file fails in seconds, not after an hour of tokenizing), settle the validation split, and
   collect a bounded, evenly spread sample of text for training the tokenizer;
2. encode: tokenize chunks of documents (in worker processes), append each chunk's tokens to
   train.tokens or validation.tokens with its offsets, hashing as it writes.

Everything is written into a hidden temporary folder next to the output and renamed into place
at the end, so a prepare that fails or is killed never leaves a folder that looks valid, and two
processes preparing the same output cannot mix their files.

Determinism: which documents are held out is a keyed hash of (seed, document index); chunks are
formed here, in order, and their results consumed in order, so the output is byte-identical for
any number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from objective_server.corpus import manifest as layout
from objective_server.corpus.errors import CorpusError, OutputExistsError, reason
from objective_server.corpus.readers import DocumentSource, FileSource
from objective_server.corpus.tokenizer import (
    add_special_tokens,
    for_corpus_text,
    padding_note,
    read_tokenizer_file,
    train_tokenizer,
    vocab_size as vocab_size_of,
)
from objective_server.rng import keyed_rng
from objective_server.special_tokens import SpecialTokens

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VALIDATION_FRACTION = 0.01
DEFAULT_TOKENIZER_SAMPLE_BYTES = 64 << 20
# A chunk is the unit of work of one encoding call; bounded so memory stays small.
CHUNK_DOCS = 1024
CHUNK_CHARS = 1 << 20
# Below this much text, starting worker processes costs more than it saves.
POOL_MIN_CHARS = 8 << 20

_UNIFORM_BLOCK = 1 << 16

log = logging.getLogger(__name__)


def document_uniforms(seed: int, purpose: str, start: int, count: int) -> np.ndarray:
    """A uniform [0, 1) number for each document index in [start, start + count).

    A keyed hash of (seed, purpose, index): the Philox stream keyed by (seed, purpose, block)
    read at the index's position in its block. Pure; any slicing of the indices agrees.
    """
    if count <= 0:
        return np.empty(0, dtype=np.float64)
    first, last = start // _UNIFORM_BLOCK, (start + count - 1) // _UNIFORM_BLOCK
    blocks = [keyed_rng(seed, purpose, b).random(_UNIFORM_BLOCK) for b in range(first, last + 1)]
    offset = start - first * _UNIFORM_BLOCK
    return np.concatenate(blocks)[offset : offset + count]


@dataclass(frozen=True)
class ValidationRule:
    """Which documents are held out: those whose keyed uniform is below `fraction`, with one
    forced into validation (or training) when the draw left that split empty."""

    seed: int
    fraction: float
    forced_validation: int | None = None
    forced_train: int | None = None

    def uniforms(self, start: int, count: int) -> np.ndarray:
        return document_uniforms(self.seed, "validation", start, count)

    def is_validation(self, start: int, count: int) -> np.ndarray:
        held_out = self.uniforms(start, count) < self.fraction
        for index, value in ((self.forced_validation, True), (self.forced_train, False)):
            if index is not None and start <= index < start + count:
                held_out[index - start] = value
        return held_out


def chunk_documents(
    documents: Iterable[str], max_docs: int = CHUNK_DOCS, max_chars: int = CHUNK_CHARS
) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) in order, each chunk bounded in count and size."""
    start, chunk, chars = 0, [], 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield start, chunk
            start, chunk, chars = start + len(chunk), [], 0
    if chunk:
        yield start, chunk


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], eod: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of `texts`, each followed by `eod`, concatenated; and each document's length."""
    try:
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    except MemoryError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception (a loaded tokenizer without [UNK])
        raise CorpusError(_encode_failure(tokenizer, texts, e)) from None
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64,
                          count=len(encodings))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    end = 0
    for encoding, length in zip(encodings, lengths.tolist()):
        tokens[end : end + length - 1] = encoding.ids
        end += length
        tokens[end - 1] = eod
    return tokens, lengths


def _encode_failure(tokenizer: Tokenizer, texts: list[str], error: Exception) -> str:
    """Why `texts` did not encode, naming the first document that fails alone."""
    for text in texts:
        try:
            tokenizer.encode(text, add_special_tokens=False)
        except Exception as e:
            shown = text if len(text) <= 60 else text[:57] + "..."
            return f"the tokenizer cannot encode the document {shown!r} ({e})"
    return f"the tokenizer cannot encode a chunk of documents ({error})"


# ---- worker processes -------------------------------------------------------------------------

_worker_state: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eod: int, dtype: str) -> None:
    # One process = one core: the tokenizers library must not start its own thread pool here.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state.update(
        tokenizer=for_corpus_text(Tokenizer.from_str(tokenizer_json)), eod=eod,
        dtype=np.dtype(dtype),
    )


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    s = _worker_state
    return encode_documents(s["tokenizer"], texts, s["eod"], s["dtype"])


T = TypeVar("T")
R = TypeVar("R")


def _ordered_bounded_map(
    executor: Executor, fn: Callable[[T], R], items: Iterable[T], max_pending: int
) -> Iterator[R]:
    """executor.map, in order, with at most `max_pending` items submitted but not consumed
    (Executor.map and Pool.imap read the whole input ahead: a corpus could fill memory)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= max_pending:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---- writing ----------------------------------------------------------------------------------


class _SplitWriter:
    """Appends documents to {split}.tokens / {split}.docs, hashing the bytes as it writes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.dtype = dtype.newbyteorder("<")
        self.tokens_file = open(folder / layout.tokens_file(split), "wb")
        self.docs_file = open(folder / layout.docs_file(split), "wb")
        self.tokens_hash, self.docs_hash = hashlib.sha256(), hashlib.sha256()
        self.n_docs = 0
        self.n_tokens = 0
        self._write_offsets(np.zeros(1, dtype=np.int64))

    def _write_offsets(self, offsets: np.ndarray) -> None:
        data = offsets.astype(layout.OFFSET_DTYPE).tobytes()
        self.docs_file.write(data)
        self.docs_hash.update(data)

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self.tokens_file.write(data)
        self.tokens_hash.update(data)
        self._write_offsets(self.n_tokens + np.cumsum(lengths))
        self.n_docs += len(lengths)
        self.n_tokens += len(tokens)

    def close(self) -> layout.SplitInfo:
        self.tokens_file.close()
        self.docs_file.close()
        return layout.SplitInfo(
            n_docs=self.n_docs, n_tokens=self.n_tokens,
            tokens_sha256=self.tokens_hash.hexdigest(), docs_sha256=self.docs_hash.hexdigest(),
        )

    def abort(self) -> None:
        self.tokens_file.close()
        self.docs_file.close()


# ---- the two passes ---------------------------------------------------------------------------


@dataclass
class _Scan:
    n_docs: int = 0
    n_chars: int = 0
    n_validation: int = 0
    lowest: tuple[float, int] = (2.0, -1)  # (uniform, index) of the most validation-like doc
    highest: tuple[float, int] = (-1.0, -1)
    sample: list[str] = field(default_factory=list)
    sample_chars: int = 0


def _scan(
    source: DocumentSource, seed: int, fraction: float, sample_bytes: int | None, progress: bool
) -> tuple[_Scan, ValidationRule]:
    scan = _Scan()
    rule = ValidationRule(seed, fraction)
    keep_fraction = 0.0
    if sample_bytes:
        keep_fraction = min(1.0, sample_bytes / max(1, source.size_bytes()))
    with tqdm(desc="scanning", unit="doc", disable=not progress, leave=False) as bar:
        for start, docs in chunk_documents(source, CHUNK_DOCS, CHUNK_CHARS):
            u = rule.uniforms(start, len(docs))
            scan.n_validation += int(np.count_nonzero(u < fraction))
            lo, hi = int(np.argmin(u)), int(np.argmax(u))
            scan.lowest = min(scan.lowest, (float(u[lo]), start + lo))
            scan.highest = max(scan.highest, (float(u[hi]), start + hi))
            if keep_fraction:
                keep = document_uniforms(seed, "tokenizer-sample", start, len(docs))
                for doc, k in zip(docs, keep.tolist()):
                    # The size cap matters for compressed inputs, whose file size understates
                    # the text.
                    if k < keep_fraction and scan.sample_chars < sample_bytes:
                        scan.sample.append(doc)
                        scan.sample_chars += len(doc)
            scan.n_docs += len(docs)
            scan.n_chars += sum(map(len, docs))
            bar.update(len(docs))
    if scan.n_docs < 2:
        raise CorpusError(
            f"the corpus has {scan.n_docs} document(s); at least 2 are needed "
            "(one to train on, one held out for validation)"
        )
    if scan.n_validation == 0:
        rule = ValidationRule(seed, fraction, forced_validation=scan.lowest[1])
    elif scan.n_validation == scan.n_docs:
        rule = ValidationRule(seed, fraction, forced_train=scan.highest[1])
    return scan, rule


def _encode_pass(
    source: DocumentSource, folder: Path, tokenizer: Tokenizer, special: SpecialTokens,
    dtype: np.dtype, rule: ValidationRule, n_docs: int, workers: int, progress: bool,
) -> dict[str, layout.SplitInfo]:
    writers = {split: _SplitWriter(folder, split, dtype) for split in layout.SPLITS}
    chunks = chunk_documents(source, CHUNK_DOCS, CHUNK_CHARS)  # read now: tests shrink them
    executor: ProcessPoolExecutor | None = None
    try:
        if workers > 1:
            # spawn, not fork: the parent may hold threads (the tokenizers pool, a server's).
            executor = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(tokenizer.to_str(), special.eod, dtype.str),
            )
            starts: deque[int] = deque()

            def submitted() -> Iterator[list[str]]:
                for start, docs in chunks:
                    starts.append(start)
                    yield docs

            encoded = (
                (starts.popleft(), result)
                for result in _ordered_bounded_map(
                    executor, _encode_in_worker, submitted(), max_pending=2 * workers
                )
            )
        else:
            encoded = (
                (start, encode_documents(tokenizer, docs, special.eod, dtype))
                for start, docs in chunks
            )
        seen = 0
        with tqdm(total=n_docs, desc="tokenizing", unit="doc", disable=not progress) as bar:
            for start, (tokens, lengths) in encoded:
                held_out = rule.is_validation(start, len(lengths))
                token_held_out = np.repeat(held_out, lengths)
                writers["validation"].append(tokens[token_held_out], lengths[held_out])
                writers["train"].append(tokens[~token_held_out], lengths[~held_out])
                seen += len(lengths)
                bar.update(len(lengths))
        if seen != n_docs:
            raise CorpusError(
                f"the input changed while preparing: {n_docs} documents when scanned, {seen} "
                "when encoded"
            )
        return {split: writer.close() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


# ---- entry point ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSummary:
    path: Path
    n_docs: dict[str, int]
    n_tokens: dict[str, int]
    vocab_size: int
    seconds: float
    notes: tuple[str, ...] = ()  # things a person should know, e.g. about padding with id 0

    @property
    def tokens_per_second(self) -> float:
        return sum(self.n_tokens.values()) / max(self.seconds, 1e-9)

    def describe(self) -> str:
        docs = ", ".join(f"{n:,} {s}" for s, n in self.n_docs.items())
        tokens = ", ".join(f"{n:,} {s}" for s, n in self.n_tokens.items())
        return (
            f"prepared {self.path}: documents {docs}; tokens {tokens}; vocab {self.vocab_size:,}; "
            f"{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s)"
        )

    @classmethod
    def of_manifest(cls, path: Path, manifest: dict[str, Any], seconds: float) -> PrepareSummary:
        splits = manifest["splits"]
        return cls(
            path=path, n_docs={s: splits[s]["n_docs"] for s in layout.SPLITS},
            n_tokens={s: splits[s]["n_tokens"] for s in layout.SPLITS},
            vocab_size=manifest["vocab_size"], seconds=seconds,
            notes=tuple(n for n in [manifest["tokenizer"]["padding_note"]] if n),
        )


def _check_options(
    vocab_size: int | None, tokenizer_path: str | Path | None, fraction: float,
    workers: int | None, sample_bytes: int,
) -> None:
    if vocab_size is not None and tokenizer_path is not None:
        raise CorpusError("give either a vocab size (train a tokenizer) or a tokenizer, not both")
    if not 0.0 < fraction < 1.0:
        raise CorpusError(f"validation fraction must be in (0, 1), got {fraction}")
    if workers is not None and workers < 1:
        raise CorpusError(f"workers must be at least 1, got {workers}")
    if sample_bytes < 1:
        raise CorpusError(f"tokenizer sample size must be positive, got {sample_bytes}")


def _check_out(out: Path, overwrite: bool, source: DocumentSource) -> None:
    """Refuse, before any work, an `out` that exists (unless `overwrite`), one whose replacement
    would delete an input, and one that cannot be created under a file."""
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists (--overwrite replaces it)")
        # What --overwrite deletes: `out` itself (a link, not what it points to) and what it holds.
        replaced = out.parent.resolve() / out.name
        for f in source.files if isinstance(source, FileSource) else ():
            for where in (f.resolve(), f.parent.resolve() / f.name):
                if where == replaced or replaced in where.parents:
                    raise CorpusError(f"{out}: --overwrite would delete the input {f}; "
                                      "prepare into another folder")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise CorpusError(f"{out}: cannot be created, {ancestor} is not a folder")


def _write_error(e: OSError, out: Path) -> CorpusError:
    where = e.filename if e.filename is not None else out
    return CorpusError(f"{where}: cannot write ({reason(e)})")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    displaced: Path | None = None
    try:
        if overwrite and out.exists():
            displaced = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, displaced / "prepared")
        try:
            # rename fails when `out` exists and is not empty: another process finished first.
            os.rename(tmp, out)
        except OSError as e:
            kept = ""
            if displaced is not None and not os.path.lexists(out):
                os.replace(displaced / "prepared", out)  # put the old one back
                kept = "; the one there is kept"
            elif out.exists():
                raise OutputExistsError(
                    f"{out}: already exists (prepared by another process?)"
                ) from None
            raise CorpusError(f"{out}: cannot move the prepared corpus into place "
                              f"({reason(e)}){kept}") from None
    finally:
        if displaced is not None:
            _remove_tree(displaced)


def prepare_corpus(
    inputs: DocumentSource | Sequence[str | Path] | str | Path,
    out: str | Path,
    *,
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    workers: int | None = None,
    text_field: str = "text",
    txt_docs_per_file: bool = False,
    tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareSummary:
    """Prepare `inputs` (corpus files/folders, or a DocumentSource) into the folder `out`.

    Trains a byte-level BPE of `vocab_size` (default 8192) ids on a sample of at most
    `tokenizer_sample_bytes` of text, unless `tokenizer` names a tokenizer.json to use.
    `workers`: encoding processes (default: one per core; small corpora are encoded in this
    process, which is faster than starting workers). Raises CorpusError on bad input and
    OutputExistsError when `out` exists and `overwrite` is false.
    """
    started = time.perf_counter()
    _check_options(vocab_size, tokenizer, validation_fraction, workers, tokenizer_sample_bytes)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]  # one path, not a sequence of characters
    source = (
        inputs if isinstance(inputs, DocumentSource)
        else FileSource.from_inputs(inputs, text_field=text_field,
                                    txt_docs_per_file=txt_docs_per_file)
    )
    out = Path(out)
    _check_out(out, overwrite, source)

    added: list[str] = []
    if tokenizer is not None:
        tok = read_tokenizer_file(tokenizer)
        special, added = add_special_tokens(tok)
        scan, rule = _scan(source, seed, validation_fraction, None, progress)
        log.info("scanned %d documents in %.1f s", scan.n_docs, time.perf_counter() - started)
    else:
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        scan, rule = _scan(source, seed, validation_fraction, tokenizer_sample_bytes, progress)
        log.info("scanned %d documents in %.1f s", scan.n_docs, time.perf_counter() - started)
        trained = time.perf_counter()
        tok, special = train_tokenizer(scan.sample, vocab_size, length=len(scan.sample),
                                       show_progress=progress)
        log.info("trained the tokenizer on %d documents (%d characters) in %.1f s",
                 len(scan.sample), scan.sample_chars, time.perf_counter() - trained)
        scan.sample = []  # free it before encoding
    n_vocab = vocab_size_of(tok)
    dtype = np.dtype(layout.token_dtype_for(n_vocab))
    if workers is None:
        workers = 1 if scan.n_chars < POOL_MIN_CHARS else (os.cpu_count() or 1)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise _write_error(e, out) from None
    try:
        tokenizer_json = tok.to_str(pretty=True).encode()
        (tmp / layout.TOKENIZER_FILE).write_bytes(tokenizer_json)
        encoded = time.perf_counter()
        splits = _encode_pass(source, tmp, tok, special, dtype, rule, scan.n_docs, workers,
                              progress)
        log.info("encoded %d documents with %d worker(s) in %.1f s", scan.n_docs, workers,
                 time.perf_counter() - encoded)
        manifest = layout.Manifest(
            format_version=layout.FORMAT_VERSION,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            vocab_size=n_vocab,
            token_dtype=dtype.name,  # type: ignore[arg-type]
            special_tokens=special.to_json(),
            tokenizer=layout.TokenizerInfo(
                sha256=hashlib.sha256(tokenizer_json).hexdigest(),
                origin="trained" if tokenizer is None else "loaded",
                source=None if tokenizer is None else str(Path(tokenizer).resolve()),
                added_special_tokens=added,
                padding_note=padding_note(tok, special),
            ),
            splits=splits,  # type: ignore[arg-type]
            inputs=source.describe(),
            options=layout.PrepareOptionsRecord(
                validation_fraction=validation_fraction, seed=seed, vocab_size=vocab_size,
                tokenizer_sample_bytes=None if tokenizer is not None else tokenizer_sample_bytes,
            ),
        )
        # Written last: a folder without a manifest is never mistaken for a prepared corpus.
        (tmp / layout.MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        _move_into_place(tmp, out, overwrite)
    except OSError as e:  # reading errors are CorpusErrors already: this is the output
        _remove_tree(tmp)
        raise _write_error(e, out) from None
    except BaseException:
        _remove_tree(tmp)
        raise
    manifest_dict = manifest.model_dump(mode="json")
    summary = PrepareSummary.of_manifest(out, manifest_dict, time.perf_counter() - started)
    if tokenizer is None and n_vocab < vocab_size:
        summary = dataclasses.replace(summary, notes=(
            *summary.notes, f"the tokenizer has {n_vocab:,} ids, fewer than the {vocab_size:,} asked: "
            "the sample has no more pairs seen at least twice to merge (more text gives more)"))
    return summary

