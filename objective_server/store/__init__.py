"""The run-state store: one protocol (`RunStore`), an in-process and a Redis implementation.

`open_store(url)` picks one: no URL (or `memory://`) gives a `MemoryRunStore` for a single process;
`redis://`, `rediss://` or `unix://` gives a `RedisRunStore` that workers and replicas share.
"""

from __future__ import annotations

from objective_server.store.memory import MemoryRunStore
from objective_server.store.protocol import (
    MAX_TOKENS,
    SPLITS,
    Aggregate,
    CommitOutcome,
    ConflictError,
    LockNotAcquired,
    LossPost,
    MixtureRecord,
    PostOutcome,
    RunExists,
    RunStore,
    StoreUnavailable,
    Timeline,
    UnknownMixtureVersion,
    UnknownRun,
)
from objective_server.store.redis_store import RedisRunStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(url: str | None, namespace: str = "birdie", timeout_s: float = 1.0) -> RunStore:
    """The store for `url`: None, "" or "memory://" -> in-process; a Redis URL -> Redis
    (`namespace` prefixes its keys, `timeout_s` bounds each Redis call)."""
    if url is None or url == "" or url == "memory://":
        return MemoryRunStore()
    if url.startswith(REDIS_SCHEMES):
        return RedisRunStore.from_url(url, namespace=namespace, timeout_s=timeout_s)
    raise ValueError(f"store URL must be memory:// or start with {', '.join(REDIS_SCHEMES)}, got {url!r}")


__all__ = [
    "MAX_TOKENS",
    "SPLITS",
    "Aggregate",
    "CommitOutcome",
    "ConflictError",
    "LockNotAcquired",
    "LossPost",
    "MemoryRunStore",
    "MixtureRecord",
    "PostOutcome",
    "RedisRunStore",
    "RunExists",
    "RunStore",
    "StoreUnavailable",
    "Timeline",
    "UnknownMixtureVersion",
    "UnknownRun",
    "open_store",
]
