"""All services of one app, started and closed together; the app keeps one and routes get it as a
dependency."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from objective_server.corpus.store import TokenStore
from objective_server.metrics import Metrics
from objective_server.runs import PRESET_DIR, RunConfig, load_run_configs, preset_run_files
from objective_server.service.batches import BatchService
from objective_server.service.generation import GenerationPool
from objective_server.service.losses import LossService
from objective_server.service.registry import RunContext, RunRegistry
from objective_server.service.runs import RunService
from objective_server.settings import Settings
from objective_server.store import RunStore, open_store

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
            for config in configs:
                context, created = await registry.register(config)
                log.info("run %s", describe_run(context, created))
            await services.losses.drain_all()
        except BaseException:
            await services.close()
            raise
        return services

    async def close(self) -> None:
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
