from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.corpus import prepare as prepare_module
from objective_server.corpus.errors import CorpusError, OutputExistsError
from objective_server.corpus.manifest import FORMAT_VERSION
from objective_server.corpus.prepare import (
    ValidationRule,
    chunk_documents,
    document_uniforms,
    prepare_corpus,
)
from objective_server.corpus.store import TokenStore
from objective_server.special_tokens import SpecialTokens

from .helpers import SMALL_VOCAB, english_documents, write_jsonl, write_parquet, write_txt
from .test_tokenizer import write_word_level

DATA_FILES = ("tokenizer.json", "train.tokens", "train.docs", "validation.tokens",
              "validation.docs")


def split_texts(store: TokenStore, split: str) -> list[str]:
    """Decoded documents of a split, without their trailing [EOD]."""
    s = store.split(split)
    return [store.decode(s.document(i)[:-1]) for i in range(s.n_docs)]


def file_hashes(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in DATA_FILES}


class ListSource:
    """A DocumentSource over a list, counting how often it is iterated."""

    def __init__(self, docs: list[str], on_pass: Any = None):
        self.docs, self.passes, self.on_pass = docs, 0, on_pass

    def __iter__(self) -> Iterator[str]:
        self.passes += 1
        if self.on_pass:
            self.on_pass(self.passes)
        return iter(self.docs)

    def size_bytes(self) -> int:
        return sum(len(d.encode()) for d in self.docs)

    def describe(self) -> dict[str, Any]:
        return {"kind": "list", "documents": len(self.docs)}


# ---- layout, splits, EOD ----------------------------------------------------------------------


def test_manifest_and_layout(small_store: TokenStore, small_docs: list[str]) -> None:
    m = small_store.manifest
    assert m["format"] == "birdie-token-store" and m["format_version"] == FORMAT_VERSION
    assert m["vocab_size"] == SMALL_VOCAB and m["token_dtype"] == "uint16"
    assert m["special_tokens"] == SpecialTokens.default().ids
    assert m["tokenizer"]["origin"] == "trained" and m["tokenizer"]["padding_note"] is None
    assert m["options"] == {"validation_fraction": 0.1, "seed": 3, "vocab_size": SMALL_VOCAB,
                            "tokenizer_sample_bytes": prepare_module.DEFAULT_TOKENIZER_SAMPLE_BYTES}
    [source] = m["inputs"]["files"]
    assert source["path"].endswith("docs.jsonl") and source["bytes"] > 0
    assert m["created_at"].endswith("+00:00")
    hashes = file_hashes(small_store.path)
    assert m["tokenizer"]["sha256"] == hashes["tokenizer.json"]
    for split in ("train", "validation"):
        assert m["splits"][split]["tokens_sha256"] == hashes[f"{split}.tokens"]
        assert m["splits"][split]["docs_sha256"] == hashes[f"{split}.docs"]
    assert sum(m["splits"][s]["n_docs"] for s in ("train", "validation")) == len(small_docs)
    # No temporary folders are left next to the output.
    assert sorted(p.name for p in small_store.path.parent.iterdir()) == ["docs.jsonl", "prepared"]


def test_every_document_ends_with_one_eod(small_store: TokenStore) -> None:
    eod = small_store.special.eod
    for split in ("train", "validation"):
        s = small_store.split(split)
        offsets = np.asarray(s.doc_offsets)
        assert offsets[0] == 0 and offsets[-1] == s.n_tokens and np.all(np.diff(offsets) >= 2)
        # EOD exactly at each document's last position, nowhere else (corpus text containing
        # the characters "[EOD]" must not produce the token).
        assert np.array_equal(np.flatnonzero(s.tokens == eod), offsets[1:] - 1)
        raw = np.fromfile(small_store.path / f"{split}.tokens", dtype="<u2")
        assert np.array_equal(raw, s.tokens)
        assert np.array_equal(np.fromfile(small_store.path / f"{split}.docs", dtype="<i8"),
                              offsets)


def test_splits_partition_the_documents_by_the_keyed_rule(
    small_store: TokenStore, small_docs: list[str]
) -> None:
    train, validation = split_texts(small_store, "train"), split_texts(small_store, "validation")
    held_out = ValidationRule(seed=3, fraction=0.1).is_validation(0, len(small_docs))
    # Round trip: every document decodes back to its exact text, in corpus order per split.
    assert validation == [d for d, h in zip(small_docs, held_out) if h]
    assert train == [d for d, h in zip(small_docs, held_out) if not h]
    assert 10 <= len(validation) <= 50  # about 10% of 300


