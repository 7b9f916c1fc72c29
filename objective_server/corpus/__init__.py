"""Corpus preparation and reading: documents -> tokenizer + memory-mapped token store.

- `readers`: stream documents from .txt / .jsonl / .json / .parquet files and folders
- `tokenizer`: train a byte-level BPE or load a tokenizer.json; special token ids
- `prepare`: write a token store (layout in `manifest`)
- `store`: `TokenStore.open(path)` reads one
- `default`: the standard library's docstrings as a corpus every machine has
"""

from objective_server.corpus.errors import CorpusError, OutputExistsError
from objective_server.corpus.prepare import PrepareSummary, prepare_corpus
from objective_server.corpus.readers import DocumentSource, FileSource
from objective_server.corpus.store import CorpusSplit, TokenStore
from objective_server.corpus.default import default_store

__all__ = [
    "CorpusError",
    "CorpusSplit",
    "DocumentSource",
    "FileSource",
    "OutputExistsError",
    "PrepareSummary",
    "TokenStore",
    "default_store",
    "prepare_corpus",
]
