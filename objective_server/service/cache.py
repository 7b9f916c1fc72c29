"""An LRU of batch generations, keyed by address, holding the task that produces each batch.

Holding the task (not only the finished batch) means concurrent requests for one address (a retry
racing its original, a prefetch racing the request it anticipated) share one generation.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class TaskCache(Generic[T]):
    """At most `capacity` entries, least recently used evicted first; failed tasks are forgotten."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, asyncio.Task[T]] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_start(self, key: Hashable, start: Callable[[], Awaitable[T]]) -> tuple[asyncio.Task[T], bool]:
        """The task for `key` and whether it was there already; starts `start()` if not."""
        task = self._entries.get(key)
        if task is not None:
            self._entries.move_to_end(key)
            return task, True
        task = asyncio.ensure_future(start())
        self._entries[key] = task
        task.add_done_callback(lambda done: self._forget_failure(key, done))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return task, False

    def _forget_failure(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if (task.cancelled() or task.exception() is not None) and self._entries.get(key) is task:
            del self._entries[key]

    def clear(self) -> None:
        for task in self._entries.values():
            task.cancel()
        self._entries.clear()
