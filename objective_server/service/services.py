"""All services of one app, started and closed together; the app keeps one and routes get it as a
dependency.

The configured runs are registered at start. With the state store unreachable then, the server
starts anyway and keeps trying in the background (with backoff): /healthz answers, /readyz says
503 until every configured run is registered, and requests that need the store answer 503 with
Retry-After, as they do in any outage. An orchestrator thus sees a live process that is not ready
yet, rather than a crash loop whose restart delays can outlast the outage.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

from objective_server.corpus.store import TokenStore
from objective_server.metrics import Metrics
from objective_server.runs import PRESET_DIR, RunConfig, load_run_configs, preset_run_files
from objective_server.service.batches import BatchService
from objective_server.service.generation import GenerationPool
from objective_server.service.losses import LossService
from objective_server.service.registry import RunContext, RunRegistry
from objective_server.service.runs import RunService
from objective_server.settings import Settings
from objective_server.store import RunStore, StoreUnavailable, open_store

log = logging.getLogger("objective_server")


def open_corpus(settings: Settings) -> TokenStore:
    if settings.corpus is not None:
        return TokenStore.open(settings.corpus)
    from objective_server.corpus.default import default_store

    return default_store()


def configured_runs(settings: Settings) -> list[RunConfig]:
    """The runs of BIRDIE_RUN_FILES and BIRDIE_PRESETS, checked for duplicate names."""
    configs: list[RunConfig] = []
    presets = preset_run_files()
    for name in settings.presets:
        if name not in presets:
            raise ValueError(f"no preset run {name!r} in {PRESET_DIR}; presets: {', '.join(presets)}")
        configs += load_run_configs(presets[name])
    for path in settings.run_files:
        configs += load_run_configs(path)
    names = [c.name for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"run(s) {', '.join(repeated)} configured more than once")
    return configs


@dataclass(eq=False)
class Services:
    settings: Settings
    store: RunStore
    corpus: TokenStore
    pool: GenerationPool
    registry: RunRegistry
    batches: BatchService
    losses: LossService
    runs: RunService
    metrics: Metrics
    # Registering the configured runs, while the store was unreachable at start (None: done).
    registering: asyncio.Task | None = field(default=None, repr=False)
    # Why that registration gave up (a run the store refuses, not an unreachable store).
    registration_error: str | None = None

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Services:
        configs = configured_runs(settings)  # fail on a bad run file before starting anything
        corpus = await asyncio.to_thread(open_corpus, settings)
        store = open_store(settings.redis_url, settings.redis_namespace, settings.redis_timeout_s)
        pool = GenerationPool(str(corpus.path), settings.generation_kind, settings.generation_workers)
        registry = RunRegistry(store, corpus, settings.max_request_tokens)
        services = cls(
            settings=settings, store=store, corpus=corpus, pool=pool, registry=registry,
            batches=BatchService(store, registry, pool, settings, metrics),
            losses=LossService(store, registry, settings, metrics),
            runs=RunService(store, registry, corpus),
            metrics=metrics,
        )
        try:
            await pool.warm_up()
            try:
                await services.register(configs)
            except StoreUnavailable as error:
                log.warning("state store unreachable at start (%s); registering the runs in the background", error)
                services.registering = asyncio.create_task(services._register_when_reachable(configs))
        except BaseException:
            await services.close()
            raise
        return services

    @property
    def ready(self) -> bool:
        """Every configured run is registered."""
        return self.registering is None or (self.registering.done() and self.registration_error is None)

    async def register(self, configs: list[RunConfig]) -> None:
        for config in configs:
            context, created = await self.registry.register(config)
            log.info("run %s", describe_run(context, created))
        await self.losses.drain_all()

    async def _register_when_reachable(self, configs: list[RunConfig]) -> None:
        delay = self.settings.retry_after_s
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                await self.register(configs)
            except StoreUnavailable as error:
                delay = min(2 * delay, 30.0)
                log.warning("state store still unreachable (%s); next try within %.0f s", error, delay)
                continue
            except Exception as error:  # what would have stopped the start: the server stays unready
                self.registration_error = f"{type(error).__name__}: {error}"
                log.exception("registering the configured runs failed; /readyz stays 503")
                return
            log.info("state store reachable: the configured runs are registered")
            return

    async def close(self) -> None:
        if self.registering is not None:
            self.registering.cancel()
        await self.batches.close()
        self.losses.close()
        self.pool.close()
        await self.store.close()


def describe_run(context: RunContext, created: bool) -> str:
    c = context.config
    return (
        f"{c.name} ({'created' if created else 'exists, same config'}): {len(c.arms)} objective "
        f"configurations, policy {c.policy.name}, batches of {c.batch_size} x {c.seq_len}, seed {c.seed}, "
        f"{c.validation_batches} validation batch(es) per configuration, evaluations at "
        f"{c.evaluation_steps[:6]}{'...' if len(c.evaluation_steps) > 6 else ''}"
    )
