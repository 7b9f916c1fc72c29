"""Client side of the Birdie objective server: `BirdieClient`, `BatchIterator`, `LossPoster`, the
shared API models and wire format, and (with torch) `clients.torch_data.BirdieIterableDataset`.

Names are loaded on first use: the server imports `clients.models` and `clients.wire` and must not
need the client's own dependencies (httpx, tenacity) for that.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BirdieClient": "clients.client",
    "BirdieError": "clients.client",
    "BirdieConnectionError": "clients.client",
    "BirdieAborted": "clients.client",
    "BirdieHTTPError": "clients.client",
    "TransientHTTPError": "clients.client",
    "AuthenticationError": "clients.client",
    "NotFoundError": "clients.client",
    "ConflictError": "clients.client",
    "RequestRejectedError": "clients.client",
    "ServerError": "clients.client",
    "training_address": "clients.client",
    "validation_address": "clients.client",
    "BatchIterator": "clients.iterator",
    "LossPoster": "clients.losses",
    "LossBacklogFull": "clients.losses",
    "FailedPost": "clients.losses",
    "WireBatch": "clients.wire",
    "LossPostBody": "clients.models",
    "LossPostResponse": "clients.models",
    "MixtureResponse": "clients.models",
    "MixtureHistoryResponse": "clients.models",
    "ObjectiveInfo": "clients.models",
    "RunInfo": "clients.models",
    "RunSummary": "clients.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
