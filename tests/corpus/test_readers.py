from __future__ import annotations

import gzip
import hashlib
import json
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from objective_server.corpus import readers
from objective_server.corpus.errors import CorpusError
from objective_server.corpus.readers import FileSource, ReadOptions, corpus_files, read_file

from .helpers import english_documents, write_jsonl, write_parquet, write_txt


def docs_of(*inputs: Path, **options: object) -> list[str]:
    return list(FileSource.from_inputs(list(inputs), **options))  # type: ignore[arg-type]


# ---- formats -----------------------------------------------------------------------------------


def test_txt_paragraphs_are_documents(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    # CRLF line ends, several blank lines, a whitespace-only line and no final newline.
    path.write_bytes(
        b"\n\nfirst line\r\nstill first\r\n\r\n\r\n  \t \nsecond\n\n\nthird  \n  indented\n\nlast"
    )
    assert docs_of(path) == ["first line\nstill first", "second", "third  \n  indented", "last"]


def test_txt_one_document_per_file(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("para one\n\npara two\n")
    b = tmp_path / "b.txt"
    b.write_text("\n\n   \n")  # blank file: no document
    c = tmp_path / "c.txt"
    c.write_text("only")
    assert docs_of(a, b, c, txt_docs_per_file=True) == ["para one\n\npara two", "only"]


def test_gzipped_txt_and_jsonl(tmp_path: Path) -> None:
    docs = english_documents(20)
    assert docs_of(write_txt(tmp_path / "a.txt.gz", docs)) == docs
    assert docs_of(write_jsonl(tmp_path / "b.jsonl.gz", docs)) == docs


def test_jsonl_field_blank_lines_and_empty_texts(tmp_path: Path) -> None:
    path = tmp_path / "a.json"  # .json is read as JSON Lines too
    lines = [{"body": "one", "text": 5}, {"body": ""}, {"body": "  "}, {"body": "two\n\nlines"}]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n   \n"
                    + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    # Empty and blank texts are not documents; other fields are not looked at.
    assert docs_of(path, text_field="body") == ["one", "two\n\nlines"]


@pytest.mark.parametrize("large", [False, True])
def test_parquet_column_across_batches(tmp_path: Path, monkeypatch, large: bool) -> None:
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 7)
    docs = english_documents(50)
    path = write_parquet(tmp_path / "a.parquet", docs, column="content", row_group_size=16,
                         large=large)
    assert docs_of(path, text_field="content") == docs


def test_folders_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    write_txt(root / "b" / "deep" / "z.txt", ["b-deep-z"])
    write_txt(root / "b" / "a.txt", ["b-a"])
    write_jsonl(root / "a" / "x.jsonl", ["a-x-1", "a-x-2"])
    write_parquet(root / "c.parquet", ["c"])
    write_txt(root / "0.txt", ["zero"])
    write_txt(root / ".hidden" / "h.txt", ["hidden"])
    (root / ".lock.txt").write_text("hidden file")
    (root / "README.md").write_text("not a corpus file")
    (root / "b" / "notes.csv").write_text("x,y")
    assert [p.relative_to(root).as_posix() for p in corpus_files([root])] == [
        "0.txt", "a/x.jsonl", "b/a.txt", "b/deep/z.txt", "c.parquet"]
    assert docs_of(root) == ["zero", "a-x-1", "a-x-2", "b-a", "b-deep-z", "c"]
    # Inputs keep the order they are given in.
    extra = write_txt(tmp_path / "first.txt", ["given first"])
    assert docs_of(extra, root)[:2] == ["given first", "zero"]
    assert docs_of(root, extra)[-1] == "given first"


def test_source_iterates_again_identically(tmp_path: Path) -> None:
    source = FileSource.from_inputs([write_jsonl(tmp_path / "a.jsonl", english_documents(30))])
    assert list(source) == list(source)
    assert source.size_bytes() == (tmp_path / "a.jsonl").stat().st_size
    described = source.describe()
    assert described["files"] == [{"path": str((tmp_path / "a.jsonl").resolve()),
                                   "bytes": source.size_bytes()}]
    assert described["text_field"] == "text"


def test_text_file_larger_than_read_chunk_is_streamed(tmp_path: Path) -> None:
    """A file 12x the read buffer is read with memory bounded by the buffer, not the file."""
    doc = ("streamed words " * 40).strip()
    n_docs = (12 * readers.READ_CHUNK_BYTES) // (len(doc) + 2)
    path = tmp_path / "big.txt"
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(f"{i} {doc}\n\n")
    assert path.stat().st_size > 12 * readers.READ_CHUNK_BYTES

    digest, count = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        for text in FileSource.from_inputs([path]):
            digest.update(text.encode())
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256("".join(f"{i} {doc}" for i in range(n_docs)).encode())
    assert count == n_docs and digest.hexdigest() == expected.hexdigest()
    assert peak < 4 * readers.READ_CHUNK_BYTES, f"peak {peak} bytes: the file was not streamed"


def test_jsonl_file_larger_than_read_chunk_is_streamed(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    docs = english_documents(400, max_words=30)
    with open(path, "w") as f:
        while f.tell() < 3 * readers.READ_CHUNK_BYTES:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_file(path, ReadOptions()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count % len(docs) == 0 and count >= 3 * len(docs)
    assert peak < 3 * readers.READ_CHUNK_BYTES


# ---- errors ------------------------------------------------------------------------------------


def error_of(*inputs: Path, **options: object) -> str:
    with pytest.raises(CorpusError) as info:
        docs_of(*inputs, **options)
    return str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    assert "no such file or directory" in error_of(tmp_path / "nope.jsonl")


def test_no_inputs() -> None:
    with pytest.raises(CorpusError, match="no corpus input"):
        corpus_files([])


@pytest.mark.parametrize("name", ["a.csv", "a.parquet.gz", "a", "a.jsonl.zst"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("x")
    message = error_of(path)
    assert name in message and "unknown corpus file type" in message and ".jsonl" in message


def test_folder_without_corpus_files(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("x")
    assert "holds no corpus files" in error_of(tmp_path)


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "fine"}\n')
    assert error_of(path).startswith(f"{path}:3: malformed JSON")


def test_json_array_file_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[\n  {"text": "a"}\n]\n')
    message = error_of(path)
    assert f"{path}:1:" in message and "one complete JSON object per line" in message


def test_json_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n["a", "b"]\n')
    assert error_of(path) == f"{path}:2: expected a JSON object per line, got list"


def test_missing_text_field_lists_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ["x"], field="content")
    assert error_of(path) == f"{path}:1: no field 'text' (fields: content, id)"


@pytest.mark.parametrize("value, kind", [(3, "a number"), (None, "null"), (["a"], "an array")])
def test_non_string_text(tmp_path: Path, value: object, kind: str) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    assert error_of(path) == f"{path}:2: field 'text' is {kind}, expected a string"


def test_parquet_missing_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", ["x"], column="body")
    assert error_of(path) == f"{path}: no column 'text' (columns: id, body)"


def test_parquet_non_string_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", ["x"])
    assert "column 'id' has type int64, expected string" in error_of(path, text_field="id")


def test_parquet_null_value(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), path)
    assert error_of(path) == f"{path}: row 2: column 'text' is null, expected a string"


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    path.write_bytes(b"definitely not parquet")
    assert "cannot read as Parquet" in error_of(path)


def test_unreadable_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    assert error_of(path).startswith(f"{path}: cannot read")


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.txt.gz"
    compressed = gzip.compress("\n\n".join(english_documents(200)).encode())
    path.write_bytes(compressed[: len(compressed) // 2])
    assert error_of(path).startswith(f"{path}: cannot read")


def corrupt_gzip(path: Path) -> Path:
    """A .jsonl.gz with its middle bytes overwritten: a valid gzip header, broken deflate data."""
    write_jsonl(path, english_documents(200))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 200] = np.random.default_rng(0).bytes(200)
    path.write_bytes(bytes(data))
    with pytest.raises(zlib.error):  # what the gzip module raises on this file
        gzip.decompress(bytes(data))
    return path


def test_corrupted_gzip(tmp_path: Path) -> None:
    path = corrupt_gzip(tmp_path / "a.jsonl.gz")
    assert error_of(path) == (
        f"{path}: cannot read (Error -3 while decompressing data: invalid distance too far back)"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("fine\n\nalso fine ✓\n".encode() + b"ok \xff\xfe broken\n")
    assert error_of(path) == f"{path}:4: not UTF-8 text (invalid start byte at byte 4 of the line)"


def test_bom_and_crlf_are_normalised(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "one"}\r\n{"text": "two"}\r\n')
    assert docs_of(path) == ["one", "two"]


def test_a_folder_named_like_a_file_is_read_as_a_folder(tmp_path: Path) -> None:
    weird = tmp_path / "x.txt"
    weird.mkdir()
    assert "holds no corpus files" in error_of(weird)


def test_empty_input(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("\n \n\t\n")
    b = write_jsonl(tmp_path / "b.jsonl", ["", "   "])
    message = error_of(a, b)
    assert message.startswith("no documents") and "a.txt" in message and "b.jsonl" in message


def test_empty_text_field_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ["x"])
    assert "text field name must not be empty" in error_of(path, text_field="")


# ---- text that is not valid Unicode, inputs that are not what they seem ---------------------------


def test_json_escape_of_a_lone_surrogate(tmp_path: Path) -> None:
    """JSON can spell a string no UTF-8 encodes ("\\ud800"); it must fail at its line, not as a
    UnicodeEncodeError out of the tokenizer trainer."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine \\ud83d\\ude00"}\n{"text": "bad \\ud800 half"}\n')
    assert error_of(path) == (
        f"{path}:2: field 'text' is not valid Unicode (an unpaired surrogate, \\ud800)"
    )


def test_json_nested_too_deep(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "x", "junk": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert error_of(path).startswith(f"{path}:2: malformed JSON (nested too deeply")


def test_parquet_string_that_is_not_utf8(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    values = pa.array([b"fine", b"also fine", b"bad \xff byte"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": values}), path)
    assert error_of(path) == f"{path}: row 2: column 'text' is not UTF-8 text"


def test_an_input_given_twice_is_refused(tmp_path: Path) -> None:
    """Read twice, a file's documents would land in both splits (validation = training data)."""
    root = tmp_path / "data"
    root.mkdir()
    a = write_jsonl(root / "a.jsonl", ["one", "two"])
    twice = "; give each input once (read twice, its documents could land in both splits)"
    assert error_of(a, a) == f"{a}: the same file as {a}{twice}"
    assert error_of(root, a) == f"{a}: the same file as {a}{twice}"
    (root / "link.jsonl").symlink_to("a.jsonl")
    assert error_of(root) == f"{root / 'link.jsonl'}: the same file as {a}{twice}"


def test_a_prepared_corpus_inside_an_input_folder_is_not_input(tmp_path: Path) -> None:
    """`prepare data --out data/prepared` works; the next prepare of data must not read the
    store's manifest.json and tokenizer.json as JSON Lines."""
    from objective_server.corpus.prepare import prepare_corpus

    root = tmp_path / "data"
    root.mkdir()
    write_jsonl(root / "a.jsonl", english_documents(30))
    prepare_corpus([root], root / "prepared", vocab_size=600)
    assert corpus_files([root]) == [root / "a.jsonl"]
    assert "is a prepared corpus" in error_of(root / "prepared")
