from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from objective_server.corpus.errors import CorpusError
from objective_server.corpus.tokenizer import (
    MIN_TRAINED_VOCAB,
    decode,
    encode,
    load_tokenizer,
    padding_note,
    train_tokenizer,
    vocab_size,
)
from objective_server.special_tokens import EOD, PAD, SpecialTokens, canonical_tokens

from .helpers import SMALL_VOCAB, english_documents


@pytest.fixture(scope="module")
def trained() -> tuple[Tokenizer, SpecialTokens]:
    return train_tokenizer(english_documents(300), SMALL_VOCAB)


def test_trained_special_tokens_come_first_in_canonical_order(trained) -> None:
    tokenizer, special = trained
    assert special == SpecialTokens.default()
    assert special.pad == 0 and special.eod == 1
    for i, token in enumerate(canonical_tokens()):
        assert tokenizer.id_to_token(i) == token
    assert len(special.sentinel_ids) == 256
    assert vocab_size(tokenizer) == SMALL_VOCAB


def test_byte_level_round_trip(trained) -> None:
    tokenizer, _ = trained
    # Text the tokenizer never saw, including characters outside its training text.
    text = "Zebras\tquack ✓ 🦓 — naïve ŁÓDŹ ほげ\n\n  two spaces; \x00 control\r\n"
    assert decode(tokenizer, encode(tokenizer, text)) == text


def test_special_token_text_in_a_document_stays_text(trained) -> None:
    tokenizer, special = trained
    ids = encode(tokenizer, "Optional[X] ends with [EOD] and pads with [PAD] [m0]")
    assert ids.dtype == np.int32
    assert not set(ids.tolist()) & set(special.ids.values())
    assert decode(tokenizer, ids) == "Optional[X] ends with [EOD] and pads with [PAD] [m0]"


def test_decode_shows_special_tokens(trained) -> None:
    tokenizer, special = trained
    ids = [special["[R]"], *encode(tokenizer, "the cat"), special.sentinels[0], special.eod,
           special.pad]
    assert decode(tokenizer, np.array(ids, dtype=np.uint16)) == "[R]the cat[m0][EOD][PAD]"


def test_training_is_deterministic() -> None:
    docs = english_documents(100)
    first, _ = train_tokenizer(docs, SMALL_VOCAB)
    second, _ = train_tokenizer(iter(docs), SMALL_VOCAB)
    assert first.to_str() == second.to_str()


def test_vocab_too_small() -> None:
    with pytest.raises(CorpusError, match="vocab size 300 out of range"):
        train_tokenizer(["a b c"], 300)
    train_tokenizer(["a b c"], MIN_TRAINED_VOCAB)  # the minimum itself is fine


def write_word_level(path: Path, words: list[str], **config: object) -> Path:
    """A tokenizer.json of a word-level tokenizer over `words` (ids in list order)."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if config.get("padding"):
        tokenizer.enable_padding(length=16, pad_id=0, pad_token=words[0])
    tokenizer.save(str(path))
    return path


def test_loaded_tokenizer_gets_missing_special_tokens_appended(tmp_path: Path) -> None:
    words = ["<unk>", "hello", "world", "[GEN]"]  # [GEN] exists as a regular word
    path = write_word_level(tmp_path / "tokenizer.json", words)
    tokenizer, special = load_tokenizer(path)
    assert special.generate == 3  # kept its id
    appended = [t for t in canonical_tokens() if t != "[GEN]"]
    assert [special[t] for t in appended] == list(range(4, 4 + len(appended)))
    assert special.pad == 4 and special.eod == 5
    assert vocab_size(tokenizer) == 4 + len(appended)
    note = padding_note(tokenizer, special)
    assert note is not None and "'<unk>'" in note and "label -100" in note
    assert decode(tokenizer, [1, special.eod, 2, special.sentinels[5]]) == "hello [EOD] world [m5]"


def test_loaded_tokenizer_with_pad_at_zero_keeps_ids(tmp_path: Path) -> None:
    words = [PAD, "<unk>", EOD, "hello"]
    path = write_word_level(tmp_path / "tokenizer.json", words, padding=True)
    tokenizer, special = load_tokenizer(path)
    assert special.pad == 0 and special.eod == 2
    assert padding_note(tokenizer, special) is None
    # Padding configured in the file is switched off: documents are stored whole.
    assert encode(tokenizer, "hello hello").tolist() == [3, 3]


def test_loaded_tokenizer_whose_id0_is_special_needs_no_note(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "<unk>": 1, "hi": 2}, unk_token="<unk>"))
    tokenizer.add_special_tokens(["<s>"])
    tokenizer.save(str(path))
    loaded, special = load_tokenizer(path)
    assert special.pad != 0 and padding_note(loaded, special) is None


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(CorpusError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
