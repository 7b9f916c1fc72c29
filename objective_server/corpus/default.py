"""The default corpus: English text every machine has offline, the standard library's docstrings.

Module, class and function docstrings are read with `ast` from the stdlib source files (the
modules are never imported: some have side effects, e.g. `this` prints, `antigravity` opens a
browser), one document per module, in sorted path order. Tests, site-packages and files that do
not parse under this Python are left out. The prepared store is cached per Python version and
options, so it is built once per machine.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from objective_server.corpus import manifest as layout
from objective_server.corpus.errors import CorpusError, OutputExistsError
from objective_server.corpus.prepare import PrepareSummary, prepare_corpus
from objective_server.corpus.readers import non_empty_documents
from objective_server.corpus.store import TokenStore

DEFAULT_VOCAB_SIZE = 8192
# Larger than prepare's 0.01: with ~650 modules, 1% would hold out only a handful.
DEFAULT_VALIDATION_FRACTION = 0.05
DEFAULT_SEED = 0
# Bump when the extraction below changes, so cached stores are rebuilt.
EXTRACTION_VERSION = 1
# Folders whose modules are not documentation of the library itself.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Definitions live in statements (possibly nested in if/try/with/match); expressions never hold
# one with a docstring, and skipping them makes extraction several times faster.
_MAY_HOLD_DEFINITIONS = (ast.stmt, ast.excepthandler, ast.match_case)


def module_docstrings(source: str | bytes) -> str:
    """The docstrings of one module's source, in source order, separated by blank lines.

    Raises SyntaxError (or ValueError for null bytes) when the source does not parse.
    """
    tree = ast.parse(source)
    parts: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, _DOCUMENTED):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                parts.append(doc.strip())
        for child in ast.iter_child_nodes(node):  # depth first = source order
            if isinstance(child, _MAY_HOLD_DEFINITIONS):
                visit(child)

    visit(tree)
    return "\n\n".join(parts)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class StdlibDocstrings:
    """A DocumentSource: one document per standard-library module that has docstrings."""

    root: Path = field(default_factory=stdlib_root)

    @cached_property
    def module_files(self) -> tuple[Path, ...]:
        if not self.root.is_dir():
            raise CorpusError(f"{self.root}: standard library source folder not found")
        files = []
        for folder, subfolders, names in os.walk(self.root):
            subfolders[:] = [d for d in subfolders if d not in _SKIPPED_DIRS]  # prune the walk
            files.extend(Path(folder, n) for n in names if n.endswith(".py"))
        return tuple(sorted(files, key=lambda f: f.relative_to(self.root).parts))

    @cached_property
    def documents(self) -> tuple[str, ...]:
        # Read once and kept (a few MB): preparing iterates twice and parsing is the slow part.
        docs = []
        for path in self.module_files:
            try:
                text = module_docstrings(path.read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue  # e.g. a file written for another Python version
            if text:
                docs.append(text)
        return tuple(docs)

    def __iter__(self) -> Iterator[str]:
        return non_empty_documents(self.documents, f"the standard library at {self.root}")

    def size_bytes(self) -> int:
        return sum(len(d.encode()) for d in self.documents)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "stdlib-docstrings",
            "root": str(self.root),
            "python": sys.version.split()[0],
            "extraction_version": EXTRACTION_VERSION,
            "modules": len(self.module_files),
            "documents": len(self.documents),
        }


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $BIRDIE_CACHE, else ~/.cache/birdie."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("BIRDIE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "birdie"


def _options() -> dict[str, Any]:
    return {
        "vocab_size": DEFAULT_VOCAB_SIZE, "validation_fraction": DEFAULT_VALIDATION_FRACTION,
        "seed": DEFAULT_SEED, "extraction_version": EXTRACTION_VERSION,
        "format_version": layout.FORMAT_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])), "stdlib": str(stdlib_root()),
    }


def default_store_path(cache_dir: str | Path | None = None) -> Path:
    """Where the default corpus is cached: keyed by its options and the Python version."""
    key = hashlib.sha256(json.dumps(_options(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(cache_dir) / f"stdlib-docstrings-{key}"


def prepare_default_corpus(
    out: str | Path, *, workers: int | None = None, overwrite: bool = False,
    progress: bool = False,
) -> PrepareSummary:
    """Prepare the default corpus into `out` (no caching)."""
    return prepare_corpus(
        StdlibDocstrings(stdlib_root()), out, vocab_size=DEFAULT_VOCAB_SIZE,
        validation_fraction=DEFAULT_VALIDATION_FRACTION, seed=DEFAULT_SEED, workers=workers,
        overwrite=overwrite, progress=progress,
    )


def default_store(cache_dir: str | Path | None = None, *, progress: bool = False) -> TokenStore:
    """The default corpus, prepared on first use into the cache and reused afterwards.

    Safe when several processes ask at once: each prepares into its own temporary folder and the
    first rename wins; the others open the winner's store.
    """
    path = default_store_path(cache_dir)
    broken = False
    if path.exists():
        try:
            return TokenStore.open(path)
        except CorpusError:
            # Broken (a disk problem, a manual edit): renames make a half-written one
            # impossible, so rebuilding it is the fix.
            broken = True
    try:
        prepare_default_corpus(path, overwrite=broken, progress=progress)
    except OutputExistsError:
        pass  # another process finished first; its store is as good as ours
    return TokenStore.open(path)
