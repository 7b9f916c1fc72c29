"""`RedisRunStore`: the run state in Redis, shared by every worker and replica.

Every operation that reads and writes is one Lua script (EVALSHA via redis-py `register_script`),
so it is atomic: scripts check everything before their first write, because Redis does not roll a
failing script back. Keys of a run share the hash tag `{run}` (one cluster slot); each script gets
the run's config key as KEYS[1] (existence check and routing) and builds the run's other keys from
the prefix in ARGV[1].

Layout under `<ns>:run:{<run>}:`
    config                   JSON string, the existence marker
    state                    hash: max_served, num_configs, policy_version, policy_state (bytes)
    mixtures                 list of mixture bodies (JSON: probabilities, created_at_step, meta); index = version
    timeline                 list of effective steps; index = version
    ranks:<split>:<step>     set of ranks posted, while the aggregate is incomplete
    sums:<split>:<step>      hash: ws, l:<name> (sum loss*tokens, %.17g), t:<name> (sum tokens); until a
                             training aggregate is consumed (validation aggregates: forever)
    completed                hash <split>:<step> -> world_size, forever (answers duplicates cheaply)
    pending                  sorted set of <split>:<step>, score step
    evaluations              list of validation:<step> the policy consumed (their sums are kept)
    totals                   hash l:/t:/p:<name> over training posts
    lock:<name>              redis-py Lock
and `<ns>:runs`, the set of run names.

Floats cross into Lua as repr() strings and are stored with %.17g, so sums are exact doubles and
match `MemoryRunStore` bit for bit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import redis.asyncio as redis
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockNotOwnedError
from redis.exceptions import TimeoutError as RedisTimeoutError

from objective_server.store.protocol import (
    Aggregate,
    CommitOutcome,
    ConflictError,
    LockNotAcquired,
    LossPost,
    MixtureRecord,
    PostOutcome,
    RunExists,
    StoreUnavailable,
    Timeline,
    UnknownMixtureVersion,
    UnknownRun,
    check_consumed,
    check_expected_version,
    check_new_run_name,
    check_probabilities,
    check_step,
    decode_mixture,
    encode_mixture_body,
    is_run_name,
    to_json,
    totals_view,
)

log = logging.getLogger(__name__)

LOCK_POLL_S = 0.01


class OwnTokenLock(Lock):
    """redis-py's lock (SET NX PX with a random token), except that finding the key already holding
    our own token counts as acquired: the connection retry re-sends a SET whose reply was lost after
    Redis ran it, and plain SET NX then fails against ourselves, blocking every drain until the lock
    expires."""

    async def do_acquire(self, token: str | bytes) -> bool:
        if await super().do_acquire(token):
            return True
        held = await self.redis.get(self.name)
        return held is not None and held == (token.encode() if isinstance(token, str) else token)

_CREATE_RUN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local p = ARGV[1]
redis.call('SET', KEYS[1], ARGV[3])
redis.call('HSET', p .. 'state', 'max_served', -1, 'num_configs', ARGV[4],
           'policy_version', 0, 'policy_state', ARGV[6])
redis.call('RPUSH', p .. 'mixtures', ARGV[5])
redis.call('RPUSH', p .. 'timeline', 0)
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# ARGV: prefix, step (-1: only read), versions the caller knows already.
# Returns {max_served, first version sent, {effective steps from it on}} or false.
# (Nested, not unpack(): unpack fails beyond ~8000 values.)
_MARK_SERVED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local p = ARGV[1]
local served = redis.call('HGET', p .. 'state', 'max_served')
if tonumber(ARGV[2]) > tonumber(served) then
  served = ARGV[2]
  redis.call('HSET', p .. 'state', 'max_served', served)
end
local first = tonumber(ARGV[3])
if first > redis.call('LLEN', p .. 'timeline') then first = 0 end  -- not this run's timeline
return {served, tostring(first), redis.call('LRANGE', p .. 'timeline', first, -1)}
"""

