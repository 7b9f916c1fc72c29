"""The LRU of batch generations: shared in-flight work, eviction order, failures forgotten."""

from __future__ import annotations

import asyncio

import pytest

from objective_server.service.cache import TaskCache

pytestmark = pytest.mark.anyio


async def test_concurrent_requests_for_one_key_share_one_generation():
    cache: TaskCache[int] = TaskCache(4)
    started = []

    async def generate():
        started.append(1)
        await asyncio.sleep(0.01)
        return 42

    first, hit_first = cache.get_or_start("a", generate)
    second, hit_second = cache.get_or_start("a", generate)
    assert (hit_first, hit_second) == (False, True) and first is second
    assert await first == 42 and len(started) == 1


async def test_least_recently_used_entries_are_evicted_first():
    cache: TaskCache[str] = TaskCache(2)

    def start(value):
        async def generate():
            return value
        return generate

    cache.get_or_start("a", start("a"))
    cache.get_or_start("b", start("b"))
    cache.get_or_start("a", start("a"))  # a is now the most recent
    cache.get_or_start("c", start("c"))
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2


async def test_a_failed_generation_is_forgotten_so_the_next_request_retries():
    cache: TaskCache[int] = TaskCache(2)

    async def fails():
        raise RuntimeError("boom")

    task, _ = cache.get_or_start("k", fails)
    with pytest.raises(RuntimeError):
        await task
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert "k" not in cache

    async def works():
        return 7

    task, hit = cache.get_or_start("k", works)
    assert not hit and await task == 7 and "k" in cache
