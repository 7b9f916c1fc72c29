"""A prefetching batch iterator: one rank's consecutive training batches, fetched ahead of use.

    with BatchIterator(client, "my-run", rank, world_size, start_step=resume_step) as batches:
        for step, batch in batches:
            ...

Background threads keep `prefetch` steps in flight or ready while the consumer trains on the current
one; batches come out strictly in step order whatever order the fetches finish in. Each fetch is the
client's addressed request (retried with backoff, the same address every time), so resuming from a
checkpoint at step s is `start_step=s` and replays the same data. Transient failures (server restarts,
a state-store outage: 503) are retried for up to `patience` seconds, so a training job waits out an
outage instead of dying in it; a fetch that fails for good is raised to the consumer at its step, and
the iterator is closed from then on.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from clients.client import BirdieClient, training_address
from clients.wire import WireBatch


def check_step_range(start_step: int, end_step: int | None) -> None:
    if start_step < 0 or (end_step is not None and end_step < start_step):
        raise ValueError(f"need 0 <= start_step <= end_step, got {start_step}, {end_step}")


class BatchIterator(Iterator[tuple[int, WireBatch]]):
    """Yields (step, WireBatch) for steps start_step, start_step + step_stride, ... up to end_step
    (exclusive; None: without end).

    prefetch: how many steps are in flight or ready at once (each in its own thread).
    step_stride: for splitting one rank's steps among several consumers (e.g. DataLoader workers).
    patience: seconds a fetch keeps retrying transient failures (with the client's backoff) before
        it gives up; None: the client's own retry count.
    `next_step` is the step the next `next()` returns: the place to resume from.
    """

    def __init__(
        self,
        client: BirdieClient,
        run: str,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        prefetch: int = 4,
        *,
        end_step: int | None = None,
        step_stride: int = 1,
        patience: float | None = 600.0,
    ) -> None:
        if patience is not None and not patience >= 0:
            raise ValueError(f"patience must be >= 0 seconds or None, got {patience}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if step_stride < 1:
            raise ValueError(f"step_stride must be >= 1, got {step_stride}")
        check_step_range(start_step, end_step)
        training_address(run, start_step, rank, world_size)  # checks rank and world size
        self.client = client
        self.run = run
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.end_step = end_step
        self.step_stride = step_stride
        self._retrying = {} if patience is None else {"retries": math.inf, "retry_for": patience}
        self.next_step = start_step
        self._next_to_fetch = start_step
        self._in_flight: deque[tuple[int, Future[WireBatch]]] = deque()
        # Set on close: fetches still backing off give up at once instead of retrying on.
        self._abort = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix=f"birdie-batch-r{rank}")
        self._fill()

    def _fill(self) -> None:
        while len(self._in_flight) < self.prefetch and (self.end_step is None or self._next_to_fetch < self.end_step):
            step = self._next_to_fetch
            future = self._executor.submit(
                self.client.batch, self.run, step, self.rank, self.world_size, abort=self._abort, **self._retrying
            )
            self._in_flight.append((step, future))
            self._next_to_fetch += self.step_stride

    @property
    def closed(self) -> bool:
        return self._abort.is_set()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[int, WireBatch]:
        if self.closed or not self._in_flight:
            raise StopIteration
        step, future = self._in_flight.popleft()
        try:
            batch = future.result()
        except BaseException:
            self.close()
            raise
        self.next_step = step + self.step_stride
        self._fill()
        return step, batch

    def close(self) -> None:
        """Stop fetching: queued steps are dropped, fetches backing off give up, and the call returns
        once the requests already on the wire have ended (each bounded by the client's timeout)."""
        if self.closed:
            return
        self._abort.set()
        for _, future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # An iterator dropped without close() must not keep fetching for nobody.
        executor = getattr(self, "_executor", None)  # absent when __init__ raised
        if executor is not None and not self.closed:
            self._abort.set()
            executor.shutdown(wait=False, cancel_futures=True)
