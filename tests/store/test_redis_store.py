"""What only the Redis store has to show: durability across a crash, and clean failure while down."""

from __future__ import annotations

import asyncio

import pytest
import redis

from objective_server.store import (
    LossPost,
    MemoryRunStore,
    RedisRunStore,
    StoreUnavailable,
    open_store,
)

pytestmark = pytest.mark.anyio

CONFIG = {"objectives": ["ntp", "infill"], "seed": 1}
INITIAL = [0.5, 0.5]


def post(step, rank, world_size=2, split="validation", loss=2.0):
    return LossPost(step, rank, world_size, split, {"ntp": loss, "infill": loss + 1}, {"ntp": 10, "infill": 5})


@pytest.fixture
async def store(redis_server):
    store = open_store(redis_server.url)
    yield store
    await store.close()


async def snapshot(store, run):
    return (
        await store.get_config(run),
        await store.timeline(run),
        await store.mixture_history(run),
        await store.pending(run),
        await store.policy_state(run),
        await store.train_totals(run),
    )


@pytest.mark.parametrize("crash", ["kill", "restart"])
async def test_state_survives_a_crash_and_restart_from_the_aof(redis_server, store, crash):
    await store.create_run("r", CONFIG, INITIAL, b"\x00state")
    await store.mark_served("r", 9)
    await store.post_losses("r", post(10, 0, split="train"))
    await store.post_losses("r", post(10, 1, split="train"))  # completes train 10
    await store.post_losses("r", post(20, 0))  # validation 20 waits for rank 1
    committed = await store.commit_policy("r", 0, b"state-1", [("train", 10)], [0.25, 0.75], {"m": 1}, 9)
    await store.mark_served("r", 12)
    before = await snapshot(store, "r")

    if crash == "kill":
        redis_server.kill()  # SIGKILL: only what is in the append-only file survives
    else:
        redis_server.stop()
    redis_server.start()

    # The same store object reconnects by itself.
    assert await snapshot(store, "r") == before
    assert (await store.mixture("r")).effective_step == committed.effective_step == 10
    assert (await store.post_losses("r", post(10, 0, split="train"))).duplicate  # still remembered
    assert (await store.post_losses("r", post(20, 0))).duplicate
    outcome = await store.post_losses("r", post(20, 1, loss=4.0))
    assert outcome.completed is not None
    assert outcome.completed.losses == {"ntp": 3.0, "infill": 4.0}
    assert (await store.commit_policy("r", 1, b"state-2", [("validation", 20)], None)).ok


MISSING_BACKEND_CALLS = {
    "ping": lambda s: s.ping(),
    "create_run": lambda s: s.create_run("new", CONFIG, INITIAL, b""),
    "list_runs": lambda s: s.list_runs(),
    "get_config": lambda s: s.get_config("r"),
    "mark_served": lambda s: s.mark_served("r", 5),
    "timeline": lambda s: s.timeline("r"),
    "mixture": lambda s: s.mixture("r"),
    "mixture_history": lambda s: s.mixture_history("r"),
    "post_losses": lambda s: s.post_losses("r", post(1, 0)),
    "pending": lambda s: s.pending("r"),
    "policy_state": lambda s: s.policy_state("r"),
    "commit_policy": lambda s: s.commit_policy("r", 0, b"", [], None),
    "train_totals": lambda s: s.train_totals("r"),
}


async def enter_lock(store):
    async with store.lock("r", wait_s=0.5):
        pass


async def test_every_call_fails_fast_while_redis_is_down_and_works_after(redis_server, store):
    await store.create_run("r", CONFIG, INITIAL, b"")
    await store.post_losses("r", post(1, 0))
    redis_server.stop()
    calls = {**MISSING_BACKEND_CALLS, "lock": enter_lock}
    for name, call in calls.items():
        # Fails (StoreUnavailable), rather than hanging on the dead connection; wait_for's generous
        # limit only catches a hang (its TimeoutError is not a StoreUnavailable).
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(call(store), 10)
    redis_server.start()
    await store.ping()
    assert await store.list_runs() == ["r"]
    assert (await store.post_losses("r", post(1, 0))).duplicate  # the earlier post was kept
    assert (await store.post_losses("r", post(1, 1))).completed is not None
    await enter_lock(store)


async def test_a_hung_redis_times_out_as_unavailable(redis_server, store):
    await store.create_run("r", CONFIG, INITIAL, b"")
    redis_server.pause()
    try:
        for call in (lambda: store.mark_served("r", 3), lambda: store.ping()):
            # The store's own socket timeout turns the silence into StoreUnavailable; wait_for's
            # generous limit only catches a store that would wait for ever.
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(call(), 10)
    finally:
        redis_server.resume()
    # A timed-out script may have run once the server resumed; serving is idempotent anyway.
    assert (await store.mark_served("r", 2)).max_served in (2, 3)


async def test_a_store_can_open_while_redis_is_down(redis_server):
    redis_server.stop()
    store = open_store(redis_server.url)  # nothing connects yet
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        redis_server.start()
        await store.ping()
    finally:
        await store.close()


