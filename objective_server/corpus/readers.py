"""Stream documents out of corpus files: plain text, JSON Lines and Parquet, files or folders.

Nothing here loads a whole file: text and JSON Lines are read line by line through a buffered
reader, Parquet one record batch at a time. A *document source* is anything that can be iterated
more than once (preparing reads the corpus twice: a scan, then the encoding pass) and says how big
it is and where it came from; `FileSource` is the one for files, `default.StdlibDocstrings` the
one for the embedded default corpus.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from objective_server.corpus import manifest as layout
from objective_server.corpus.errors import CorpusError, reason

# Buffer size of the line readers and rows per Parquet batch: memory use is bounded by these
# (plus the longest document), not by file size.
READ_CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024

TEXT, JSON_LINES, PARQUET = "text", "jsonl", "parquet"
_FORMATS = {".txt": TEXT, ".jsonl": JSON_LINES, ".json": JSON_LINES, ".parquet": PARQUET}
_GZIP_OK = {TEXT, JSON_LINES}  # Parquet compresses internally; a .parquet.gz is not a thing
SUPPORTED_EXTENSIONS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@runtime_checkable
class DocumentSource(Protocol):
    """Documents (non-empty strings) in a fixed order; iterating again gives the same documents."""

    def __iter__(self) -> Iterator[str]: ...

    def size_bytes(self) -> int:
        """Approximate input size, for sampling the tokenizer's training text."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the documents came from, for the manifest (paths, sizes, options)."""
        ...


def file_format(path: Path) -> str:
    """`text`, `jsonl` or `parquet` from the file name; CorpusError for anything else."""
    name = path.name.lower()
    compressed = name.endswith(".gz")
    stem = name[: -len(".gz")] if compressed else name
    fmt = _FORMATS.get(Path(stem).suffix)
    if fmt is None or (compressed and fmt not in _GZIP_OK):
        raise CorpusError(
            f"{path}: unknown corpus file type (supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    return fmt


def _is_corpus_file(path: Path) -> bool:
    try:
        file_format(path)
    except CorpusError:
        return False
    return True


def corpus_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files to read, in order: inputs as given; a folder's files recursively, sorted.

    Inside a folder, hidden entries (name starting with '.'), prepared corpora and files of
    other types are left out (a folder of data often holds a README or a lock file); a file
    named explicitly must be of a supported type. A file listed twice is a CorpusError.
    """
    if not inputs:
        raise CorpusError("no corpus input given")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise CorpusError(f"{path}: no such file or directory")
        if path.is_dir():
            if _is_prepared_corpus(path):
                raise CorpusError(f"{path}: is a prepared corpus (prepare's output), not corpus "
                                  "input; give the files it was prepared from")
            found = sorted(_folder_files(path), key=lambda f: f.relative_to(path).parts)
            if not found:
                raise CorpusError(
                    f"{path}: folder holds no corpus files ({', '.join(SUPPORTED_EXTENSIONS)})"
                )
            files.extend(found)
        elif path.is_file():
            file_format(path)
            files.append(path)
        else:
            raise CorpusError(f"{path}: not a regular file or folder")
    _check_each_file_once(files)
    return files


def _is_prepared_corpus(folder: Path) -> bool:
    return (folder / layout.MANIFEST_FILE).is_file() and any(
        (folder / layout.tokens_file(split)).is_file() for split in layout.SPLITS)


def _folder_files(root: Path) -> Iterator[Path]:
    """Corpus files under `root`, not in hidden folders or prepared corpora (a store prepared
    into its own input folder must not be read as input the next time); symlinked folders are
    not followed (no loops)."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")
                         and not _is_prepared_corpus(Path(folder, d))]
        for name in names:
            f = Path(folder, name)
            if not name.startswith(".") and f.is_file() and _is_corpus_file(f):
                yield f