@pytest.mark.parametrize("fraction, n_docs", [(0.01, 2), (0.01, 3), (0.001, 40), (0.99, 3),
                                              (0.999, 40)])
def test_each_split_gets_at_least_one_document(tmp_path: Path, fraction: float,
                                               n_docs: int) -> None:
    docs = english_documents(n_docs)
    summary = prepare_corpus(ListSource(docs), tmp_path / "out", vocab_size=SMALL_VOCAB,
                             validation_fraction=fraction)
    assert summary.n_docs["train"] >= 1 and summary.n_docs["validation"] >= 1
    assert sum(summary.n_docs.values()) == n_docs
    store = TokenStore.open(tmp_path / "out")
    assert sorted(split_texts(store, "train") + split_texts(store, "validation")) == sorted(docs)
    if fraction < 0.5:
        assert summary.n_docs["validation"] == 1 or n_docs > 3
    else:
        assert summary.n_docs["train"] == 1 or n_docs > 3


def test_fewer_than_two_documents(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="has 1 document"):
        prepare_corpus(ListSource(["only one"]), tmp_path / "out", vocab_size=SMALL_VOCAB)
    assert not (tmp_path / "out").exists()


def test_seed_changes_the_held_out_documents(tmp_path: Path) -> None:
    docs = english_documents(200)
    a = ValidationRule(0, 0.1).is_validation(0, len(docs))
    b = ValidationRule(1, 0.1).is_validation(0, len(docs))
    assert not np.array_equal(a, b)
    prepare_corpus(ListSource(docs), tmp_path / "s1", vocab_size=SMALL_VOCAB,
                   validation_fraction=0.1, seed=1)
    assert split_texts(TokenStore.open(tmp_path / "s1"), "validation") == [
        d for d, h in zip(docs, b) if h]


# ---- determinism -------------------------------------------------------------------------------


def test_output_is_identical_for_any_worker_count(tmp_path: Path, monkeypatch) -> None:
    # Small chunks so several are in flight in the worker pool at once.
    monkeypatch.setattr(prepare_module, "CHUNK_DOCS", 7)
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(150, seed=5))
    summaries = {}
    for workers in (1, 2, 3):
        summaries[workers] = prepare_corpus([corpus], tmp_path / f"w{workers}",
                                            vocab_size=SMALL_VOCAB, workers=workers)
    hashes = {w: file_hashes(tmp_path / f"w{w}") for w in summaries}
    assert hashes[1] == hashes[2] == hashes[3]
    manifests = [json.loads((tmp_path / f"w{w}" / "manifest.json").read_text()) for w in summaries]
    for m in manifests:
        m.pop("created_at")
    assert manifests[0] == manifests[1] == manifests[2]


def test_output_is_identical_across_processes(tmp_path: Path) -> None:
    """A fresh interpreter (other hash seeds, other thread pools) writes the same bytes."""
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(120, seed=6))
    prepare_corpus([corpus], tmp_path / "here", vocab_size=SMALL_VOCAB, workers=1)
    code = ("import sys; from objective_server.corpus.prepare import prepare_corpus; "
            f"prepare_corpus([sys.argv[1]], sys.argv[2], vocab_size={SMALL_VOCAB})")
    subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "there")],
                   check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert file_hashes(tmp_path / "here") == file_hashes(tmp_path / "there")


@given(start=st.integers(0, 3 * 2**16), count=st.integers(0, 2**17),
       seed=st.integers(0, 2**32))
