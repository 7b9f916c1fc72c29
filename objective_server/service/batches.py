"""Serving batches: address -> mixture (via the timeline) -> generated batch -> wire bytes.

A training request marks its step served and reads the timeline in one atomic store call, so the
mixture it uses can never change afterwards (a later mixture is effective from max_served + 1).
The batch is then a pure function of (run config, mixture, address): it is generated in the pool,
kept in an LRU, and the next `prefetch_depth` steps of the same rank are generated ahead.

A preview (`/batch?preview=1`, what people and the CLI use to look at a run) reads the timeline
without marking the step served: looking ahead at step 9000 must not push every later mixture past
it. A previewed step beyond max_served is provisional: a mixture published before a trainer asks
for it changes it.

With the store unreachable, an address at or below the cached timeline's max_served still maps to
its one mixture, so it is served from the cache (or regenerated); a newer address cannot be, since
its mixture may not be decided yet: StoreUnavailable (503).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from dataclasses import dataclass, field
from typing import Literal

from clients.wire import ARROW_MEDIA_TYPE, JSON_MEDIA_TYPE
from objective_server.metrics import Metrics
from objective_server.service.cache import TaskCache
from objective_server.service.errors import InvalidRequest, RequestTooLarge, UnknownObjective
from objective_server.service.generation import GenerationPool, held_out_batch, render_json, train_batch
from objective_server.service.registry import RunContext, RunRegistry
from objective_server.settings import Settings
from objective_server.store import RunStore, StoreUnavailable, Timeline

log = logging.getLogger(__name__)

WireFormat = Literal["arrow", "json"]


@dataclass(frozen=True, eq=False)
class ServedBatch:
    """A generated batch: its Arrow IPC bytes (arrays and header), and what the route reports."""

    arrow: bytes = field(repr=False)
    mixture_version: int | None
    positions: int  # batch_size * seq_len


class BatchService:
    def __init__(
        self, store: RunStore, registry: RunRegistry, pool: GenerationPool, settings: Settings, metrics: Metrics
    ) -> None:
        self.store = store
        self.registry = registry
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.cache: TaskCache[ServedBatch] = TaskCache(settings.cache_size)
        # Prefetch tasks are kept referenced until done (the event loop holds only weak references).
        self._background: set[asyncio.Task] = set()

    # --- addresses -------------------------------------------------------------------------------

    def _check_size(self, context: RunContext) -> None:
        if context.config.tokens_per_step > self.settings.max_request_tokens:
            raise RequestTooLarge(
                f"run {context.name!r} has batches of {context.config.tokens_per_step} tokens, above this "
                f"server's limit of {self.settings.max_request_tokens} (BIRDIE_MAX_REQUEST_TOKENS)"
            )

    def _check_address(self, rank: int, world_size: int, step: int) -> None:
        s = self.settings
        if not 1 <= world_size <= s.max_world_size:
            raise InvalidRequest(f"world_size must be in [1, {s.max_world_size}], got {world_size}")
        if not 0 <= rank < world_size:
            raise InvalidRequest(f"rank must be in [0, world_size = {world_size}), got {rank}")
        if not 0 <= step <= s.max_step:
            raise InvalidRequest(f"step must be in [0, {s.max_step}], got {step}")

    # --- training batches ------------------------------------------------------------------------

    async def train(self, run: str, rank: int, world_size: int, step: int) -> ServedBatch:
        self._check_address(rank, world_size, step)
        context = await self.registry.get(run)
        self._check_size(context)
        timeline = await self._mark_served(context, step)
        served = await self._train_at(context, timeline, rank, world_size, step, prefetch=False)
        self._prefetch_train(context, timeline, rank, world_size, step)
        return served

    async def preview_train(self, run: str, rank: int, world_size: int, step: int) -> tuple[ServedBatch, bool]:
        """The training batch at the address as it would be served now, without marking the step
        served, and whether it is provisional (beyond the highest step served)."""
        self._check_address(rank, world_size, step)
        context = await self.registry.get(run)
        self._check_size(context)
        try:
            context.remember(await self.store.timeline(context.name, known=context.timeline))
        except StoreUnavailable:
            if context.timeline is None or step > context.timeline.max_served:
                raise
        timeline = context.timeline
        served = await self._train_at(context, timeline, rank, world_size, step, prefetch=False)
        return served, step > timeline.max_served

    async def _mark_served(self, context: RunContext, step: int) -> Timeline:
        try:
            timeline = await self.store.mark_served(context.name, step, known=context.timeline)
        except StoreUnavailable:
            cached = context.timeline
            if cached is None or step > cached.max_served:
                raise
            # Final: any mixture published after this timeline is effective past its max_served.
            self.metrics.stale_serves.inc()
            return cached
        context.remember(timeline)
        await self._learn_mixtures(context, timeline)
        return timeline

    async def _learn_mixtures(self, context: RunContext, timeline: Timeline) -> None:
        """Keep every mixture of `timeline` in this process (a mixture never changes): in an outage,
        any address the cached timeline covers can then be served, not only those whose mixture this
        process happened to use before."""
        missing = [version for version in range(timeline.latest_version + 1) if version not in context.mixtures]
        try:
            for version in missing:  # on the request path: usually none, and then no await at all
                await self._probabilities(context, version)
        except StoreUnavailable:
            pass  # the request's own mixture is fetched (or found missing) when it is generated

    async def _train_at(
        self, context: RunContext, timeline: Timeline, rank: int, world_size: int, step: int, prefetch: bool
    ) -> ServedBatch:
        version = timeline.version_at(step)
        key = _train_key(context, rank, world_size, step, version)

        if version == timeline.latest_version and version > self.metrics.shown_mixture(context.name):
            try:
                probabilities = await self._probabilities(context, version)
                self.metrics.show_mixture(context.name, context.names, version, probabilities)
            except StoreUnavailable:
                pass  # the gauges can wait; a cached batch must still be served in an outage

        async def generate() -> ServedBatch:
            probabilities = await self._probabilities(context, version)
            header = {
                "run": context.name, "split": "train", "step": step, "rank": rank, "world_size": world_size,
                "mixture_version": version, "objectives": context.names,
            }
            arrow, seconds = await self.pool.run(
                train_batch, self.pool.corpus_path, context.config_json, probabilities, header, rank, world_size, step
            )
            self.metrics.generation_latency.labels("train").observe(seconds)
            return ServedBatch(arrow, version, context.config.tokens_per_step)

        task, hit = self.cache.get_or_start(key, generate)
        if prefetch:
            if not hit:
                self.metrics.prefetched.inc()
        else:
            self.metrics.cache.labels("hit" if hit else "miss").inc()
        return await asyncio.shield(task)

    async def _probabilities(self, context: RunContext, version: int) -> list[float]:
        probabilities = context.mixtures.get(version)
        if probabilities is None:
            record = await self.store.mixture(context.name, version)
            probabilities = context.mixtures.setdefault(version, record.probabilities)
        return probabilities

    def _prefetch_train(self, context: RunContext, timeline: Timeline, rank: int, world_size: int, step: int) -> None:
        # The next steps' mixture is the latest one unless a policy publishes first; then the
        # prefetched batch is simply not used (its key carries the mixture version).
        for ahead in range(1, self.settings.prefetch_depth + 1):
            if self.pool.busy or step + ahead > self.settings.max_step:
                return
            ahead_step = step + ahead
            if _train_key(context, rank, world_size, ahead_step, timeline.version_at(ahead_step)) not in self.cache:
                self._spawn(self._train_at(context, timeline, rank, world_size, ahead_step, prefetch=True))

    # --- validation batches ----------------------------------------------------------------------

    async def validation(self, run: str, objective: str | None, index: int) -> ServedBatch:
        context = await self.registry.get(run)
        self._check_size(context)
        if objective is None:
            raise InvalidRequest("split=validation needs objective=NAME (one of the run's configurations)")
        objective_id = self._objective_id(context, objective)
        self._check_index(context, index)
        served = await self._validation_at(context, objective_id, index, prefetch=False)
        # An evaluation walks every configuration's batches in order: make the next one ready.
        following = (objective_id, index + 1) if index + 1 < context.config.validation_batches else (objective_id + 1, 0)
        if following[0] < len(context.names) and not self.pool.busy:
            self._spawn(self._validation_at(context, *following, prefetch=True))
        return served

    def _objective_id(self, context: RunContext, objective: str) -> int:
        objective_id = context.objective_ids.get(objective)
        if objective_id is None:
            close = difflib.get_close_matches(objective, context.names, n=3, cutoff=0.6)
            listed = (f"; it has {len(context.names)}: {', '.join(context.names)}" if len(context.names) <= 8 else
                      f"; it has {len(context.names)} (GET /objectives?run={context.name} lists them)")
            raise UnknownObjective(
                f"run {context.name!r} has no objective configuration {objective!r}"
                + (f"; did you mean {' or '.join(close)}?" if close else "") + listed
            )
        return objective_id

    def _check_index(self, context: RunContext, index: int) -> None:
        count = context.config.validation_batches
        if not 0 <= index < count:
            raise InvalidRequest(f"run {context.name!r} has validation batches 0..{count - 1}, not {index}")

    async def _validation_at(self, context: RunContext, objective_id: int, index: int, prefetch: bool) -> ServedBatch:
        key = (context.fingerprint, "validation", objective_id, index)

        async def generate() -> ServedBatch:
            header = {
                "run": context.name, "split": "validation", "objective": context.names[objective_id],
                "index": index, "step": None, "rank": None, "world_size": None, "mixture_version": None,
                "objectives": context.names,
            }
            arrow, seconds = await self.pool.run(
                held_out_batch, self.pool.corpus_path, context.config_json, header, objective_id, index
            )
            self.metrics.generation_latency.labels("validation").observe(seconds)
            return ServedBatch(arrow, None, context.config.tokens_per_step)

        task, hit = self.cache.get_or_start(key, generate)
        if not prefetch:
            self.metrics.cache.labels("hit" if hit else "miss").inc()
        return await asyncio.shield(task)

    # --- encoding --------------------------------------------------------------------------------

    async def encode(self, served: ServedBatch, wire_format: WireFormat, decode: bool) -> tuple[bytes, str]:
        """(body, media type) of a served batch."""
        if wire_format == "arrow":
            return served.arrow, ARROW_MEDIA_TYPE
        body = await self.pool.run(render_json, self.pool.corpus_path, served.arrow, decode)
        return body, JSON_MEDIA_TYPE

    # --- housekeeping ----------------------------------------------------------------------------

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("prefetch failed: %r", task.exception())

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.cache.clear()


def _train_key(context: RunContext, rank: int, world_size: int, step: int, version: int) -> tuple:
    """A training batch is a function of the run's config, its address and the mixture version."""
    return (context.fingerprint, "train", rank, world_size, step, version)
