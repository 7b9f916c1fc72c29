"""The one error type of corpus preparation and reading."""

from __future__ import annotations


class CorpusError(Exception):
    """Bad corpus input or a broken token store; the message says what and where (file:line)."""


class OutputExistsError(CorpusError):
    """The output directory of a prepare already exists (or appeared while preparing)."""