# ARGV: prefix, version ('latest' or a number; anything else is missing).
# Returns {'ok', version, effective, body} | {'missing', count} | false
_MIXTURE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local p = ARGV[1]
local count = redis.call('LLEN', p .. 'mixtures')
local version = count - 1
if ARGV[2] ~= 'latest' then version = tonumber(ARGV[2]) end
if not version or version < 0 or version >= count then return {'missing', tostring(count)} end
return {'ok', tostring(version), redis.call('LINDEX', p .. 'timeline', version),
        redis.call('LINDEX', p .. 'mixtures', version)}
"""

_MIXTURE_HISTORY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local p = ARGV[1]
return {redis.call('LRANGE', p .. 'timeline', 0, -1), redis.call('LRANGE', p .. 'mixtures', 0, -1)}
"""

# ARGV: prefix, split, step, rank, world_size, count, then (name, loss, tokens) per configuration.
_POST_LOSSES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local p, split, step, rank, ws = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local id = split .. ':' .. step
local ranks_key, sums_key = p .. 'ranks:' .. id, p .. 'sums:' .. id
local done_ws = redis.call('HGET', p .. 'completed', id)
if done_ws then
  if done_ws ~= ws then return {'conflict', done_ws} end
  return {'duplicate', done_ws}
end
local open_ws = redis.call('HGET', sums_key, 'ws')
if open_ws and open_ws ~= ws then return {'conflict', open_ws} end
if redis.call('SISMEMBER', ranks_key, rank) == 1 then
  return {'duplicate', tostring(redis.call('SCARD', ranks_key))}
end
-- Checks are done; from here on nothing can fail.
redis.call('SADD', ranks_key, rank)
redis.call('HSET', sums_key, 'ws', ws)
local is_train = split == 'train'
for i = 7, 6 + 3 * tonumber(ARGV[6]), 3 do
  local name, loss, tokens = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local weighted = loss * tokens
  local sum = tonumber(redis.call('HGET', sums_key, 'l:' .. name) or '0') + weighted
  redis.call('HSET', sums_key, 'l:' .. name, string.format('%.17g', sum))
  redis.call('HINCRBY', sums_key, 't:' .. name, ARGV[i + 2])
  if is_train then
    local totals = p .. 'totals'
    local total = tonumber(redis.call('HGET', totals, 'l:' .. name) or '0') + weighted
    redis.call('HSET', totals, 'l:' .. name, string.format('%.17g', total))
    redis.call('HINCRBY', totals, 't:' .. name, ARGV[i + 2])
    redis.call('HINCRBY', totals, 'p:' .. name, 1)
  end
end
local count = redis.call('SCARD', ranks_key)
if count < tonumber(ws) then return {'accepted', tostring(count)} end
redis.call('DEL', ranks_key)
redis.call('HSET', p .. 'completed', id, ws)
redis.call('ZADD', p .. 'pending', step, id)
return {'completed', tostring(count), redis.call('HGETALL', sums_key)}
"""

# ARGV: prefix, which ('pending': the sorted set, by (step, split); 'evaluations': the list, in
# consumption order). Returns {id, sums-hash-as-flat-list} per aggregate.
_AGGREGATES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local p = ARGV[1]
local ids
if ARGV[2] == 'pending' then
  ids = redis.call('ZRANGE', p .. 'pending', 0, -1)
else
  ids = redis.call('LRANGE', p .. 'evaluations', 0, -1)
end
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = {id, redis.call('HGETALL', p .. 'sums:' .. id)}
end
return out
"""

# ARGV: prefix, expected_version, state, num_consumed, consumed ids..., then
# (num_probabilities, mixture body) if a mixture is published.
_COMMIT_POLICY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local p = ARGV[1]
local state_key = p .. 'state'
local current = redis.call('HGET', state_key, 'policy_version')
if current ~= ARGV[2] then return {'stale', current} end
local n = tonumber(ARGV[4])
for i = 5, 4 + n do
  if not redis.call('ZSCORE', p .. 'pending', ARGV[i]) then return {'not_pending', ARGV[i]} end