async def test_keys_are_namespaced_per_run_and_namespaces_are_separate(redis_server):
    first = RedisRunStore.from_url(redis_server.url, namespace="alpha")
    second = RedisRunStore.from_url(redis_server.url, namespace="beta")
    try:
        await first.create_run("r", CONFIG, INITIAL, b"")
        await first.post_losses("r", post(1, 0))
        assert await second.list_runs() == []
        await second.create_run("r", {"other": True}, [1.0], b"")
        assert await first.get_config("r") == CONFIG
    finally:
        await first.close()
        await second.close()
    keys = redis.Redis.from_url(redis_server.url).keys("*")
    assert keys and all(
        k.startswith((b"alpha:run:{r}:", b"beta:run:{r}:")) or k in (b"alpha:runs", b"beta:runs")
        for k in keys
    )


def test_open_store_picks_the_implementation():
    assert isinstance(open_store(None), MemoryRunStore)
    assert isinstance(open_store(""), MemoryRunStore)
    assert isinstance(open_store("memory://"), MemoryRunStore)
    redis_store = open_store("redis://127.0.0.1:1/0")
    assert isinstance(redis_store, RedisRunStore)
    asyncio.run(redis_store.close())
    with pytest.raises(ValueError, match="store URL"):
        open_store("postgres://x")
    with pytest.raises(ValueError, match="namespace"):
        RedisRunStore.from_url("redis://127.0.0.1:1/0", namespace="a{b}")


async def test_long_timelines_are_read_whole_and_incrementally(redis_server, store):
    """Step-wise policies publish every step: 20k versions must not hit Lua's unpack limit."""
    await store.create_run("r", CONFIG, INITIAL, b"")
    # Appended directly: 20k commits through the API would make the test slow, not stronger.
    raw = redis.Redis.from_url(redis_server.url)
    raw.rpush("birdie:run:{r}:timeline", *range(1, 20_000))
    raw.rpush("birdie:run:{r}:mixtures", *[raw.lindex("birdie:run:{r}:mixtures", 0)] * 19_999)
    full = await store.mark_served("r", 50)
    assert full.effective_steps == tuple(range(20_000))
    assert full.version_at(50) == 50
    outcome = await store.commit_policy("r", 0, b"", [], [0.5, 0.5])
    assert (outcome.mixture_version, outcome.effective_step) == (20_000, 51)
    extended = await store.timeline("r", known=full)
    assert extended.effective_steps == full.effective_steps + (51,)
    raw.close()


async def test_more_concurrent_calls_than_connections_wait_for_one(redis_server, store):
    small_pool = RedisRunStore.from_url(redis_server.url, max_connections=4)
    try:
        await small_pool.create_run("r", CONFIG, INITIAL, b"")
        timelines = await asyncio.gather(*(small_pool.mark_served("r", s) for s in range(200)))
        assert max(t.max_served for t in timelines) == 199
        # The default pool (64) under more calls than redis-py's own default limit (100).
        timelines = await asyncio.gather(*(store.mark_served("r", s) for s in range(300)))
        assert max(t.max_served for t in timelines) == 299
    finally:
        await small_pool.close()


class ReplyDroppingProxy:
    """A TCP proxy to Redis that, when armed with a marker, forwards the next command containing it
    and then cuts the connection instead of passing Redis's reply back: the command ran, the client
    saw a connection error (and redis-py's one retry re-sends it on a new connection)."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.marker: bytes | None = None
        self.dropped = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _connection(self, client_reader, client_writer) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        drop_next_reply = asyncio.Event()

        async def commands() -> None:
            while data := await client_reader.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    drop_next_reply.set()
                redis_writer.write(data)
                await redis_writer.drain()
            redis_writer.close()

        async def replies() -> None:
            while data := await redis_reader.read(65536):
                if drop_next_reply.is_set():
                    self.dropped += 1
                    client_writer.close()
                    redis_writer.close()
                    return
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        await asyncio.gather(commands(), replies(), return_exceptions=True)

    async def close(self) -> None:
        self.server.close()


async def test_a_lock_whose_acquire_reply_was_lost_is_still_ours(redis_server):
    proxy = ReplyDroppingProxy(redis_server.port)
    store = RedisRunStore.from_url(await proxy.start(), namespace="lossy")
    try:
        await store.create_run("r", CONFIG, INITIAL, b"")
        proxy.marker = b"PX"  # the lock's SET NX PX
        # A 60 s TTL against a 2 s wait: had the re-sent SET been refused as someone else's lock,
        # the acquire would have run out of wait long before the lock expired.
        async with store.lock("r", "policy", ttl_s=60, wait_s=2):
            assert proxy.dropped == 1  # the SET ran, its reply was lost, redis-py re-sent it
        async with store.lock("r", "policy", ttl_s=60, wait_s=0.5):
            pass  # released: the next holder gets it at once
    finally:
        await store.close()
        await proxy.close()
