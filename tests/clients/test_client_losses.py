"""LossPoster: never blocks, survives outages and restarts, delivers exactly once, reports rejects."""

from __future__ import annotations

import math
import threading
import time

import pytest

from clients.client import BirdieClient, RequestRejectedError
from clients.losses import LossBacklogFull, LossPoster
from clients.models import LossPostBody
from fake_birdie_server import RUN, FakeBirdieServer, Fault, wait_until


def poster_client(server: FakeBirdieServer) -> BirdieClient:
    return BirdieClient(server.url, timeout=2.0, backoff=0.01, max_delay=0.05)


def body(step: int, rank: int = 0, split: str = "train") -> LossPostBody:
    return LossPostBody(
        run=RUN, step=step, rank=rank, world_size=2, split=split,
        losses={"next_token": 2.0 + step / 1000, "copying.len64": 0.5}, tokens={"next_token": 900, "copying.len64": 124},
    )


def keys(n: int) -> set[tuple]:
    return {(RUN, step, rank, "train") for step in range(n // 2) for rank in (0, 1)}


def post_all(poster: LossPoster, n: int) -> None:
    """Post n bodies (steps x 2 ranks)."""
    for step in range(n // 2):
        for rank in (0, 1):
            poster.post(body(step, rank))


def test_post_never_blocks_while_the_server_is_down_then_all_arrive_once(down_server: FakeBirdieServer) -> None:
    with poster_client(down_server) as client:
        poster = LossPoster(client)
        # A blocking post would wait for the (down) server for ever: returning from all 200 with
        # all 200 queued and none delivered is what "never blocks" means.
        post_all(poster, 200)
        assert poster.pending == 200 and poster.delivered == 0
        assert down_server.requests() == []
        assert poster.flush(timeout=0.2) is False  # nowhere to deliver yet
        down_server.start()
        assert poster.flush(timeout=20) is True
        assert poster.close(timeout=1) == []
    assert set(down_server.accepted) == keys(200)
    assert down_server.duplicate_posts == 0
    assert (poster.delivered, poster.duplicates, poster.pending, poster.failed) == (200, 0, 0, [])


def test_store_outage_503s_are_waited_out(server: FakeBirdieServer) -> None:
    server.fail_always("/losses", Fault(status=503, retry_after="0.01"))
    with poster_client(server) as client, LossPoster(client) as poster:
        post_all(poster, 20)
        assert wait_until(lambda: len(server.requests("/losses")) >= 10)
        assert poster.delivered == 0 and poster.pending == 20
        server.fail_always("/losses", None)
        assert poster.flush(timeout=10)
    assert set(server.accepted) == keys(20) and poster.delivered == 20


def test_lost_answers_are_resent_and_counted_once(server: FakeBirdieServer) -> None:
    # The server takes these posts but the answers are lost (503 after processing, dropped
    # connections): the poster re-sends, the server calls the repeats duplicates.
    server.inject("/losses", Fault(status=503, process=True), times=3)
    server.inject("/losses", Fault(status=502, process=True), times=2)
    with poster_client(server) as client, LossPoster(client) as poster:
        post_all(poster, 30)
        assert poster.flush(timeout=10)
    assert set(server.accepted) == keys(30)
    # The faults hit the first five attempts, all of the first post (delivery is in order): the
    # server took it once, saw 5 repeats, and the poster learnt "duplicate" from the sixth.
    first_post = [s for s in server.requests("/losses") if s.body == server.requests("/losses")[0].body]
    assert len(first_post) == 6
    assert server.duplicate_posts == 5
    assert (poster.delivered, poster.duplicates) == (29, 1)


def test_server_restart_mid_stream_loses_and_doubles_nothing(server: FakeBirdieServer) -> None:
    with poster_client(server) as client, LossPoster(client) as poster:
        for step in range(10):
            poster.post(body(step))
        assert poster.flush(timeout=10)
        server.stop()
        for step in range(10, 40):
            poster.post(body(step))
        time.sleep(0.2)
        assert poster.pending == 30
        server.start()
        for step in range(40, 50):
            poster.post(body(step))
        assert poster.flush(timeout=20)
    assert set(server.accepted) == {(RUN, s, 0, "train") for s in range(50)}
    assert server.duplicate_posts == 0 and poster.delivered == 50


def test_rejected_posts_are_reported_not_retried_and_do_not_hold_up_others(server: FakeBirdieServer) -> None:
    bad = LossPostBody(run=RUN, step=3, losses={"no_such_config": 1.0}, tokens={"no_such_config": 10})
    with poster_client(server) as client, LossPoster(client) as poster:
        poster.post(body(1))
        poster.post(bad)
        poster.post(body(2))
        assert poster.flush(timeout=10)
    assert [f.body for f in poster.failed] == [bad]
    error = poster.failed[0].error
    assert isinstance(error, RequestRejectedError) and error.status == 422 and "no_such_config" in str(error)
    assert sum(1 for s in server.requests("/losses") if b"no_such_config" in s.body) == 1
    assert set(server.accepted) == {(RUN, 1, 0, "train"), (RUN, 2, 0, "train")}
    assert poster.delivered == 2 and poster.pending == 0


def test_close_returns_what_is_undelivered_and_stops_promptly(down_server: FakeBirdieServer) -> None:
    # Backing off for up to a minute between tries: a close that sat out the backoff instead of
    # aborting it would still be waiting when the join below gives up.
    with BirdieClient(down_server.url, backoff=60.0, max_delay=60.0) as client:
        poster = LossPoster(client)
        for step in range(5):
            poster.post(body(step))
        left: list[LossPostBody] = []
        closer = threading.Thread(target=lambda: left.extend(poster.close(timeout=0.2)))
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "close() waited out the backoff"
    assert [b.step for b in left] == [0, 1, 2, 3, 4]
    assert not poster._worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        poster.post(body(9))


def test_backlog_limit_raises_instead_of_dropping(down_server: FakeBirdieServer) -> None:
    with poster_client(down_server) as client:
        poster = LossPoster(client, max_pending=3)
        for step in range(3):
            poster.post(body(step))
        with pytest.raises(LossBacklogFull, match="3 loss posts"):
            poster.post(body(3))
        poster.close(timeout=0)


def test_malformed_bodies_are_refused_at_post(server: FakeBirdieServer) -> None:
    with poster_client(server) as client, LossPoster(client) as poster:
        with pytest.raises(ValueError):
            poster.post({"run": RUN, "step": 0, "losses": {"next_token": math.nan}, "tokens": {"next_token": 1}})
        with pytest.raises(ValueError):
            poster.post({"run": RUN, "step": -1, "losses": {}, "tokens": {}})
        poster.post({"run": RUN, "step": 0, "losses": {"next_token": 1.5}, "tokens": {"next_token": 1}})
        assert poster.flush(timeout=5)
    assert list(server.accepted) == [(RUN, 0, 0, "train")]
    assert poster.last_response is not None and poster.last_response.status == "accepted"
