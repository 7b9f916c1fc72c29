"""Fixtures shared by the corpus tests: one prepared small corpus and the default corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from objective_server.corpus.default import default_store
from objective_server.corpus.prepare import prepare_corpus
from objective_server.corpus.store import TokenStore

from .helpers import SMALL_VOCAB, english_documents, write_jsonl

N_DOCS = 300


@pytest.fixture(scope="session")
def small_docs() -> list[str]:
    return english_documents(N_DOCS, seed=1)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory, small_docs: list[str]) -> TokenStore:
    """A corpus of `small_docs` prepared once (vocab 600, 10% held out), read-only for tests."""
    folder = tmp_path_factory.mktemp("small")
    source = write_jsonl(folder / "docs.jsonl", small_docs)
    prepare_corpus([source], folder / "prepared", vocab_size=SMALL_VOCAB,
                   validation_fraction=0.1, seed=3, workers=1)
    return TokenStore.open(folder / "prepared")


@pytest.fixture(scope="session")
def default_corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the default corpus (prepared once per test session: ~10 s)."""
    cache = tmp_path_factory.mktemp("birdie-cache")
    default_store(cache)
    return cache