def _check_each_file_once(files: Sequence[Path]) -> None:
    """CorpusError for a file listed twice (given twice, inside a given folder too, or reached
    through a link)."""
    seen: dict[tuple[int, int], Path] = {}
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise CorpusError(f"{f}: cannot read ({reason(e)})") from None
        first = seen.setdefault((st.st_dev, st.st_ino), f)
        if first is not f:
            raise CorpusError(f"{f}: the same file as {first}; give each input once (read twice, "
                              "its documents could land in both splits)")


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=READ_CHUNK_BYTES)


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) pairs of a UTF-8 file, turning I/O and decoding failures into
    CorpusError. Lines are decoded one by one so a bad byte is reported at its line; "\r\n"
    becomes "\n" (documents do not depend on the writer's platform) and a leading BOM is dropped.
    """
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(
                        f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1} of "
                        "the line)"
                    ) from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"
                yield lineno, line
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupted compressed data
        raise CorpusError(f"{path}: cannot read ({reason(e)})") from None


def read_text(path: Path, *, one_document: bool = False) -> Iterator[str]:
    """Documents of a plain-text file: paragraphs separated by blank lines, or the whole file."""
    lines: list[str] = []
    for _, line in _numbered_lines(path):
        if one_document or line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).rstrip("\n")
            lines = []
    if lines:
        doc = "".join(lines).rstrip("\n")
        if doc.strip():
            yield doc


def read_json_lines(path: Path, *, text_field: str = "text") -> Iterator[str]:
    """The `text_field` string of every JSON object, one object per line; blank lines skipped."""
    for lineno, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if line.strip() in ("[", "{"):
                hint = "; expected one complete JSON object per line (JSON Lines)"
            raise CorpusError(
                f"{path}:{lineno}: malformed JSON ({e.msg}: column {e.colno}){hint}"
            ) from None
        except RecursionError:
            raise CorpusError(f"{path}:{lineno}: malformed JSON (nested too deeply)") from None
        if not isinstance(record, dict):
            raise CorpusError(
                f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}"
            )
        if text_field not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise CorpusError(f"{path}:{lineno}: no field {text_field!r} (fields: {fields})")
        value = record[text_field]
        if not isinstance(value, str):
            raise CorpusError(
                f"{path}:{lineno}: field {text_field!r} is {_json_type(value)}, expected a string"
            )
        try:
            value.encode("utf-8")  # JSON can escape half a surrogate pair; no tokenizer takes it
        except UnicodeEncodeError as e:
            raise CorpusError(
                f"{path}:{lineno}: field {text_field!r} is not valid Unicode (an unpaired "
                f"surrogate, \\u{ord(value[e.start]):04x})"
            ) from None
        yield value


def _json_type(value: object) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def read_parquet(path: Path, *, text_field: str = "text") -> Iterator[str]:
    """The strings of column `text_field`, one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: cannot read as Parquet ({e})") from None
    schema = parquet.schema_arrow
    index = schema.get_field_index(text_field)
    if index < 0:
        raise CorpusError(
            f"{path}: no column {text_field!r} (columns: {', '.join(schema.names) or 'none'})"
        )
    kind = schema.field(index).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise CorpusError(f"{path}: column {text_field!r} has type {kind}, expected string")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            column = batch.column(0)
            if column.null_count:
                first_null = row + column.is_null().to_pylist().index(True)
                raise CorpusError(
                    f"{path}: row {first_null}: column {text_field!r} is null, expected a string"
                )
            try:
                texts = column.to_pylist()
            except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8
                raise CorpusError(
                    f"{path}: row {row + _first_undecodable(column)}: column {text_field!r} is "
                    "not UTF-8 text"
                ) from None
            yield from texts
            row += len(column)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: cannot read row batch at row {row} ({e})") from None


def _first_undecodable(column: Any) -> int:
    for i in range(len(column)):
        try:
            column[i].as_py()
        except UnicodeDecodeError:
            return i
    return 0


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"  # JSON Lines field / Parquet column holding the text
    txt_docs_per_file: bool = False  # a .txt file is one document (instead of one per paragraph)


def read_file(path: Path, options: ReadOptions = ReadOptions()) -> Iterator[str]:
    """All documents of one file as stored (may include empty ones; `FileSource` drops those)."""
    fmt = file_format(path)
    if fmt == TEXT:
        return read_text(path, one_document=options.txt_docs_per_file)
    if fmt == JSON_LINES:
        return read_json_lines(path, text_field=options.text_field)
    return read_parquet(path, text_field=options.text_field)


def non_empty_documents(documents: Iterable[str], what: str) -> Iterator[str]:
    """Drop blank documents; CorpusError at the end if none was left (`what` names the input)."""
    seen = False
    for doc in documents:
        if doc.strip():
            seen = True
            yield doc
    if not seen:
        raise CorpusError(f"no documents: {what} holds no non-empty text")


@dataclass(frozen=True)
class FileSource:
    """Documents of corpus files and folders (see `corpus_files` for order and selection)."""

    files: tuple[Path, ...]
    options: ReadOptions = field(default_factory=ReadOptions)

    @classmethod
    def from_inputs(
        cls, inputs: Sequence[str | Path], *, text_field: str = "text",
        txt_docs_per_file: bool = False,
    ) -> FileSource:
        if not text_field:
            raise CorpusError("the text field name must not be empty")
        return cls(tuple(corpus_files(inputs)), ReadOptions(text_field, txt_docs_per_file))

    def __iter__(self) -> Iterator[str]:
        def every_document() -> Iterator[str]:
            for path in self.files:
                yield from read_file(path, self.options)

        what = ", ".join(str(p) for p in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
        return non_empty_documents(every_document(), what)

    def size_bytes(self) -> int:
        return sum(_size(p) for p in self.files)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "files",
            "files": [{"path": str(p.resolve()), "bytes": _size(p)} for p in self.files],
            "text_field": self.options.text_field,
            "txt_docs_per_file": self.options.txt_docs_per_file,
        }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({reason(e)})") from None
