"""Loss posts and the policy updates they trigger.

A post is checked completely before the store sees it (known run, every configuration name in the
run, finite non-negative losses, token counts, rank < world_size, a step the run has trained: a
training post for a served step, an evaluation after at most max_served + 1 steps), so a rejected
post changes nothing. The store counts each (run, split, step, rank) once; the post that completes a (split,
step) across all ranks gets the aggregate, which joins the run's pending queue.

Draining the queue is the policy update: under the run's store lock, read the policy state and
its version, fold the next pending observation into it (in a thread: a policy may take seconds),
and commit with compare-and-set on the version, consuming exactly those aggregates. An observation
the policy fails on (a policy is a pure function of its state and the observation, so it would fail
again) is consumed with the state unchanged, logged and counted in birdie_policy_failures_total:
one bad evaluation must not hold back every later one. Drains run when
a post completes an observation the policy wants, and also on later requests (throttled), so an
aggregate left pending by a crash between completion and commit is picked up by the next request
to any worker or replica: nothing is lost, and the CAS makes sure nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from clients.models import LossPostBody, LossPostResponse
from objective_server.metrics import Metrics
from objective_server.policies import Decision
from objective_server.service.errors import InvalidRequest, UnknownObjective
from objective_server.service.registry import RunContext, RunRegistry
from objective_server.settings import Settings
from objective_server.store import (
    MAX_TOKENS,
    Aggregate,
    ConflictError,
    LockNotAcquired,
    LossPost,
    RunStore,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

# A mean cross-entropy above this is not a loss but a bug (or an attack on the sums).
MAX_LOSS = 1e6
# How long a housekeeping drain tries for the run's lock before leaving the work to its holder.
NO_WAIT_S = 0.01


@dataclass(frozen=True)
class DrainResult:
    mixture_version: int | None = None  # the last mixture it published, if any
    lock_busy: bool = False  # another drain held the lock for longer than we waited


class LossService:
    def __init__(self, store: RunStore, registry: RunRegistry, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        # Policy updates run here, one at a time per process, never on the event loop.
        self._policy_executor = ThreadPoolExecutor(1, thread_name_prefix="birdie-policy")

    # --- posting ---------------------------------------------------------------------------------

    def check(self, context: RunContext, body: LossPostBody) -> LossPost:
        """The store's LossPost for `body`, or InvalidRequest saying what is wrong with it."""
        s = self.settings
        if not 1 <= body.world_size <= s.max_world_size:
            raise InvalidRequest(f"world_size must be in [1, {s.max_world_size}], got {body.world_size}")
        if not 0 <= body.rank < body.world_size:
            raise InvalidRequest(f"rank must be in [0, world_size = {body.world_size}), got {body.rank}")
        if body.step > s.max_step:
            raise InvalidRequest(f"step must be in [0, {s.max_step}], got {body.step}")
        if not body.losses:
            raise InvalidRequest("losses must name at least one objective configuration")
        unknown = sorted((set(body.losses) | set(body.tokens)) - set(context.objective_ids))
        if unknown:
            raise UnknownObjective(
                f"run {context.name!r} has no objective configuration(s) {', '.join(map(repr, unknown))}"
            )
        if set(body.losses) != set(body.tokens):
            raise InvalidRequest(
                f"losses and tokens must name the same configurations; only in losses: "
                f"{sorted(set(body.losses) - set(body.tokens))}, only in tokens: "
                f"{sorted(set(body.tokens) - set(body.losses))}"
            )
        for name, loss in body.losses.items():
            if not (math.isfinite(loss) and 0 <= loss <= MAX_LOSS):
                raise InvalidRequest(f"loss of {name!r} must be a finite mean loss in [0, {MAX_LOSS:g}], got {loss!r}")
        for name, count in body.tokens.items():
            if not 0 <= count <= MAX_TOKENS:
                raise InvalidRequest(f"tokens of {name!r} must be in [0, {MAX_TOKENS}], got {count}")
        try:
            return LossPost(
                step=body.step, rank=body.rank, world_size=body.world_size, split=body.split,
                losses=body.losses, tokens=body.tokens,
            )
        except ValueError as error:
            raise InvalidRequest(str(error)) from None

    async def _check_trained(self, context: RunContext, post: LossPost) -> None:
        """InvalidRequest unless the run has trained `post.step`: a training post needs the step served,
        an evaluation after `step` training steps needs step - 1 served. A typo'd step would otherwise
        enter the policy's history (and put every real evaluation before it into its past)."""
        validation = post.split == "validation"

        def limit(timeline) -> int:
            return timeline.max_served + (1 if validation else 0)

        if context.timeline is not None and post.step <= limit(context.timeline):
            return  # max_served only grows: a cached pass stays true
        context.remember(await self.store.timeline(context.name, known=context.timeline))
        if post.step > limit(context.timeline):
            raise InvalidRequest(
                f"run {context.name!r} has not trained that far: it has served training batches up to step "
                f"{context.timeline.max_served}, so a {post.split} post may name a step up to "
                f"{limit(context.timeline)}, got {post.step}"
            )

    async def post(self, body: LossPostBody) -> LossPostResponse:
        context = await self.registry.get(body.run)
        post = self.check(context, body)
        await self._check_trained(context, post)
        outcome = await self.store.post_losses(context.name, post)
        status = "duplicate" if outcome.duplicate else "accepted"
        self.metrics.loss_posts.labels(context.name, post.split, status).inc()
        response = LossPostResponse(
            status=status, ranks_posted=outcome.ranks_posted, world_size=post.world_size,
            completed=outcome.completed is not None,
        )
        completed = outcome.completed
        observed = post.split in context.policy.observes
        # A repeated post of the last rank may be the retry of one that completed the observation
        # and lost its answer: drain as the completing post would have.
        wanted = observed and (completed is not None or (outcome.duplicate and outcome.ranks_posted >= post.world_size))
        if not (wanted or self._drain_due(context)):
            return response
        try:
            # Only the post that completes an observation the policy wants waits for the update;
            # housekeeping drains give way to a drain already running anywhere.
            result = await self.drain(context, wait=wanted)
        except (StoreUnavailable, LockNotAcquired) as error:
            # The post itself is counted; its aggregate stays pending for the next drain.
            log.warning("run %s: policy update postponed: %s", context.name, error)
            return response
        except Exception:
            log.exception("run %s: policy update failed; its observations stay pending", context.name)
            return response
        if completed is not None and observed:
            # A drain that ran to the end consumed everything pending when it started, ours included
            # (by this drain or by one just before it, in this process or another).
            if result.lock_busy:
                pass  # still pending: policy_updated stays false
            elif completed.key in context.outcomes:
                response.policy_note = context.outcomes[completed.key]
                response.policy_updated = response.policy_note is None
            else:
                response.policy_updated = True
                response.policy_note = "taken by another server process's update; its log and metrics say how it went"
            response.mixture_version = result.mixture_version
            if response.mixture_version is None:
                response.mixture_version = await self._latest_version(context)
        return response

    async def _latest_version(self, context: RunContext) -> int | None:
        try:
            timeline = await self.store.timeline(context.name, known=context.timeline)
        except StoreUnavailable:
            return None
        context.remember(timeline)
        return timeline.latest_version

    def _drain_due(self, context: RunContext) -> bool:
        return time.monotonic() - context.last_drain_check >= self.settings.drain_interval_s

    # --- draining: the policy update -------------------------------------------------------------

    async def drain(self, context: RunContext, wait: bool = True) -> DrainResult:
        """Consume every pending aggregate of the run, in step order, committing each update with CAS.

        `wait=False`: return at once (lock_busy) if another drain holds the run, in this process or
        in another worker or replica, instead of waiting for it (a policy update may take seconds).
        """
        if not wait and context.drain_lock.locked():
            return DrainResult(lock_busy=True)
        async with context.drain_lock:
            context.last_drain_check = time.monotonic()
            if not await self.store.pending(context.name):
                return DrainResult()
            try:
                async with self.store.lock(
                    context.name, "policy", ttl_s=self.settings.policy_lock_ttl_s,
                    wait_s=self.settings.policy_lock_wait_s if wait else NO_WAIT_S,
                ):
                    return await self._drain_locked(context)
            except LockNotAcquired:
                return DrainResult(lock_busy=True)

    async def _drain_locked(self, context: RunContext) -> DrainResult:
        policy = context.policy
        mixture_version = None
        conflicts = 0
        while True:
            pending = await self.store.pending(context.name)
            if not pending:
                return DrainResult(mixture_version=mixture_version)
            # Observations the policy does not want are consumed along with the next one it does.
            batch: list[Aggregate] = []
            for aggregate in pending:
                batch.append(aggregate)
                if aggregate.split in policy.observes:
                    break
            observation = batch[-1] if batch[-1].split in policy.observes else None
            version, state = await self.store.policy_state(context.name)
            decision, probabilities, failure = Decision(state=state), None, None
            if observation is not None:
                try:
                    decision = await self._update(context, state, observation)
                    if decision.probabilities is not None:
                        probabilities = _normalised(decision.probabilities)
                except Exception as error:  # noqa: BLE001 - any policy failure: consume, keep the state
                    decision, probabilities = Decision(state=state), None
                    failure = f"the policy failed on it: {type(error).__name__}: {error}"
                    log.exception(
                        "run %s: the policy failed on the %s losses of step %d; consumed with the policy state "
                        "unchanged", context.name, observation.split, observation.step,
                    )
            try:
                outcome = await self.store.commit_policy(
                    context.name, version, decision.state, [a.key for a in batch], probabilities,
                    meta=decision.meta or None,
                    created_at_step=observation.step if observation is not None else None,
                )
            except ConflictError:
                outcome = None  # an aggregate was consumed meanwhile (our lock had expired): re-read
            if outcome is None or not outcome.ok:
                conflicts += 1
                if conflicts > 10:
                    raise LockNotAcquired(f"run {context.name!r}: policy state kept changing under the lock")
                continue
            if failure is not None:
                context.record_outcome(observation.key, failure)
                self.metrics.policy_failures.labels(context.name, observation.split).inc()
            elif observation is not None:
                ignored = decision.meta.get("ignored")
                context.record_outcome(observation.key, f"the policy ignored it: {ignored}" if ignored else None)
                self.metrics.policy_updates.labels(context.name, observation.split).inc()
            if outcome.mixture_version is not None:
                mixture_version = outcome.mixture_version
                context.mixtures[outcome.mixture_version] = probabilities
                self.metrics.mixture_publishes.labels(context.name).inc()
                self.metrics.show_mixture(context.name, context.names, outcome.mixture_version, probabilities)
                log.info(
                    "run %s: mixture version %d effective from step %d (after the %s losses of step %d)",
                    context.name, outcome.mixture_version, outcome.effective_step, observation.split, observation.step,
                )

    async def _update(self, context: RunContext, state: bytes, observation: Aggregate) -> Decision:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        decision = await loop.run_in_executor(self._policy_executor, context.policy.update, state, observation)
        self.metrics.policy_latency.labels(context.name).observe(time.perf_counter() - started)
        return decision

    async def drain_all(self) -> None:
        """Drain every run this process knows (at start: pick up what a crash left pending)."""
        for context in self.registry.local():
            try:
                await self.drain(context)
            except (StoreUnavailable, LockNotAcquired) as error:
                log.warning("run %s: pending policy updates postponed: %s", context.name, error)

    def close(self) -> None:
        self._policy_executor.shutdown(wait=True)


def _normalised(probabilities: list[float]) -> list[float]:
    total = math.fsum(probabilities)
    if not (math.isfinite(total) and total > 0) or any(not math.isfinite(p) or p < 0 for p in probabilities):
        raise ValueError(f"a policy proposed an invalid mixture: {probabilities!r}")
    return [p / total for p in probabilities]
