from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from objective_server.corpus.errors import CorpusError
from objective_server.corpus.store import TokenStore


@pytest.fixture
def store_copy(small_store: TokenStore, tmp_path: Path) -> Path:
    """A writable copy of the shared small store, to break."""
    return Path(shutil.copytree(small_store.path, tmp_path / "copy"))


def edit_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_split_is_memory_mapped_read_only_and_cached(small_store: TokenStore) -> None:
    train = small_store.split("train")
    assert small_store.split("train") is train
    assert isinstance(train.tokens, np.memmap) and train.tokens.dtype == np.dtype("<u2")
    assert train.doc_offsets.dtype == np.dtype("<i8") and train.doc_offsets.ndim == 1
    assert train.n_docs == small_store.manifest["splits"]["train"]["n_docs"]
    assert train.n_tokens == small_store.manifest["splits"]["train"]["n_tokens"] == len(train.tokens)
    with pytest.raises(ValueError):
        train.tokens[0] = 5
    with pytest.raises(IndexError):
        train.document(train.n_docs)


def test_unknown_split(small_store: TokenStore) -> None:
    with pytest.raises(CorpusError, match="no split 'test'"):
        small_store.split("test")


def test_encode_decode(small_store: TokenStore, small_docs: list[str]) -> None:
    ids = small_store.encode(small_docs[0])
    assert ids.dtype == np.int32 and len(ids) > 0
    assert small_store.decode(ids) == small_docs[0]
    special = small_store.special
    shown = small_store.decode([special["[S]"], *small_store.encode("a b"), special.generate,
                                special.eod])
    assert shown == "[S]a b[GEN][EOD]"
    assert small_store.decode([]) == ""


def test_decode_rejects_ids_outside_the_vocabulary(small_store: TokenStore) -> None:
    with pytest.raises(ValueError, match="token id -100 out of range"):
        small_store.decode(np.array([5, -100]))
    with pytest.raises(ValueError, match=f"token id {small_store.vocab_size} out of range"):
        small_store.decode([small_store.vocab_size])
    with pytest.raises(ValueError, match="must be integers"):
        small_store.decode([1.5])


def test_verify_passes_on_a_good_store(small_store: TokenStore) -> None:
    small_store.verify()


def test_repr_is_informative(small_store: TokenStore) -> None:
    text = repr(small_store)
    assert "vocab 600" in text and "train:" in text and "validation:" in text


# ---- broken stores -----------------------------------------------------------------------------


def open_error(folder: Path) -> str:
    with pytest.raises(CorpusError) as info:
        TokenStore.open(folder)
    return str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    assert "no such prepared corpus folder" in open_error(tmp_path / "none")


def test_missing_manifest(store_copy: Path) -> None:
    (store_copy / "manifest.json").unlink()
    assert "manifest.json is missing" in open_error(store_copy)


@pytest.mark.parametrize("name", ["train.tokens", "validation.docs", "tokenizer.json"])
def test_missing_data_file(store_copy: Path, name: str) -> None:
    (store_copy / name).unlink()
    assert open_error(store_copy).endswith(f"{name} is missing")


def test_truncated_tokens_file(store_copy: Path) -> None:
    path = store_copy / "train.tokens"
    path.write_bytes(path.read_bytes()[:-2])
    message = open_error(store_copy)
    assert "train.tokens" in message and "truncated" in message


def test_bad_manifest_json(store_copy: Path) -> None:
    (store_copy / "manifest.json").write_text('{"format": "birdie-token-store",')
    assert "not valid JSON" in open_error(store_copy)


def test_wrong_format_version(store_copy: Path) -> None:
    edit_manifest(store_copy, lambda m: m.update(format_version=99))
    message = open_error(store_copy)
    assert "format version 99 is not supported" in message and "version 1" in message


def test_not_a_token_store_manifest(store_copy: Path) -> None:
    edit_manifest(store_copy, lambda m: m.update(format="something-else"))
    assert "not a birdie-token-store manifest" in open_error(store_copy)


def test_invalid_manifest_field(store_copy: Path) -> None:
    edit_manifest(store_copy, lambda m: m["splits"]["train"].update(n_docs="many"))
    assert "invalid at splits.train.n_docs" in open_error(store_copy)


def test_manifest_without_a_split(store_copy: Path) -> None:
    edit_manifest(store_copy, lambda m: m["splits"].pop("validation"))
    assert "lacks split(s) ['validation']" in open_error(store_copy)


def test_manifest_without_special_tokens(store_copy: Path) -> None:
    edit_manifest(store_copy, lambda m: m["special_tokens"].pop("[EOD]"))
    assert "lacks special tokens ['[EOD]']" in open_error(store_copy)


def test_offsets_that_do_not_span_the_tokens(store_copy: Path) -> None:
    path = store_copy / "train.docs"
    offsets = np.fromfile(path, dtype="<i8")
    offsets[-1] -= 1
    offsets.tofile(path)
    store = TokenStore.open(store_copy)  # sizes are right; contents are checked on use
    with pytest.raises(CorpusError, match="offsets run from 0 to"):
        store.split("train")


def test_verify_detects_changed_bytes(store_copy: Path) -> None:
    path = store_copy / "validation.tokens"
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    store = TokenStore.open(store_copy)
    with pytest.raises(CorpusError, match="validation.tokens: sha256 .* differs"):
        store.verify()


# ---- a manifest or tokenizer that no longer describes the store ----------------------------------


def test_truncated_tokenizer_file(store_copy: Path) -> None:
    """Caught at open (a server's start), not at the first decoded batch."""
    path = store_copy / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:-100])
    message = open_error(store_copy)
    assert message.startswith(f"{path}: not the tokenizer this corpus was prepared with")


def test_manifest_vocab_size_that_is_not_the_tokenizers(store_copy: Path) -> None:
    """Ids up to 599 are stored: a manifest saying 200 would size a model's embedding too small."""
    edit_manifest(store_copy, lambda m: m.update(vocab_size=200))
    assert open_error(store_copy) == (
        f"{store_copy / 'manifest.json'}: vocab_size 200, but {store_copy / 'tokenizer.json'} "
        "has 600 ids; prepare the corpus again")


def test_manifest_special_token_ids_that_are_not_the_tokenizers(store_copy: Path) -> None:
    def swap(m: dict) -> None:
        special = m["special_tokens"]
        special["[EOD]"], special["[PAD]"] = special["[PAD]"], special["[EOD]"]

    edit_manifest(store_copy, swap)
    assert open_error(store_copy) == (
        f"{store_copy / 'manifest.json'}: special token [PAD] is id 1, but "
        f"{store_copy / 'tokenizer.json'} has it at 0; prepare the corpus again")
