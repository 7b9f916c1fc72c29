"""BatchIterator: in-order prefetching, resumption, error propagation, clean stop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from clients.client import BirdieClient, NotFoundError, TransientHTTPError
from clients.iterator import BatchIterator
from clients.wire import FIELDS
from fake_birdie_server import RUN, FakeBirdieServer, Fault, batch_arrays, wait_until


def client_for(server: FakeBirdieServer, **options) -> BirdieClient:
    return BirdieClient(server.url, **{"timeout": 2.0, "retries": 3, "backoff": 0.01, "max_delay": 0.05, **options})


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("birdie-batch")]


def test_yields_steps_in_order_even_when_fetches_finish_out_of_order(server: FakeBirdieServer) -> None:
    # The first fetch answers last: order must come from the step, not from arrival.
    server.inject("/batch", Fault(delay=0.3))
    with client_for(server) as client, BatchIterator(client, RUN, rank=1, world_size=2, start_step=0, prefetch=4, end_step=10) as batches:
        got = list(batches)
    assert [step for step, _ in got] == list(range(10))
    for step, batch in got:
        expected = batch_arrays(step, 1, 2, "train", 0, server.shape)
        for name in FIELDS:
            np.testing.assert_array_equal(batch[name], expected[name])
        assert (batch.header["step"], batch.header["rank"]) == (step, 1)
    arrivals = [int(s.params["step"]) for s in server.requests("/batch")]
    assert sorted(arrivals) == list(range(10))


def test_keeps_exactly_prefetch_steps_in_flight(server: FakeBirdieServer) -> None:
    with client_for(server) as client, BatchIterator(client, RUN, start_step=20, prefetch=3) as batches:
        assert wait_until(lambda: len(server.requests("/batch")) == 3)
        time.sleep(0.1)
        assert sorted(int(s.params["step"]) for s in server.requests("/batch")) == [20, 21, 22]
        assert next(batches)[0] == 20
        assert wait_until(lambda: len(server.requests("/batch")) == 4)
        time.sleep(0.1)
        assert int(server.requests("/batch")[-1].params["step"]) == 23 and len(server.requests("/batch")) == 4
        assert batches.next_step == 21


def test_resuming_from_a_step_replays_the_same_batches(server: FakeBirdieServer) -> None:
    with client_for(server) as client:
        with BatchIterator(client, RUN, prefetch=2, end_step=8) as first:
            full = {step: batch for step, batch in first}
        with BatchIterator(client, RUN, start_step=5, prefetch=2, end_step=8) as resumed:
            tail = list(resumed)
    assert [step for step, _ in tail] == [5, 6, 7]
    for step, batch in tail:
        for name in FIELDS:
            np.testing.assert_array_equal(batch[name], full[step][name])


def test_step_stride_splits_steps_between_consumers(server: FakeBirdieServer) -> None:
    with client_for(server) as client:
        with BatchIterator(client, RUN, start_step=1, prefetch=2, end_step=9, step_stride=3) as batches:
            assert [step for step, _ in batches] == [1, 4, 7]


def test_transient_failures_are_retried_inside_and_invisible_to_the_consumer(server: FakeBirdieServer) -> None:
    server.inject("/batch", Fault(status=503, retry_after="0"), times=3)
    with client_for(server) as client, BatchIterator(client, RUN, prefetch=2, end_step=4) as batches:
        assert [step for step, _ in batches] == [0, 1, 2, 3]


def test_a_failure_reaches_the_consumer_at_its_step_and_closes(server: FakeBirdieServer) -> None:
    with client_for(server, max_delay=0.01) as client:
        batches = BatchIterator(client, "unknown-run", prefetch=2)
        with pytest.raises(NotFoundError):
            next(batches)
        assert batches.closed and batches.next_step == 0
        with pytest.raises(StopIteration):
            next(batches)
        server.fail_always("/batch", Fault(status=503))
        started = time.monotonic()
        batches = BatchIterator(client, RUN, start_step=6, prefetch=2, patience=1.0)
        with pytest.raises(TransientHTTPError):
            next(batches)
        # The fetch gives up only once its patience has run out (never before: it is a time limit,
        # not a count), and it retried well beyond the client's 3 retries: with backoffs of at most
        # 10 ms, a second of patience holds dozens of tries even on a slow machine.
        assert time.monotonic() - started >= 1.0
        assert sum(1 for s in server.requests("/batch") if s.params["step"] == "6") > 4
        assert batches.closed and batches.next_step == 6  # resume from here once the server is back


def test_patience_waits_out_an_outage_longer_than_the_clients_retry_count(server: FakeBirdieServer) -> None:
    # A state-store outage answers 503 for a while: the fetch keeps retrying instead of giving up
    # after the client's 3 retries, so the training loop waits the outage out.
    server.inject("/batch", Fault(status=503, retry_after="0.01"), times=12)
    with client_for(server) as client, BatchIterator(client, RUN, prefetch=1, end_step=2, patience=30) as batches:
        assert [step for step, _ in batches] == [0, 1]
    assert len(server.requests("/batch")) == 12 + 2


def test_patience_is_checked() -> None:
    with BirdieClient("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="patience"):
        BatchIterator(client, RUN, patience=-1)


def test_close_stops_promptly_while_fetches_back_off(down_server: FakeBirdieServer) -> None:
    # Server down, backoffs of up to a minute: close() must end the waiting threads, not sit out
    # the retries (which would outlast the join below).
    with BirdieClient(down_server.url, retries=50, backoff=60.0, max_delay=60.0) as client:
        batches = BatchIterator(client, RUN, prefetch=4)
        assert wait_until(lambda: len(batch_threads()) == 4)
        time.sleep(0.1)  # let them fail their first try and back off
        closer = threading.Thread(target=batches.close)
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "close() sat out the backoff"
    assert batch_threads() == []  # close() returns once the fetch threads have ended
    with pytest.raises(StopIteration):
        next(batches)


def test_nothing_is_fetched_after_close(server: FakeBirdieServer) -> None:
    with client_for(server) as client:
        with BatchIterator(client, RUN, prefetch=2) as batches:
            next(batches)
            next(batches)
        count = len(server.requests("/batch"))
        time.sleep(0.2)
    # Steps 2 and 3 were queued: on the wire or dropped by close(), but never sent after it.
    assert 2 <= count <= 4 and len(server.requests("/batch")) == count


@pytest.mark.parametrize(
    "kwargs",
    [{"prefetch": 0}, {"step_stride": 0}, {"start_step": -1}, {"start_step": 5, "end_step": 4}, {"rank": 2, "world_size": 2}],
)
def test_bad_arguments(server: FakeBirdieServer, kwargs: dict) -> None:
    with client_for(server) as client:
        with pytest.raises(ValueError):
            BatchIterator(client, RUN, **kwargs)
