"""The one error type of corpus preparation and reading."""

from __future__ import annotations


class CorpusError(Exception):
    """Bad corpus input or a broken token store; the message says what and where (file:line)."""


class OutputExistsError(CorpusError):
    """The output directory of a prepare already exists (or appeared while preparing)."""


def reason(e: BaseException) -> str:
    """An OS error's own words ("No such file or directory"), else the error's text or type."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