end
local publish = ARGV[5 + n] ~= nil
if publish then
  local num_configs = redis.call('HGET', state_key, 'num_configs')
  if num_configs ~= ARGV[5 + n] then return {'bad_length', num_configs} end
end
-- Checks are done; from here on nothing can fail.
-- %d, not tostring: Lua's default number format has only 14 significant digits.
local version = string.format('%d', tonumber(current) + 1)
redis.call('HSET', state_key, 'policy_version', version, 'policy_state', ARGV[3])
for i = 5, 4 + n do
  redis.call('ZREM', p .. 'pending', ARGV[i])
  if string.sub(ARGV[i], 1, 11) == 'validation:' then
    redis.call('RPUSH', p .. 'evaluations', ARGV[i])
  else
    redis.call('DEL', p .. 'sums:' .. ARGV[i])
  end
end
if not publish then return {'ok', version} end
local effective = string.format('%d', tonumber(redis.call('HGET', state_key, 'max_served')) + 1)
redis.call('RPUSH', p .. 'timeline', effective)
local mixture_version = redis.call('RPUSH', p .. 'mixtures', ARGV[6 + n]) - 1
return {'ok', version, tostring(mixture_version), effective}
"""

_TRAIN_TOTALS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HGETALL', ARGV[1] .. 'totals')
"""