def test_document_uniforms_are_a_function_of_the_index(start: int, count: int, seed: int) -> None:
    block = document_uniforms(seed, "validation", start, count)
    assert block.shape == (count,) and np.all((block >= 0) & (block < 1))
    if count:
        # Any slicing agrees with computing the documents one by one.
        for i in {0, count // 2, count - 1}:
            assert document_uniforms(seed, "validation", start + i, 1)[0] == block[i]


def test_chunks_are_bounded_and_ordered() -> None:
    docs = ["a" * 10] * 25 + ["b" * 100] + ["c"] * 3
    chunks = list(chunk_documents(docs, max_docs=10, max_chars=50))
    assert [start for start, _ in chunks] == [0, 5, 10, 15, 20, 25, 26]
    assert [d for _, chunk in chunks for d in chunk] == docs


# ---- inputs and tokenizers ---------------------------------------------------------------------


def test_a_single_path_is_one_input(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(10))
    summary = prepare_corpus(str(corpus), tmp_path / "out", vocab_size=SMALL_VOCAB)
    assert sum(summary.n_docs.values()) == 10


def test_mixed_folder_of_all_formats(tmp_path: Path) -> None:
    docs = english_documents(60, seed=7)
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    write_txt(data / "1.txt", docs[:20])
    write_jsonl(data / "2.jsonl.gz", docs[20:40])
    write_parquet(data / "nested" / "3.parquet", docs[40:])
    summary = prepare_corpus([data], tmp_path / "out", vocab_size=SMALL_VOCAB,
                             validation_fraction=0.2)
    store = TokenStore.open(tmp_path / "out")
    held_out = ValidationRule(0, 0.2).is_validation(0, 60)
    assert split_texts(store, "validation") == [d for d, h in zip(docs, held_out) if h]
    assert summary.n_docs == {"train": int((~held_out).sum()), "validation": int(held_out.sum())}
    assert [f["path"].rsplit("/", 1)[-1] for f in store.manifest["inputs"]["files"]] == [
        "1.txt", "2.jsonl.gz", "3.parquet"]


def test_tokenizer_sample_is_bounded(tmp_path: Path, monkeypatch) -> None:
    seen: list[int] = []
    real = prepare_module.train_tokenizer

    def spy(texts, vocab_size, **kwargs):
        seen.append(sum(len(t) for t in texts))
        return real(texts, vocab_size, **kwargs)

    monkeypatch.setattr(prepare_module, "train_tokenizer", spy)
    docs = english_documents(400, seed=8)
    total = sum(len(d) for d in docs)
    prepare_corpus(ListSource(docs), tmp_path / "out", vocab_size=SMALL_VOCAB,
                   tokenizer_sample_bytes=total // 4)
    assert 0 < seen[0] <= total // 4 + max(map(len, docs))
    store = TokenStore.open(tmp_path / "out")
    # All documents are still encoded, including those outside the sample.
    assert sum(store.split(s).n_docs for s in store.splits) == 400


def test_given_tokenizer_json(tmp_path: Path) -> None:
    words = ["<unk>", "alpha", "beta", "gamma"]
    tokenizer_path = write_word_level(tmp_path / "given.json", words)
    docs = ["alpha beta", "gamma gamma alpha", "beta [EOD] delta", "alpha"] * 5
    summary = prepare_corpus(ListSource(docs), tmp_path / "out", tokenizer=tokenizer_path,
                             validation_fraction=0.25)
    store = TokenStore.open(tmp_path / "out")
    m = store.manifest
    assert m["tokenizer"]["origin"] == "loaded"
    assert m["tokenizer"]["source"] == str(tokenizer_path.resolve())
    assert m["tokenizer"]["added_special_tokens"][:2] == ["[PAD]", "[EOD]"]
    assert "batches pad with id 0 anyway" in m["tokenizer"]["padding_note"]
    assert m["options"]["vocab_size"] is None
    assert store.special.pad == 4 and store.special.eod == 5
    assert summary.vocab_size == store.vocab_size == 4 + len(store.special.ids)
    train = store.split("train")
    # "[EOD]" in text is a word the tokenizer does not know, never the EOD token.
    assert store.decode(train.tokens[: train.doc_offsets[1]]).endswith("[EOD]")
    assert np.count_nonzero(train.tokens == store.special.eod) == train.n_docs


def test_large_vocabulary_uses_uint32(tmp_path: Path) -> None:
    words = ["<unk>"] + [f"w{i}" for i in range(70_000)]
    tokenizer_path = write_word_level(tmp_path / "big.json", words)
    docs = ["w1 w69999 w65535", "w65536 w2", "w300 w40000", "w7"]
    prepare_corpus(ListSource(docs), tmp_path / "out", tokenizer=tokenizer_path,
                   validation_fraction=0.3)
    store = TokenStore.open(tmp_path / "out")
    assert store.manifest["token_dtype"] == "uint32" and store.split("train").tokens.dtype == "<u4"
    every = np.concatenate([store.split(s).tokens for s in store.splits])
    for word in ("w69999", "w65535", "w65536", "w40000"):
        assert int(word[1:]) + 1 in every  # ids above 65535 survive
    assert sorted(split_texts(store, "train") + split_texts(store, "validation")) == sorted(docs)


def test_both_vocab_size_and_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="either a vocab size"):
        prepare_corpus(ListSource(["a", "b"]), tmp_path / "o", vocab_size=600,
                       tokenizer=tmp_path / "t.json")


@pytest.mark.parametrize("options, message", [
    ({"validation_fraction": 0.0}, "validation fraction must be in"),
    ({"validation_fraction": 1.0}, "validation fraction must be in"),
    ({"workers": 0}, "workers must be at least 1"),
    ({"tokenizer_sample_bytes": 0}, "tokenizer sample size must be positive"),
    ({"vocab_size": 10}, "vocab size 10 out of range"),
])
def test_bad_options(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(CorpusError, match=message):
        prepare_corpus(ListSource(english_documents(5)), tmp_path / "o", **options)
    assert list(tmp_path.iterdir()) == []


# ---- failures leave nothing that looks prepared -------------------------------------------------


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    docs = english_documents(20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        prepare_corpus(ListSource(docs), out, vocab_size=SMALL_VOCAB)
    assert (out / "keep.txt").read_text() == "mine"
    prepare_corpus(ListSource(docs), out, vocab_size=SMALL_VOCAB, overwrite=True)
    assert not (out / "keep.txt").exists()
    TokenStore.open(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_encoding_leaves_no_output(tmp_path: Path) -> None:
    def fail_on_second_pass(n: int) -> None:
        if n == 2:
            raise CorpusError("disk went away")

    with pytest.raises(CorpusError, match="disk went away"):
        prepare_corpus(ListSource(english_documents(20), fail_on_second_pass), tmp_path / "out",
                       vocab_size=SMALL_VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_input_changing_between_passes_is_detected(tmp_path: Path) -> None:
    docs = english_documents(20)
    source = ListSource(docs, on_pass=lambda n: docs.pop() if n == 2 else None)
    with pytest.raises(CorpusError, match="input changed while preparing: 20 documents"):
        prepare_corpus(source, tmp_path / "out", vocab_size=SMALL_VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_another_process_finishing_first_wins(tmp_path: Path) -> None:
    """Preparing into the same folder at once: the first rename wins, the loser leaves no trace."""
    out = tmp_path / "out"
    theirs = english_documents(30, seed=11)

    def other_process_finishes(n: int) -> None:
        if n == 2:  # while we encode, "another process" completes the same output
            prepare_corpus(ListSource(theirs), out, vocab_size=SMALL_VOCAB)

    with pytest.raises(OutputExistsError, match="another process"):
        prepare_corpus(ListSource(english_documents(30), other_process_finishes), out,
                       vocab_size=SMALL_VOCAB)
    store = TokenStore.open(out)
    store.verify()
    assert sorted(split_texts(store, "train") + split_texts(store, "validation")) == sorted(theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_processes_racing(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(100))
    code = (
        "import sys\n"
        "from objective_server.corpus import prepare_corpus, OutputExistsError\n"
        "try:\n"
        f"    prepare_corpus([sys.argv[1]], sys.argv[2], vocab_size={SMALL_VOCAB})\n"
        "    print('won')\n"
        "except OutputExistsError:\n"
        "    print('lost')\n"
    )
    racers = [subprocess.Popen([sys.executable, "-c", code, str(corpus), str(tmp_path / "out")],
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted(p.communicate(timeout=120)[0].strip() for p in racers)
    assert results == ["lost", "won"]
    TokenStore.open(tmp_path / "out").verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]


def test_progress_bars_go_to_stderr(tmp_path: Path, capsys) -> None:
    prepare_corpus(ListSource(english_documents(30)), tmp_path / "out", vocab_size=SMALL_VOCAB,
                   progress=True)
    captured = capsys.readouterr()
    assert "tokenizing" in captured.err and "30/30" in captured.err and captured.out == ""


def test_summary(tmp_path: Path) -> None:
    summary = prepare_corpus(ListSource(english_documents(40)), tmp_path / "out",
                             vocab_size=SMALL_VOCAB, validation_fraction=0.1)
    store = TokenStore.open(tmp_path / "out")
    assert summary.path == tmp_path / "out"
    assert summary.n_tokens == {s: store.split(s).n_tokens for s in store.splits}
    assert summary.tokens_per_second > 0
    text = summary.describe()
    assert f"{summary.n_tokens['train']:,} train" in text and "tokens/s" in text


# ---- outputs that would destroy inputs, outputs that cannot be written -------------------------


@pytest.mark.parametrize("out_of", [
    lambda data: data,  # --out the input folder
    lambda data: data / "a.jsonl",  # --out the input file
    lambda data: data.parent,  # --out a folder that holds the input
])
def test_overwrite_never_replaces_an_input(tmp_path: Path, out_of) -> None:
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    corpus = write_jsonl(data / "a.jsonl", english_documents(20))
    before = corpus.read_bytes()
    for inputs in ([data], [corpus]):
        with pytest.raises(CorpusError, match="would delete the input .*a.jsonl"):
            prepare_corpus(inputs, out_of(data), vocab_size=SMALL_VOCAB, overwrite=True)
        assert corpus.read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["a.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_overwrite_sees_an_input_reached_through_a_link(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    corpus = write_jsonl(data / "a.jsonl", english_documents(20))
    (tmp_path / "link").symlink_to("data")
    with pytest.raises(CorpusError, match="would delete the input"):
        prepare_corpus([tmp_path / "link" / "a.jsonl"], data, vocab_size=SMALL_VOCAB,
                       overwrite=True)
    assert corpus.exists()
    # --out the link itself: replacing it removes the link, not the folder it points to.
    prepare_corpus([tmp_path / "link" / "a.jsonl"], tmp_path / "link", vocab_size=SMALL_VOCAB,
                   overwrite=True)
    assert corpus.exists() and TokenStore.open(tmp_path / "link").manifest["splits"]


def test_out_under_a_file_fails_before_any_work(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "a.jsonl", english_documents(20))
    source = ListSource(english_documents(20))
    with pytest.raises(CorpusError, match=f"{tmp_path / 'a.jsonl'} is not a folder"):
        prepare_corpus(source, corpus / "sub" / "out", vocab_size=SMALL_VOCAB)
    assert source.passes == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_a_write_failure_is_a_corpus_error_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def disk_full(self, tokens, lengths):
        raise OSError(28, "No space left on device", str(tmp_path / "x.tokens"))

    monkeypatch.setattr(prepare_module._SplitWriter, "append", disk_full)
    with pytest.raises(CorpusError, match=r"x.tokens: cannot write \(No space left on device\)"):
        prepare_corpus(ListSource(english_documents(20)), tmp_path / "out",
                       vocab_size=SMALL_VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_a_given_tokenizer_that_cannot_encode_a_document(tmp_path: Path) -> None:
    """A word-level tokenizer without an unknown token fails on an unknown word: a CorpusError
    that shows the document, not the tokenizers library's bare Exception."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"alpha": 0, "beta": 1}))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "given.json"))
    docs = ["alpha beta", "beta", "alpha delta gamma", "alpha"] * 3
    with pytest.raises(CorpusError) as info:
        prepare_corpus(ListSource(docs), tmp_path / "out", tokenizer=tmp_path / "given.json")
    assert str(info.value) == ("the tokenizer cannot encode the document 'alpha delta gamma' "
                               "(WordLevel error: Missing [UNK] token from the vocabulary)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given.json"]


def test_a_failing_final_rename_keeps_the_old_store_and_says_why(tmp_path: Path, monkeypatch) -> None:
    """Not 'already exists (prepared by another process?)' because the old store was put back."""
    out = tmp_path / "out"
    prepare_corpus(ListSource(english_documents(20)), out, vocab_size=SMALL_VOCAB)
    before = file_hashes(out)

    def rename(src, dst):
        raise OSError(18, "Invalid cross-device link", str(src), None, str(dst))

    monkeypatch.setattr(prepare_module.os, "rename", rename)
    with pytest.raises(CorpusError) as info:
        prepare_corpus(ListSource(english_documents(30)), out, vocab_size=SMALL_VOCAB,
                       overwrite=True)
    assert str(info.value) == (f"{out}: cannot move the prepared corpus into place (Invalid "
                               "cross-device link); the one there is kept")
    assert file_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
