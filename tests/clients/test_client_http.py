"""BirdieClient against a real local HTTP server: typed calls, retries, backoff, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from email.utils import formatdate

import numpy as np
import pytest

from clients.client import (
    AuthenticationError,
    BirdieAborted,
    BirdieClient,
    BirdieConnectionError,
    ConflictError,
    NotFoundError,
    RequestRejectedError,
    ServerError,
    TransientHTTPError,
    parse_retry_after,
)
from clients.models import LossPostBody, MixtureHistoryResponse, MixtureResponse, RunInfo
from clients.wire import FIELDS
from fake_birdie_server import OBJECTIVES, RUN, FakeBirdieServer, Fault, batch_arrays, wait_until


class RecordingEvent(threading.Event):
    """An abort event that records every backoff the client waits (the client waits on its abort
    event, so a set() ends a wait early).

    By default it never fires and returns at once: the backoff schedule is checked without the
    clock. real=True waits for real (until the timeout or a set()), then records what the wait
    returned in `ended`. on_wait(n) is called before the n-th wait (from 1).
    """

    def __init__(self, *, real: bool = False, on_wait: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.real = real
        self.on_wait = on_wait
        self.waits: list[float] = []
        self.ended: list[bool] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if self.on_wait is not None:
            self.on_wait(len(self.waits))
        if not self.real:
            return False
        self.ended.append(super().wait(timeout))
        return self.ended[-1]


def fast_client(url: str, **options) -> BirdieClient:
    options = {"timeout": 2.0, "retries": 4, "backoff": 0.01, "max_delay": 0.05, **options}
    return BirdieClient(url, **options)


def loss_body(step: int = 0, rank: int = 0, **changes) -> LossPostBody:
    fields = {"run": RUN, "step": step, "rank": rank, "world_size": 2, "losses": {"next_token": 2.5}, "tokens": {"next_token": 100}}
    return LossPostBody(**{**fields, **changes})


def test_typed_calls_return_the_shared_models(server: FakeBirdieServer) -> None:
    with fast_client(server.url) as client:
        assert [r.name for r in client.runs()] == [RUN]
        info = client.run(RUN)
        assert isinstance(info, RunInfo) and [o.name for o in info.objectives] == list(OBJECTIVES)
        mixture = client.mixture(RUN)
        assert isinstance(mixture, MixtureResponse)
        assert sum(mixture.probabilities.values()) == pytest.approx(1.0)
        assert mixture.last_losses == {"next_token": 3.25}
        history = client.mixture_history(RUN)
        assert isinstance(history, MixtureHistoryResponse) and history.timeline == [(0, 0)]
        assert [o.family for o in client.objectives()] == ["next_token", "copying", "infilling"]
        assert len(client.objectives(run=RUN)) == 3
        assert client.tokenizer()["model"]["type"] == "BPE"
        assert client.healthz() is True
        assert client.readyz() is True
        assert "birdie_batches_served_total" in client.metrics()
    assert server.requests("/objectives")[-1].params == {"run": RUN}


def test_readyz_false_when_store_unreachable_and_not_retried(server: FakeBirdieServer) -> None:
    server.ready = False
    with fast_client(server.url) as client:
        assert client.readyz() is False
    assert len(server.requests("/readyz")) == 1


def test_create_run_created_identical_and_conflicting(server: FakeBirdieServer) -> None:
    config = {"name": "ablation", "preset": "ntp", "seq_len": 64}
    with fast_client(server.url) as client:
        assert client.create_run(config).name == "ablation"
        assert client.create_run(config).config == config  # identical again: 200, same run
        with pytest.raises(ConflictError) as caught:
            client.create_run({**config, "seq_len": 128})
    assert caught.value.status == 409 and "different config" in str(caught.value)
    assert len(server.requests("/runs")) == 3  # a conflict is not retried


def test_arrow_and_json_batches_carry_identical_arrays(server: FakeBirdieServer) -> None:
    with fast_client(server.url) as client:
        arrow = client.batch(RUN, step=7, rank=1, world_size=2)
        as_json = client.batch(RUN, step=7, rank=1, world_size=2, fmt="json")
        again = client.batch(RUN, step=7, rank=1, world_size=2)
    expected = batch_arrays(7, 1, 2, "train", 0, server.shape)
    for name in FIELDS:
        assert arrow[name].dtype == np.int32 and as_json[name].dtype == np.int32
        np.testing.assert_array_equal(arrow[name], expected[name])
        np.testing.assert_array_equal(as_json[name], arrow[name])
        np.testing.assert_array_equal(again[name], arrow[name])
    assert arrow.header == as_json.header
    assert (arrow.header["step"], arrow.header["rank"], arrow.header["world_size"]) == (7, 1, 2)
    assert arrow.objectives == list(OBJECTIVES) and arrow.shape == server.shape
    arrow_request, json_request = server.requests("/batch")[:2]
    assert arrow_request.headers["Accept"] == "application/vnd.apache.arrow.stream"
    assert json_request.params["format"] == "json"


def test_validation_and_decoded_batches(server: FakeBirdieServer) -> None:
    with fast_client(server.url) as client:
        validation = client.validation_batch(RUN, "copying.len64", index=3)
        batch, examples = client.decoded_batch(RUN, 5)
        vbatch, vexamples = client.decoded_batch(RUN, objective="copying.len64", index=3)
    np.testing.assert_array_equal(validation["input_ids"], batch_arrays(0, 0, 1, "validation", 1003, server.shape)["input_ids"])
    assert validation.header["split"] == "validation"
    np.testing.assert_array_equal(vbatch["label_ids"], validation["label_ids"])
    np.testing.assert_array_equal(batch["input_ids"], batch_arrays(5, 0, 1, "train", 0, server.shape)["input_ids"])
    assert [e["row"] for e in examples] == [0, 1] and examples[0]["input"] == "[COPY] input text of row 0"
    assert len(vexamples) == 2
    params = [s.params for s in server.requests("/batch")]
    assert params[0] == {"run": RUN, "split": "validation", "objective": "copying.len64", "index": "3"}
    assert params[1]["decode"] == "1" and params[1]["format"] == "json"


def test_bad_addresses_are_refused_before_the_wire(server: FakeBirdieServer) -> None:
    with fast_client(server.url) as client:
        with pytest.raises(ValueError, match="step"):
            client.batch(RUN, step=-1)
        with pytest.raises(ValueError, match="rank"):
            client.batch(RUN, step=0, rank=2, world_size=2)
        with pytest.raises(ValueError, match="fmt"):
            client.batch(RUN, step=0, fmt="csv")
        with pytest.raises(ValueError, match="not both"):
            client.decoded_batch(RUN, 1, objective="next_token")
    assert server.requests() == []
    with pytest.raises(ValueError, match="http"):
        BirdieClient("localhost:8000")


def test_url_and_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeBirdieServer(token="s3cret") as server:
        monkeypatch.setenv("BIRDIE_SERVER_URL", server.url)
        monkeypatch.setenv("BIRDIE_API_TOKEN", "s3cret")
        with BirdieClient(retries=0) as client:
            assert client.url == server.url
            assert client.runs()[0].name == RUN
        assert server.requests("/runs")[0].headers["Authorization"] == "Bearer s3cret"
        with BirdieClient(token="wrong", retries=3) as client:
            with pytest.raises(AuthenticationError) as caught:
                client.runs()
        assert caught.value.status == 401 and "token" in str(caught.value)
        assert len(server.requests("/runs")) == 2  # 401 is not retried


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_transient_statuses_are_retried_at_the_same_address(server: FakeBirdieServer, status: int) -> None:
    server.inject("/batch", Fault(status=status), times=3)
    with fast_client(server.url) as client:
        batch = client.batch(RUN, step=11, rank=1, world_size=4)
    assert batch.header["step"] == 11
    seen = server.requests("/batch")
    assert len(seen) == 4
    assert {s.query for s in seen} == {"run=demo&rank=1&world_size=4&step=11"}


def test_retry_after_is_honoured(server: FakeBirdieServer) -> None:
    server.inject("/batch", Fault(status=503, retry_after="0.3"), times=2)
    abort = RecordingEvent()
    with fast_client(server.url, max_delay=5.0) as client:
        assert client.batch(RUN, step=0, abort=abort).header["step"] == 0
    assert len(server.requests("/batch")) == 3
    assert len(abort.waits) == 2 and all(w >= 0.3 for w in abort.waits), abort.waits


def test_backoff_is_full_jitter_within_exponential_bounds(server: FakeBirdieServer) -> None:
    server.fail_always("/batch", Fault(status=503))
    abort = RecordingEvent()
    with BirdieClient(server.url, retries=7, backoff=0.01, max_delay=0.5) as client:
        with pytest.raises(TransientHTTPError) as caught:
            client.batch(RUN, step=3, abort=abort)
    assert caught.value.status == 503 and "injected 503" in str(caught.value)
    assert len(server.requests("/batch")) == 8
    bounds = [min(0.5, 0.01 * 2**n) for n in range(7)]
    assert len(abort.waits) == 7
    assert all(0 <= w <= b for w, b in zip(abort.waits, bounds)), (abort.waits, bounds)
    assert len(set(abort.waits)) > 1  # jittered, not a fixed schedule


def test_retry_after_is_a_lower_bound_with_jitter_on_top_and_is_capped(server: FakeBirdieServer) -> None:
    server.inject("/losses", Fault(status=503, retry_after="0.2"))
    server.inject("/losses", Fault(status=429, retry_after="3600"))
    abort = RecordingEvent()
    with BirdieClient(server.url, retries=5, backoff=0.01, max_delay=0.7) as client:
        assert client.post_losses(loss_body(), abort=abort).status == "accepted"
    assert len(abort.waits) == 2
    assert 0.2 <= abort.waits[0] <= 0.2 + 0.01 and abort.waits[1] == 0.7


def test_ranks_told_the_same_retry_after_spread_out_and_back_off(server: FakeBirdieServer) -> None:
    # Every rank of a job gets the same Retry-After during an outage; waiting exactly that long
    # would keep them retrying in lockstep at a fixed pace.
    server.fail_always("/batch", Fault(status=503, retry_after="0.01"))
    waits = []
    for rank in range(4):
        abort = RecordingEvent()
        with BirdieClient(server.url, retries=6, backoff=0.01, max_delay=10.0) as client:
            with pytest.raises(TransientHTTPError):
                client.batch(RUN, step=0, rank=rank, world_size=4, abort=abort)
        assert all(w >= 0.01 for w in abort.waits)
        waits.append(abort.waits)
    assert len({w[0] for w in waits}) == 4  # not in step
    assert max(max(w[4:]) for w in waits) > 0.01 + 0.01 * 2**3  # the windows grow: 0.16 s, then 0.32 s


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert parse_retry_after(formatdate(time.time() - 100, usegmt=True)) == 0.0


def test_connection_refused_until_the_server_comes_up(down_server: FakeBirdieServer) -> None:
    # The server comes up during the client's third backoff: three refused attempts, each
    # followed by a backoff, then the fourth gets through.
    abort = RecordingEvent(on_wait=lambda n: down_server.start() if n == 3 else None)
    with BirdieClient(down_server.url, retries=30, backoff=0.05, max_delay=0.2) as client:
        batch = client.batch(RUN, step=2, abort=abort)
    assert batch.header["step"] == 2
    assert len(abort.waits) == 3
    assert len(down_server.requests("/batch")) == 1  # refused attempts never reached it


def test_connection_refused_for_good_raises_with_the_url(down_server: FakeBirdieServer) -> None:
    with fast_client(down_server.url, retries=2) as client:
        with pytest.raises(BirdieConnectionError) as caught:
            client.runs()
    assert caught.value.status is None and down_server.url in str(caught.value)


def test_slow_answer_times_out_and_is_retried_at_the_same_address(server: FakeBirdieServer) -> None:
    # The first answer would come after 5 s; the client gives up on it after its 1 s timeout and
    # asks again (the second answer is immediate). Two requests, one address.
    server.inject("/batch", Fault(delay=5.0))
    with fast_client(server.url, timeout=1.0) as client:
        batch = client.batch(RUN, step=9)
    assert batch.header["step"] == 9
    seen = server.requests("/batch")
    assert len(seen) == 2 and seen[0].query == seen[1].query


def test_dropped_connection_is_retried(server: FakeBirdieServer) -> None:
    server.inject("/mixture", Fault(drop=True), times=2)
    with fast_client(server.url) as client:
        assert client.mixture(RUN).run == RUN
    assert len(server.requests("/mixture")) == 3


def test_rejections_are_raised_at_once_with_the_servers_detail(server: FakeBirdieServer) -> None:
    server.inject("/runs", Fault(status=500))
    with fast_client(server.url) as client:
        with pytest.raises(RequestRejectedError) as rejected:
            client.post_losses(loss_body(losses={"no_such_config": 1.0}, tokens={"no_such_config": 3}))
        with pytest.raises(NotFoundError) as missing:
            client.mixture("nope")
        with pytest.raises(ServerError) as broken:
            client.runs()
    assert rejected.value.status == 422 and "no_such_config" in str(rejected.value)
    assert missing.value.status == 404 and missing.value.detail == "unknown run 'nope'"
    assert broken.value.status == 500
    assert len(server.requests("/losses")) == len(server.requests("/mixture")) == len(server.requests("/runs")) == 1
    assert server.accepted == {}


def test_validation_error_lists_are_readable(server: FakeBirdieServer) -> None:
    with fast_client(server.url) as client:
        with pytest.raises(RequestRejectedError) as caught:
            client.request("GET", "/batch", params={"run": RUN, "step": "x"})
    assert "query" in str(caught.value) and "bad or missing parameter" in str(caught.value)


def test_a_lost_answer_makes_the_resend_a_duplicate(server: FakeBirdieServer) -> None:
    # The server takes the post, but its answer is a 503: the client cannot know and re-sends.
    server.inject("/losses", Fault(status=503, process=True))
    with fast_client(server.url) as client:
        response = client.post_losses(loss_body(step=4))
    assert response.status == "duplicate"
    first, second = server.requests("/losses")
    assert first.body == second.body and first.query == second.query
    assert list(server.accepted) == [(RUN, 4, 0, "train")] and server.duplicate_posts == 1


@pytest.mark.parametrize("outage", ["refused", "retry_after"])
def test_abort_ends_the_backoff_at_once(server: FakeBirdieServer, outage: str) -> None:
    # Backoffs of up to an hour: a client that slept them out instead of waiting on its abort event
    # would still be in the first one when the join below gives up.
    if outage == "refused":
        server.stop()
    else:
        server.fail_always("/batch", Fault(status=503, retry_after="3600"))
    abort = RecordingEvent(real=True)
    raised: list[BaseException] = []

    def fetch() -> None:
        with BirdieClient(server.url, retries=100, backoff=3600.0, max_delay=3600.0) as client:
            try:
                client.batch(RUN, step=0, abort=abort)
            except BaseException as error:  # noqa: BLE001 - handed to the test thread
                raised.append(error)

    fetcher = threading.Thread(target=fetch)
    fetcher.start()
    assert wait_until(lambda: len(abort.waits) == 1, timeout=30)
    abort.set()
    fetcher.join(30)
    assert not fetcher.is_alive(), "the client sat out its backoff"
    assert len(raised) == 1 and isinstance(raised[0], BirdieAborted), raised
    assert abort.ended == [True]  # the one backoff ended because of the abort, not its timeout
