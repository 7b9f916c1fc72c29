"""A loss poster that never blocks the training step.

    poster = LossPoster(client)
    for step, batch in batches:
        ...
        poster.post(LossPostBody(run=run, step=step, rank=rank, world_size=world, losses=..., tokens=...))
    poster.close(timeout=60)

`post` only validates the body and queues it. One background thread delivers the queue in order.
Posts the server cannot take now (connection refused, timeouts, 503 while its store is down, a
restart) stay queued and are re-sent with backoff until it takes them; re-sending is safe because
(run, step, rank, split) is an idempotency key on the server, which answers a repeat with
"duplicate" and counts it nowhere. A post the server rejects for good (4xx such as 422, or a 500)
is logged and kept in `failed`; it does not hold up the posts behind it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clients.client import BirdieAborted, BirdieClient, BirdieError
from clients.models import LossPostBody, LossPostResponse

log = logging.getLogger(__name__)


class LossBacklogFull(BirdieError):
    """More than `max_pending` posts are waiting for the server; losses would be lost silently."""


@dataclass(frozen=True)
class FailedPost:
    """A post the server rejected for good, and why."""

    body: LossPostBody
    error: Exception


class LossPoster:
    """Queues loss posts and delivers them from a background thread, exactly once on the server.

    Counters: `delivered` (accepted by the server), `duplicates` (the server already had it, e.g.
    when an earlier attempt's answer was lost), `pending` (queued or being sent), `failed`.
    """

    def __init__(self, client: BirdieClient, max_pending: int = 10_000) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.client = client
        self.max_pending = max_pending
        self.delivered = 0
        self.duplicates = 0
        self.failed: list[FailedPost] = []
        self.last_response: LossPostResponse | None = None
        # The head of the queue stays in it until the server has answered for it.
        self._queue: deque[LossPostBody] = deque()
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._worker = threading.Thread(target=self._deliver_forever, name="birdie-loss-poster", daemon=True)
        self._worker.start()

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def post(self, body: LossPostBody | Mapping[str, Any]) -> None:
        """Queue one post and return at once. Raises ValueError for a malformed body (e.g. NaN loss),
        `LossBacklogFull` when max_pending posts are already waiting."""
        if not isinstance(body, LossPostBody):
            body = LossPostBody.model_validate(body)  # pydantic's ValidationError is a ValueError
        with self._changed:
            if self.closed:
                raise RuntimeError("LossPoster is closed")
            if len(self._queue) >= self.max_pending:
                raise LossBacklogFull(
                    f"{len(self._queue)} loss posts are waiting for {self.client.url}; is the server down?"
                )
            self._queue.append(body)
            self._changed.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued post is delivered or failed; False if `timeout` seconds ran out."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue, timeout)

    def close(self, timeout: float | None = None) -> list[LossPostBody]:
        """Deliver what is queued for up to `timeout` seconds (None: until done), then stop the worker.
        Returns the posts still undelivered (empty when everything went through)."""
        if not self.closed:
            self.flush(timeout)
            with self._changed:
                self._closing.set()
                self._changed.notify_all()
            self._worker.join()
        return list(self._queue)

    def __enter__(self) -> LossPoster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deliver_forever(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closing.is_set())
                if self._closing.is_set():
                    return
                body = self._queue[0]
            try:
                # Transient failures are retried here without end; closing ends the wait between tries.
                response = self.client.post_losses(body, retries=math.inf, abort=self._closing)
            except BirdieAborted:
                return
            except Exception as error:  # noqa: BLE001 - a rejected post (or a bad answer) must not stop the worker
                log.error("loss post for step %d rank %d (%s) failed: %s", body.step, body.rank, body.split, error)
                with self._changed:
                    self.failed.append(FailedPost(body, error))
                    self._queue.popleft()
                    self._changed.notify_all()
                continue
            with self._changed:
                if response.status == "duplicate":
                    self.duplicates += 1
                else:
                    self.delivered += 1
                self.last_response = response
                self._queue.popleft()
                self._changed.notify_all()
