"""The corpus tokenizer: a byte-level BPE trained on the corpus, or a given tokenizer.json.

A trained tokenizer receives the special tokens first, in canonical order, so [PAD] = 0 and the
ids are those of `SpecialTokens.default()`. A loaded tokenizer gets the missing ones appended.

Corpus text is encoded *literally*: a document that contains the characters "[X]" (typing's
docstrings do: "Optional[X]") must not turn into the [X] paradigm token, or the model would see
task markers inside plain text. `for_corpus_text` switches that on (tokenizers does not keep the
switch in tokenizer.json, so every loader calls it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from objective_server.corpus.errors import CorpusError
from objective_server.special_tokens import PAD, SpecialTokens, canonical_tokens

log = logging.getLogger(__name__)

# 256 byte symbols + the special tokens + at least a few merges.
MIN_TRAINED_VOCAB = 256 + len(canonical_tokens()) + 16
MAX_VOCAB = 1 << 32


def for_corpus_text(tokenizer: Tokenizer) -> Tokenizer:
    """Configure `tokenizer` (in place) for corpus text: special tokens in the text stay text,
    and no padding or truncation (documents are stored whole). Returns it."""
    tokenizer.encode_special_tokens = True
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def vocab_size(tokenizer: Tokenizer) -> int:
    """Size of an embedding table that covers every id (largest id + 1)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def special_tokens_of(tokenizer: Tokenizer, n_sentinels: int | None = None) -> SpecialTokens:
    """Ids of the canonical special tokens in `tokenizer`; CorpusError if any is missing."""
    names = canonical_tokens() if n_sentinels is None else canonical_tokens(n_sentinels)
    ids = {name: tokenizer.token_to_id(name) for name in names}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise CorpusError(f"tokenizer lacks special tokens {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    try:
        return SpecialTokens.from_mapping(ids)  # type: ignore[arg-type]
    except ValueError as e:
        raise CorpusError(str(e)) from None


def _special(token: str) -> AddedToken:
    # normalized=False: match the exact characters even under a lower-casing normalizer.
    return AddedToken(token, special=True, normalized=False, single_word=False,
                      lstrip=False, rstrip=False)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, *, length: int | None = None,
    min_frequency: int = 2, show_progress: bool = False,
) -> tuple[Tokenizer, SpecialTokens]:
    """Train a byte-level BPE of (at most) `vocab_size` ids on `texts`.

    Byte-level: every byte has a symbol, so any text encodes without unknown tokens and decodes
    back exactly. The vocabulary can come out smaller than asked when the text has too few
    distinct pairs; `vocab_size(tokenizer)` tells the real size.
    """
    if not MIN_TRAINED_VOCAB <= vocab_size <= MAX_VOCAB:
        raise CorpusError(
            f"vocab size {vocab_size} out of range: a trained tokenizer needs at least "
            f"{MIN_TRAINED_VOCAB} (256 bytes + {len(canonical_tokens())} special tokens + merges)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[_special(t) for t in canonical_tokens()],  # first: ids 0, 1, 2, ...
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    with _stdout_to_stderr() if show_progress else contextlib.nullcontext():
        tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    for_corpus_text(tokenizer)
    special = special_tokens_of(tokenizer)
    assert special.ids == SpecialTokens.default().ids, "trainer reordered the special tokens"
    return tokenizer, special


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """The trainer's progress bars (Rust, on file descriptor 1) go to stderr, with the others:
    stdout carries the command's result alone (they left blank lines in front of it)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout (an embedding host): leave it alone
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, SpecialTokens]:
    """Load a tokenizer.json and append the canonical special tokens it lacks.

    Tokens it already has keep their ids (and are marked special). When id 0 is not [PAD], id 0
    is still what batches pad with; see `padding_note`.
    """
    tokenizer = read_tokenizer_file(path)
    special, added = add_special_tokens(tokenizer)
    if added:
        log.info("%s: added %d special tokens (ids %d..%d)", path, len(added),
                 special[added[0]], special[added[-1]])
    note = padding_note(tokenizer, special)
    if note:
        log.warning("%s: %s", path, note)
    return tokenizer, special


def read_tokenizer_file(path: str | Path) -> Tokenizer:
    """A tokenizer.json as is (configured `for_corpus_text`); CorpusError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on any parse failure
        raise CorpusError(f"{path}: not a valid tokenizer.json ({e})") from None
    return for_corpus_text(tokenizer)


def add_special_tokens(tokenizer: Tokenizer) -> tuple[SpecialTokens, list[str]]:
    """Make every canonical token a special token of `tokenizer` (in place): existing ones keep
    their ids, missing ones are appended in canonical order. Returns the ids and what was added."""
    missing = [t for t in canonical_tokens() if tokenizer.token_to_id(t) is None]
    # Existing ones are marked special too, so decoding shows them and text never splits them.
    tokenizer.add_special_tokens([_special(t) for t in canonical_tokens()])
    return special_tokens_of(tokenizer), missing


def padding_note(tokenizer: Tokenizer, special: SpecialTokens) -> str | None:
    """Why id 0 is fine as padding even when it is not [PAD]; None when it is a special token."""
    if special.pad == 0:
        return None
    token0 = tokenizer.id_to_token(0)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    if token0 is not None and token0 in specials:
        return None
    return (
        f"id 0 is {token0!r}, not a special token, and {PAD} is id {special.pad}; batches pad "
        "with id 0 anyway: padded positions are masked out by segment id 0 and label -100"
    )


def decode(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` with special tokens shown as themselves (e.g. "[R]...[m0]...[EOD]")."""
    return tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=False)


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Ids of `text` as int32, no special tokens added (the tokenizer must be `for_corpus_text`)."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)