class RedisRunStore:
    """Run state in Redis. Backend failures raise `StoreUnavailable`; the client reconnects by itself."""

    def __init__(self, client: redis.Redis, namespace: str = "birdie") -> None:
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError(f"namespace must be non-empty and without braces, got {namespace!r}")
        self._redis = client
        self._namespace = namespace
        self._runs_key = f"{namespace}:runs"
        self._create_run = client.register_script(_CREATE_RUN)
        self._mark_served = client.register_script(_MARK_SERVED)
        self._mixture = client.register_script(_MIXTURE)
        self._mixture_history = client.register_script(_MIXTURE_HISTORY)
        self._post_losses = client.register_script(_POST_LOSSES)
        self._aggregates = client.register_script(_AGGREGATES)
        self._commit_policy = client.register_script(_COMMIT_POLICY)
        self._train_totals = client.register_script(_TRAIN_TOTALS)

    @classmethod
    def from_url(
        cls,
        url: str,
        namespace: str = "birdie",
        timeout_s: float = 1.0,
        max_connections: int = 64,
        pool_wait_s: float = 5.0,
    ) -> RedisRunStore:
        """A store on `url` with short timeouts, so an outage surfaces in about `timeout_s`.

        A blocking pool: past `max_connections` concurrent calls wait up to `pool_wait_s` for a
        connection (redis-py's default pool fails at once instead). One immediate retry, on
        connection errors only: it reconnects a pooled connection that a Redis restart closed.
        Timeouts are not retried, since the script may already have run.
        """
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_wait_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_error=[RedisConnectionError],
        )
        return cls(redis.Redis.from_pool(pool), namespace)

    # --- helpers ---

    def _prefix(self, run: str) -> str:
        return f"{self._namespace}:run:{{{run}}}:"

    def _keys(self, run: str) -> tuple[list[str], str]:
        if not is_run_name(run):  # no such run can exist, and the name must not reach a key
            raise UnknownRun(run)
        prefix = self._prefix(run)
        return [prefix + "config"], prefix

    @contextmanager
    def _backend(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise StoreUnavailable(f"redis unavailable: {error}") from error

    async def _run_script(self, script, run: str, *args: object) -> object:
        keys, prefix = self._keys(run)
        with self._backend():
            result = await script(keys=keys, args=[prefix, *args])
        if result is None:  # the scripts return false for a missing run
            raise UnknownRun(run)
        return result

    # --- the protocol ---

    async def ping(self) -> None:
        with self._backend():
            await self._redis.ping()

    async def create_run(
        self, run: str, config: dict, initial: Sequence[float], policy_state: bytes
    ) -> None:
        check_new_run_name(run)
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        config_json = to_json("config", config)
        probabilities = check_probabilities(initial)
        body = encode_mixture_body(probabilities, None, None)
        prefix = self._prefix(run)
        with self._backend():
            created = await self._create_run(
                keys=[prefix + "config", self._runs_key],
                args=[prefix, run, config_json, len(probabilities), body, bytes(policy_state)],
            )
        if not created:
            raise RunExists(run)

    async def list_runs(self) -> list[str]:
        with self._backend():
            names = await self._redis.smembers(self._runs_key)
        return sorted(name.decode() for name in names)

    async def get_config(self, run: str) -> dict:
        keys, _ = self._keys(run)
        with self._backend():
            config_json = await self._redis.get(keys[0])
        if config_json is None:
            raise UnknownRun(run)
        return json.loads(config_json)

    async def mark_served(self, run: str, step: int, known: Timeline | None = None) -> Timeline:
        check_step(step)
        return await self._read_timeline(run, step, known)

    async def timeline(self, run: str, known: Timeline | None = None) -> Timeline:
        return await self._read_timeline(run, -1, known)

    async def _read_timeline(self, run: str, step: int, known: Timeline | None) -> Timeline:
        # Decoding costs about 4 us per entry; with step-wise policies the timeline grows every
        # step, so send only what the caller does not have yet.
        if known is not None and not isinstance(known, Timeline):
            raise ValueError(f"known must be a Timeline, got {type(known).__name__}")
        known_steps = known.effective_steps if known is not None else ()
        max_served, first, new_steps = await self._run_script(
            self._mark_served, run, step, len(known_steps)
        )
        return Timeline(
            known_steps[: int(first)] + tuple(int(e) for e in new_steps), int(max_served)
        )

    async def mixture(self, run: str, version: int | None = None) -> MixtureRecord:
        if version is None:
            requested = "latest"
        elif isinstance(version, int) and not isinstance(version, bool):
            requested = str(version)
        else:
            requested = "not-a-version"
        result = await self._run_script(self._mixture, run, requested)
        if result[0] == b"missing":
            count = int(result[1])
            raise UnknownMixtureVersion(
                f"run {run!r} has mixture versions 0..{count - 1}, not {version!r}"
            )
        return decode_mixture(int(result[1]), int(result[2]), result[3])

    async def mixture_history(self, run: str) -> list[MixtureRecord]:
        effective_steps, bodies = await self._run_script(self._mixture_history, run)
        return [
            decode_mixture(v, int(e), body)
            for v, (e, body) in enumerate(zip(effective_steps, bodies))
        ]

    async def post_losses(self, run: str, post: LossPost) -> PostOutcome:
        if not isinstance(post, LossPost):
            raise ValueError(f"post must be a LossPost, got {type(post).__name__}")
        triples: list[object] = []
        for name, loss in post.losses.items():
            triples += [name, repr(loss), post.tokens[name]]
        result = await self._run_script(
            self._post_losses, run,
            post.split, post.step, post.rank, post.world_size, len(post.losses), *triples,
        )
        kind = result[0]
        if kind == b"conflict":
            raise ConflictError(
                f"{post.split} step {post.step} has world_size {int(result[1])}, "
                f"a post said {post.world_size}"
            )
        if kind == b"duplicate":
            return PostOutcome(duplicate=True, ranks_posted=int(result[1]))
        if kind == b"accepted":
            return PostOutcome(duplicate=False, ranks_posted=int(result[1]))
        completed = _aggregate(post.split, post.step, result[2])
        return PostOutcome(duplicate=False, ranks_posted=int(result[1]), completed=completed)

    async def pending(self, run: str) -> list[Aggregate]:
        return await self._read_aggregates(run, "pending")

    async def evaluations(self, run: str) -> list[Aggregate]:
        return await self._read_aggregates(run, "evaluations")

    async def _read_aggregates(self, run: str, which: str) -> list[Aggregate]:
        aggregates = []
        for aggregate_id, flat_sums in await self._run_script(self._aggregates, run, which):
            split, step = aggregate_id.decode().split(":")
            aggregates.append(_aggregate(split, int(step), flat_sums))
        return aggregates

    async def policy_state(self, run: str) -> tuple[int, bytes]:
        _, prefix = self._keys(run)
        with self._backend():
            version, blob = await self._redis.hmget(prefix + "state", ["policy_version", "policy_state"])
        if version is None:
            raise UnknownRun(run)
        return int(version), blob

    async def commit_policy(
        self,
        run: str,
        expected_version: int,
        state: bytes,
        consumed: Sequence[tuple[str, int]],
        probabilities: Sequence[float] | None,
        meta: dict | None = None,
        created_at_step: int | None = None,
    ) -> CommitOutcome:
        check_expected_version(expected_version)
        consumed_keys = check_consumed(consumed)
        args: list[object] = [expected_version, bytes(state), len(consumed_keys)]
        args += [f"{split}:{step}" for split, step in consumed_keys]
        if probabilities is not None:
            values = check_probabilities(probabilities)
            args += [len(values), encode_mixture_body(values, created_at_step, meta)]
        result = await self._run_script(self._commit_policy, run, *args)
        kind = result[0]
        if kind == b"stale":
            return CommitOutcome(ok=False, policy_version=int(result[1]))
        if kind == b"not_pending":
            raise ConflictError(f"aggregate {result[1].decode()} of run {run!r} is not pending")
        if kind == b"bad_length":
            raise ValueError(
                f"run {run!r} has {int(result[1])} configurations, got {len(probabilities)} probabilities"
            )
        if len(result) == 2:
            return CommitOutcome(ok=True, policy_version=int(result[1]))
        return CommitOutcome(
            ok=True,
            policy_version=int(result[1]),
            mixture_version=int(result[2]),
            effective_step=int(result[3]),
        )

    @asynccontextmanager
    async def lock(
        self, run: str, name: str = "policy", ttl_s: float = 30.0, wait_s: float = 10.0
    ) -> AsyncIterator[None]:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        keys, prefix = self._keys(run)
        with self._backend():
            if not await self._redis.exists(keys[0]):
                raise UnknownRun(run)
        # SET NX PX with a random token (OwnTokenLock); release is a token-checked script.
        lock = self._redis.lock(
            f"{prefix}lock:{name}",
            timeout=ttl_s,
            sleep=LOCK_POLL_S,
            blocking_timeout=wait_s,
            thread_local=False,
            lock_class=OwnTokenLock,
        )
        with self._backend():
            acquired = await lock.acquire()
        if not acquired:
            raise LockNotAcquired(f"lock {name!r} of run {run!r} still held after {wait_s} s")
        try:
            yield
        finally:
            try:
                with self._backend():
                    await lock.release()
            except LockNotOwnedError:
                log.warning("lock %r of run %r expired before release (held > %s s)", name, run, ttl_s)
            except StoreUnavailable:
                log.warning("lock %r of run %r not released (redis unavailable); it expires in %s s", name, run, ttl_s)

    async def train_totals(self, run: str) -> dict[str, dict]:
        flat = await self._run_script(self._train_totals, run)
        loss_sums: dict[str, float] = {}
        tokens: dict[str, int] = {}
        posts: dict[str, int] = {}
        for field_name, value in zip(flat[::2], flat[1::2]):
            kind, name = field_name.decode().split(":", 1)
            if kind == "l":
                loss_sums[name] = float(value)
            elif kind == "t":
                tokens[name] = int(value)
            else:
                posts[name] = int(value)
        return totals_view(loss_sums, tokens, posts)

    async def close(self) -> None:
        await self._redis.aclose()


def _aggregate(split: str, step: int, flat_sums: list[bytes]) -> Aggregate:
    world_size = 0
    loss_sums: dict[str, float] = {}
    token_sums: dict[str, int] = {}
    for field_name, value in zip(flat_sums[::2], flat_sums[1::2]):
        key = field_name.decode()
        if key == "ws":
            world_size = int(value)
        elif key.startswith("l:"):
            loss_sums[key[2:]] = float(value)
        else:
            token_sums[key[2:]] = int(value)
    return Aggregate.from_sums(split, step, world_size, loss_sums, token_sums)
