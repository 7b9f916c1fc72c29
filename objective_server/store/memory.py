"""`MemoryRunStore`: the run-state store inside one process (no Redis configured).

Each operation checks everything first and then mutates under one lock, with no await in between,
so it is atomic like the Redis scripts and never half-applies. Values are kept as canonical JSON
(as Redis keeps them), so both stores hand back the same shapes and callers cannot alias state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from objective_server.store.protocol import (
    Aggregate,
    CommitOutcome,
    ConflictError,
    LockNotAcquired,
    LossPost,
    MixtureRecord,
    PostOutcome,
    RunExists,
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
    to_json,
    totals_view,
)

log = logging.getLogger(__name__)

LOCK_POLL_S = 0.005


@dataclass
class _Sums:
    world_size: int
    loss_sums: dict[str, float] = field(default_factory=dict)
    token_sums: dict[str, int] = field(default_factory=dict)


@dataclass
class _RunState:
    config_json: str
    num_configs: int
    mixture_bodies: list[str]  # index = version
    effective_steps: list[int]  # index = version
    policy_state: bytes
    policy_version: int = 0
    max_served: int = -1
    ranks: dict[tuple[str, int], set[int]] = field(default_factory=dict)  # incomplete aggregates
    sums: dict[tuple[str, int], _Sums] = field(default_factory=dict)  # incomplete + pending
    completed: dict[tuple[str, int], int] = field(default_factory=dict)  # -> world_size, forever
    pending: set[tuple[str, int]] = field(default_factory=set)
    evaluations: list[tuple[str, int]] = field(default_factory=list)  # consumed validation aggregates
    train_loss_sums: dict[str, float] = field(default_factory=dict)
    train_tokens: dict[str, int] = field(default_factory=dict)
    train_posts: dict[str, int] = field(default_factory=dict)

    def timeline(self) -> Timeline:
        return Timeline(tuple(self.effective_steps), self.max_served)


class MemoryRunStore:
    """Run state in this process's memory; lost when the process exits."""

    def __init__(self) -> None:
        self._runs: dict[str, _RunState] = {}
        # A thread lock, not an asyncio one: critical sections never await, and it stays correct
        # across event loops and threads.
        self._mutex = threading.Lock()
        self._locks: dict[tuple[str, str], tuple[str, float]] = {}  # -> (token, expires_at)

    def _run(self, run: str) -> _RunState:
        state = self._runs.get(run)
        if state is None:
            raise UnknownRun(run)
        return state

    async def ping(self) -> None:
        return None

    async def create_run(
        self, run: str, config: dict, initial: Sequence[float], policy_state: bytes
    ) -> None:
        check_new_run_name(run)
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        config_json = to_json("config", config)
        probabilities = check_probabilities(initial)
        body = encode_mixture_body(probabilities, None, None)
        state = _RunState(
            config_json=config_json,
            num_configs=len(probabilities),
            mixture_bodies=[body],
            effective_steps=[0],
            policy_state=bytes(policy_state),
        )
        with self._mutex:
            if run in self._runs:
                raise RunExists(run)
            self._runs[run] = state

    async def list_runs(self) -> list[str]:
        with self._mutex:
            return sorted(self._runs)

    async def get_config(self, run: str) -> dict:
        with self._mutex:
            return json.loads(self._run(run).config_json)

    async def mark_served(self, run: str, step: int, known: Timeline | None = None) -> Timeline:
        # `known` saves nothing in memory: the whole timeline is already here.
        check_step(step)
        with self._mutex:
            state = self._run(run)
            state.max_served = max(state.max_served, step)
            return state.timeline()

    async def timeline(self, run: str, known: Timeline | None = None) -> Timeline:
        with self._mutex:
            return self._run(run).timeline()

    async def mixture(self, run: str, version: int | None = None) -> MixtureRecord:
        with self._mutex:
            state = self._run(run)
            count = len(state.mixture_bodies)
            index = count - 1 if version is None else version
            if isinstance(index, bool) or not (isinstance(index, int) and 0 <= index < count):
                raise UnknownMixtureVersion(
                    f"run {run!r} has mixture versions 0..{count - 1}, not {version!r}"
                )
            return decode_mixture(index, state.effective_steps[index], state.mixture_bodies[index])

    async def mixture_history(self, run: str) -> list[MixtureRecord]:
        with self._mutex:
            state = self._run(run)
            return [
                decode_mixture(v, e, body)
                for v, (e, body) in enumerate(zip(state.effective_steps, state.mixture_bodies))
            ]

    async def post_losses(self, run: str, post: LossPost) -> PostOutcome:
        if not isinstance(post, LossPost):
            raise ValueError(f"post must be a LossPost, got {type(post).__name__}")
        key = post.key
        with self._mutex:
            state = self._run(run)
            done_world_size = state.completed.get(key)
            if done_world_size is not None:
                _check_world_size(key, done_world_size, post.world_size)
                return PostOutcome(duplicate=True, ranks_posted=done_world_size)
            sums = state.sums.get(key)
            if sums is not None:
                _check_world_size(key, sums.world_size, post.world_size)
            ranks = state.ranks.setdefault(key, set())
            if post.rank in ranks:
                return PostOutcome(duplicate=True, ranks_posted=len(ranks))
            # Checks are done; from here on nothing can fail.
            ranks.add(post.rank)
            if sums is None:
                sums = state.sums[key] = _Sums(post.world_size)
            for name, loss in post.losses.items():
                tokens = post.tokens[name]
                sums.loss_sums[name] = sums.loss_sums.get(name, 0.0) + loss * tokens
                sums.token_sums[name] = sums.token_sums.get(name, 0) + tokens
                if post.split == "train":
                    state.train_loss_sums[name] = state.train_loss_sums.get(name, 0.0) + loss * tokens
                    state.train_tokens[name] = state.train_tokens.get(name, 0) + tokens
                    state.train_posts[name] = state.train_posts.get(name, 0) + 1
            count = len(ranks)
            if count < post.world_size:
                return PostOutcome(duplicate=False, ranks_posted=count)
            del state.ranks[key]  # completed: the world_size alone now answers duplicates
            state.completed[key] = post.world_size
            state.pending.add(key)
            completed = Aggregate.from_sums(*key, post.world_size, sums.loss_sums, sums.token_sums)
            return PostOutcome(duplicate=False, ranks_posted=count, completed=completed)

    async def pending(self, run: str) -> list[Aggregate]:
        with self._mutex:
            state = self._run(run)
            return _aggregates(state, sorted(state.pending, key=lambda k: (k[1], k[0])))

    async def evaluations(self, run: str) -> list[Aggregate]:
        with self._mutex:
            state = self._run(run)
            return _aggregates(state, state.evaluations)

    async def policy_state(self, run: str) -> tuple[int, bytes]:
        with self._mutex:
            state = self._run(run)
            return state.policy_version, state.policy_state

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
        body = None
        if probabilities is not None:
            body = encode_mixture_body(check_probabilities(probabilities), created_at_step, meta)
        new_state = bytes(state)
        with self._mutex:
            run_state = self._run(run)
            if run_state.policy_version != expected_version:
                return CommitOutcome(ok=False, policy_version=run_state.policy_version)
            missing = [key for key in consumed_keys if key not in run_state.pending]
            if missing:
                raise ConflictError(f"aggregates {missing} of run {run!r} are not pending")
            if probabilities is not None and len(probabilities) != run_state.num_configs:
                raise ValueError(
                    f"run {run!r} has {run_state.num_configs} configurations, "
                    f"got {len(probabilities)} probabilities"
                )
            run_state.policy_version += 1
            run_state.policy_state = new_state
            for key in consumed_keys:
                run_state.pending.discard(key)
                if key[0] == "validation":  # kept (its sums too) for /mixture/history
                    run_state.evaluations.append(key)
                else:
                    del run_state.sums[key]
            if body is None:
                return CommitOutcome(ok=True, policy_version=run_state.policy_version)
            effective_step = run_state.max_served + 1
            run_state.mixture_bodies.append(body)
            run_state.effective_steps.append(effective_step)
            return CommitOutcome(
                ok=True,
                policy_version=run_state.policy_version,
                mixture_version=len(run_state.mixture_bodies) - 1,
                effective_step=effective_step,
            )

    @asynccontextmanager
    async def lock(
        self, run: str, name: str = "policy", ttl_s: float = 30.0, wait_s: float = 10.0
    ) -> AsyncIterator[None]:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        with self._mutex:
            self._run(run)
        key = (run, name)
        token = uuid.uuid4().hex
        give_up_at = time.monotonic() + wait_s
        while True:
            with self._mutex:
                now = time.monotonic()
                holder = self._locks.get(key)
                if holder is None or holder[1] <= now:  # free, or its holder's time ran out
                    self._locks[key] = (token, now + ttl_s)
                    break
            if time.monotonic() + LOCK_POLL_S > give_up_at:
                raise LockNotAcquired(f"lock {name!r} of run {run!r} still held after {wait_s} s")
            await asyncio.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            with self._mutex:
                holder = self._locks.get(key)
                if holder is not None and holder[0] == token:
                    del self._locks[key]
                else:
                    log.warning("lock %r of run %r expired before release (held > %s s)", name, run, ttl_s)

    async def train_totals(self, run: str) -> dict[str, dict]:
        with self._mutex:
            state = self._run(run)
            return totals_view(state.train_loss_sums, state.train_tokens, state.train_posts)

    async def close(self) -> None:
        return None


def _check_world_size(key: tuple[str, int], recorded: int, posted: int) -> None:
    if recorded != posted:
        raise ConflictError(
            f"{key[0]} step {key[1]} has world_size {recorded}, a post said {posted}"
        )


def _aggregates(state: _RunState, keys: Iterable[tuple[str, int]]) -> list[Aggregate]:
    """The aggregates of `keys` (each still has its sums), in that order."""
    return [
        Aggregate.from_sums(split, step, state.sums[(split, step)].world_size,
                            state.sums[(split, step)].loss_sums, state.sums[(split, step)].token_sums)
        for split, step in keys
    ]
