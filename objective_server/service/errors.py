"""Errors of the service layer; app.py maps each to its HTTP status."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request names something impossible for its run (unknown configuration, rank >= world
    size, an index past the validation batches, ...): 422."""


class RequestTooLarge(ValueError):
    """A batch or body beyond the configured limits: 413."""


class NotAcceptable(ValueError):
    """The Accept header admits none of the formats this route can answer in: 406."""


class RunConflict(Exception):
    """A run of that name exists with a different config: 409."""


class UnknownObjective(InvalidRequest):
    """A configuration name the run does not have: 422."""
