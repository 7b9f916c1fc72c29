from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from objective_server.corpus import default
from objective_server.corpus.default import (
    StdlibDocstrings,
    default_store,
    default_store_path,
    module_docstrings,
)
from objective_server.corpus.errors import OutputExistsError
from objective_server.corpus.store import TokenStore
from objective_server.special_tokens import SpecialTokens

from .helpers import english_documents

SOURCE = '''"""Module doc.

Second paragraph."""
import os

X = "not a docstring"


class Widget:
    """A widget."""

    def spin(self):
        """Spin it."""
        "a second string is not a docstring"

        def inner():
            """Nested helper."""

    def quiet(self):
        return 1


if os.name:
    async def later():
        """Inside an if."""
else:
    try:
        pass
    except ValueError:
        def fallback():
            """Inside a handler."""


def lambda_holder():
    f = lambda: "not a docstring"
'''


def test_module_docstrings_in_source_order() -> None:
    assert module_docstrings(SOURCE) == (
        "Module doc.\n\nSecond paragraph.\n\nA widget.\n\nSpin it.\n\nNested helper.\n\n"
        "Inside an if.\n\nInside a handler."
    )
    assert module_docstrings("x = 1\n") == ""


def test_extraction_never_runs_the_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    source = f'"""Has side effects."""\nopen({str(marker)!r}, "w").write("x")\nraise SystemExit\n'
    assert module_docstrings(source) == "Has side effects."
    assert not marker.exists()


@pytest.fixture
def fake_stdlib(tmp_path: Path, monkeypatch) -> Path:
    """A small stand-in standard library folder (real files, real extraction)."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "site-packages" / "third").mkdir(parents=True)
    docs = english_documents(40, seed=9)
    for i, doc in enumerate(docs[:30]):
        (root / f"mod{i:02d}.py").write_text(f'"""{doc}"""\n\ndef f():\n    """Function {i}."""\n')
    (root / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (root / "pkg" / "nodoc.py").write_text("x = 1\n")
    (root / "broken.py").write_text('"""Never read."""\ndef (:\n')
    (root / "test" / "test_mod.py").write_text('"""A test module."""\n')
    (root / "site-packages" / "third" / "x.py").write_text('"""Third party."""\n')
    monkeypatch.setattr(default, "stdlib_root", lambda: root)
    return root


def test_stdlib_source_skips_tests_third_party_and_broken_files(fake_stdlib: Path) -> None:
    source = StdlibDocstrings(fake_stdlib)
    names = [p.relative_to(fake_stdlib).as_posix() for p in source.module_files]
    assert names[:3] == ["broken.py", "mod00.py", "mod01.py"] and names[-2:] == [
        "pkg/__init__.py", "pkg/nodoc.py"]
    assert not any(n.startswith(("test/", "site-packages/")) for n in names)
    docs = list(source)
    assert len(docs) == 31  # 30 modules + the package; no-docstring and broken ones left out
    assert docs[0].endswith("Function 0.") and docs[-1] == "The package."
    assert source.describe()["documents"] == 31


def test_default_store_is_prepared_once_and_reused(fake_stdlib: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = default_store(cache)
    assert store.path == default_store_path(cache) and store.path.parent == cache
    assert store.manifest["inputs"]["kind"] == "stdlib-docstrings"
    stamp = (store.path / "train.tokens").stat().st_mtime_ns
    again = default_store(cache)
    assert again.manifest == store.manifest
    assert (again.path / "train.tokens").stat().st_mtime_ns == stamp


def test_broken_cached_store_is_rebuilt(fake_stdlib: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = default_store(cache)
    (store.path / "validation.tokens").write_bytes(b"\x00")
    rebuilt = default_store(cache)
    rebuilt.verify()
    assert sorted(p.name for p in cache.iterdir()) == [store.path.name]  # no leftovers


def test_losing_the_race_uses_the_winners_store(fake_stdlib: Path, tmp_path: Path,
                                                monkeypatch) -> None:
    real = default.prepare_default_corpus

    def another_process_wins(out, **kwargs):
        real(out, **kwargs)  # the winner's complete store lands at `out` ...
        raise OutputExistsError(f"{out}: already exists")  # ... and our rename fails

    monkeypatch.setattr(default, "prepare_default_corpus", another_process_wins)
    default_store(tmp_path).verify()


def test_losing_the_race_to_rebuild_a_broken_store(fake_stdlib: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    """Two processes find the cached store broken and both rebuild it: the one whose rename comes
    second opens the other's, as on a first prepare, instead of failing with 'already exists'."""
    store = default_store(tmp_path)
    (store.path / "train.docs").write_bytes(b"")
    real = default.prepare_default_corpus

    def another_process_wins(out, **kwargs):
        real(out, **kwargs)
        raise OutputExistsError(f"{out}: already exists (prepared by another process?)")

    monkeypatch.setattr(default, "prepare_default_corpus", another_process_wins)
    default_store(tmp_path).verify()


def test_cache_location(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BIRDIE_CACHE", str(tmp_path / "env-cache"))
    assert default_store_path().parent == tmp_path / "env-cache"
    assert default_store_path(tmp_path / "given").parent == tmp_path / "given"
    monkeypatch.delenv("BIRDIE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path().parent == tmp_path / "home" / ".cache" / "birdie"


def test_cache_key_depends_on_options_and_python(monkeypatch, tmp_path: Path) -> None:
    base = default_store_path(tmp_path)
    monkeypatch.setattr(default, "DEFAULT_VOCAB_SIZE", 4096)
    assert default_store_path(tmp_path) != base
    monkeypatch.undo()
    monkeypatch.setattr(sys, "version_info", (3, 99, 0, "final", 0))
    assert default_store_path(tmp_path) != base


# ---- the real default corpus (prepared once per session) ---------------------------------------


def test_real_default_corpus(default_corpus_cache: Path) -> None:
    store = default_store(default_corpus_cache)
    train, validation = store.split("train"), store.split("validation")
    assert store.vocab_size == 8192 and store.special == SpecialTokens.default()
    assert train.n_docs > 300 and validation.n_docs >= 10
    assert train.n_tokens > 200_000 and validation.n_tokens > 5_000
    store.verify()
    # Real English prose, decoded with its document boundary visible.
    text = store.decode(train.tokens[:2000])
    assert "[EOD]" in text and " the " in text
    words = store.encode("Return the number of items in the list.")
    assert len(words) <= 12  # a tokenizer trained on docstrings knows these words
    assert np.all(np.diff(np.asarray(train.doc_offsets)) > 1)


def test_real_default_corpus_is_keyed_by_python_version(default_corpus_cache: Path) -> None:
    [entry] = [p for p in default_corpus_cache.iterdir() if not p.name.startswith(".")]
    assert entry == default_store_path(default_corpus_cache)
    described = TokenStore.open(entry).manifest["inputs"]
    assert described["python"] == sys.version.split()[0]
    assert Path(described["root"]) == default.stdlib_root()
    assert os.path.isdir(described["root"])
