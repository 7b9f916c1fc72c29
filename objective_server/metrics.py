"""Prometheus metrics of one app: batches and tokens served, latencies, cache, loss posts, policy.

Each app owns its metrics in its own registry (no module globals), so several apps can live in one
process (tests). With several uvicorn workers, prometheus-client's multiprocess mode is used: every
worker writes its values to files in $PROMETHEUS_MULTIPROC_DIR (the `serve` command creates that
folder) and /metrics reads them all, so a scrape sees the whole server, not one worker.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """The server's metrics; `exposition()` renders them for /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.batches = Counter(
            "birdie_batches_served", "Batches served", ["run", "split", "format"], registry=r
        )
        self.tokens = Counter(
            "birdie_tokens_served", "Batch positions (batch_size * seq_len) served", ["run", "split"], registry=r
        )
        self.batch_latency = Histogram(
            "birdie_batch_seconds", "Time to answer /batch", ["format"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.generation_latency = Histogram(
            "birdie_generation_seconds", "Time to generate one batch in the pool", ["split"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.cache = Counter(
            "birdie_batch_cache", "Batch cache lookups by outcome (hit, miss)", ["outcome"], registry=r
        )
        self.prefetched = Counter(
            "birdie_batches_prefetched", "Batches generated ahead of their request", registry=r
        )
        self.stale_serves = Counter(
            "birdie_batches_from_cached_timeline",
            "Batches served from the cached timeline while the store was unreachable", registry=r,
        )
        self.loss_posts = Counter(
            "birdie_loss_posts", "Loss posts by outcome (accepted, duplicate)", ["run", "split", "status"], registry=r
        )
        self.policy_updates = Counter(
            "birdie_policy_updates", "Completed observations the policy consumed", ["run", "split"], registry=r
        )
        self.policy_failures = Counter(
            "birdie_policy_failures", "Completed observations the policy failed on (consumed, state unchanged)",
            ["run", "split"], registry=r,
        )
        self.policy_latency = Histogram(
            "birdie_policy_update_seconds", "Time of one policy update", ["run"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.mixture_publishes = Counter(
            "birdie_mixtures_published", "New mixtures published by policies", ["run"], registry=r
        )
        self.store_errors = Counter(
            "birdie_store_unavailable", "Requests answered 503 because the state store was unreachable",
            ["route"], registry=r,
        )
        self.mixture = Gauge(
            "birdie_mixture_probability", "Probability of each objective configuration in the latest mixture",
            ["run", "objective"], registry=r, multiprocess_mode="mostrecent",
        )
        self._shown: dict[str, int] = {}  # run -> the mixture version its gauges show

    def shown_mixture(self, run: str) -> int:
        """The mixture version the run's birdie_mixture_probability gauges show here (-1: none)."""
        return self._shown.get(run, -1)

    def show_mixture(self, run: str, names, version: int, probabilities) -> None:
        """Set the run's mixture gauges to `version`, unless they show a newer one. Every process that
        learns a run's latest mixture sets them, so a restarted server or another replica shows it
        too, not only the process that published it."""
        if version <= self.shown_mixture(run):
            return
        self._shown[run] = version
        for name, p in zip(names, probabilities):
            self.mixture.labels(run, name).set(p)

    def exposition(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=directory)
        return generate_latest(merged)
