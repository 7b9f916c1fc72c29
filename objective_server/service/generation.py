"""Batch generation off the event loop: a pool of worker processes (or threads).

Generating a batch is CPU-bound Python and numpy that holds the GIL most of the time, so on the
event loop (or in a thread) it would stall every other request. The default pool is therefore one
of worker processes. What crosses into a worker is small and picklable: the corpus path, the run's
config as canonical JSON, the mixture and the address. Each worker opens the corpus (memory-mapped)
and parses a run config once and keeps them, keyed by those values; the result is a pure function
of the arguments, so any worker, process or replica produces the same bytes. Batches come back
already encoded as Arrow: one bytes object is cheaper to return than six arrays, and the server
process then only sends it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from typing import Any, Literal, TypeVar

import orjson

from clients.wire import decode_arrow, encode_arrow, encode_json
from objective_server.batching import generate_batch, validation_batch
from objective_server.corpus.store import TokenStore
from objective_server.inspection import decoded_examples
from objective_server.packing import Batch
from objective_server.runs import RunConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# Worker-side memo sizes: corpora and run configs a worker keeps parsed.
_CORPORA_KEPT = 4
_RUNS_KEPT = 64


@lru_cache(maxsize=_CORPORA_KEPT)
def _corpus(path: str) -> TokenStore:
    return TokenStore.open(path)


@lru_cache(maxsize=_RUNS_KEPT)
def _run_config(config_json: str) -> RunConfig:
    config = RunConfig.model_validate_json(config_json)
    config.objectives  # parse the configurations once, here
    return config


def train_batch(
    corpus_path: str, config_json: str, probabilities: Sequence[float], header: dict[str, Any],
    rank: int, world_size: int, step: int,
) -> tuple[bytes, float]:
    """The training batch at (rank, world_size, step) under `probabilities` as Arrow bytes (with
    `header` and the fill rate in its metadata), and the seconds it took to generate."""
    started = time.perf_counter()
    corpus = _corpus(corpus_path)
    config = _run_config(config_json)
    batch = generate_batch(
        config.objectives, probabilities, corpus.split("train").tokens, corpus.special,
        seed=config.seed, batch_size=config.batch_size, seq_len=config.seq_len,
        rank=rank, world_size=world_size, step=step,
    )
    seconds = time.perf_counter() - started
    return encode_arrow(batch.arrays(), {**header, "fill_rate": batch.fill_rate}), seconds


def held_out_batch(
    corpus_path: str, config_json: str, header: dict[str, Any], objective_id: int, index: int
) -> tuple[bytes, float]:
    """Validation batch `index` of the run's configuration `objective_id`, as `train_batch`."""
    started = time.perf_counter()
    corpus = _corpus(corpus_path)
    config = _run_config(config_json)
    batch = validation_batch(
        config.objectives[objective_id], objective_id, corpus.split("validation").tokens, corpus.special,
        seed=config.seed, batch_size=config.batch_size, seq_len=config.seq_len, index=index,
    )
    seconds = time.perf_counter() - started
    return encode_arrow(batch.arrays(), {**header, "fill_rate": batch.fill_rate}), seconds


def render_json(corpus_path: str, arrow: bytes, decode: bool) -> bytes:
    """The JSON body of a batch given as Arrow bytes; with `decode`, the decoded text of every
    packed example too."""
    wire = decode_arrow(arrow)
    examples = None
    if decode:
        corpus = _corpus(corpus_path)
        examples = decoded_examples(Batch(**wire.arrays), corpus.decode, wire.objectives)
    return orjson.dumps(encode_json(wire.arrays, wire.header, examples))


def _warm(corpus_path: str) -> None:
    """Pool initializer: open the corpus before the first request needs it."""
    corpus = _corpus(corpus_path)
    corpus.split("train")
    corpus.split("validation")


class GenerationPool:
    """Runs the functions above in worker processes (default) or threads, awaitable."""

    def __init__(self, corpus_path: str, kind: Literal["process", "thread"] = "process", workers: int = 2) -> None:
        if kind not in ("process", "thread"):
            raise ValueError(f"generation pool kind must be 'process' or 'thread', got {kind!r}")
        self.corpus_path = corpus_path
        self.kind = kind
        self.workers = workers
        self._executor = self._new_executor()
        self._closed = False
        self.in_flight = 0

    def _new_executor(self) -> Executor:
        if self.kind == "thread":
            return ThreadPoolExecutor(self.workers, thread_name_prefix="birdie-generate",
                                      initializer=_warm, initargs=(self.corpus_path,))
        # spawn, not fork: the server process has threads and an event loop, which fork would copy
        # half-way; a spawned worker imports the package fresh.
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_warm, initargs=(self.corpus_path,))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        try:
            executor = self._executor
            try:
                return await loop.run_in_executor(executor, fn, *args)
            except BrokenProcessPool:
                if self._closed:
                    raise
                # A worker died (killed, out of memory): start a fresh pool (once, however many
                # requests saw this one break) and try once more.
                if self._executor is executor:
                    log.error("a batch generation worker died; restarting the pool")
                    self._executor = self._new_executor()
                    executor.shutdown(wait=False, cancel_futures=True)
                return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self.in_flight -= 1

    async def warm_up(self) -> None:
        """Start every worker now (a spawned process takes about a second), not on first request."""
        await asyncio.gather(*(self.run(_warm, self.corpus_path) for _ in range(self.workers)))

    @property
    def busy(self) -> bool:
        """More work queued than workers: prefetching now would delay requests."""
        return self.in_flight >= self.workers

    def describe(self) -> str:
        return f"{self.workers} {self.kind}{'es' if self.kind == 'process' else 's'}"

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's worker processes (none for threads)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return list(processes)
