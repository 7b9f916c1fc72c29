"""The client against the real objective server (FastAPI app on uvicorn, Redis-backed run state).

The server runs in this process on a thread (uvicorn.Server), on a free loopback port, with a real
redis-server from the shared fixture, so a test can restart the server (same port, same Redis) or
kill and restart Redis from its append-only file while the client keeps working.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
import yaml
from click.testing import CliRunner

from clients.cli import main as birdie_cli
from clients.client import AuthenticationError, BirdieClient, NotFoundError, TransientHTTPError
from clients.iterator import BatchIterator
from clients.losses import LossPoster
from clients.models import LossPostBody
from clients.wire import FIELDS, decode_json
from fake_birdie_server import reserve_port, wait_until
from objective_server.app import create_app
from objective_server.corpus import prepare_corpus
from objective_server.corpus.default import StdlibDocstrings, stdlib_root
from objective_server.settings import Settings

RUN = "client-it"
RUN_CONFIG = {
    "name": RUN, "preset": "ul2", "seq_len": 128, "batch_size": 2, "seed": 3,
    "eval_steps": [4, 8], "total_steps": 50, "validation_batches": 1,
}
FAST = {"timeout": 10.0, "backoff": 0.02, "max_delay": 0.2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared token store: docstrings of the stdlib's `email` package, a 1024-id BPE."""
    out = tmp_path_factory.mktemp("client-corpus") / "email-docstrings"
    prepare_corpus(StdlibDocstrings(root=stdlib_root() / "email"), out, vocab_size=1024, validation_fraction=0.2)
    return out


class ThreadedServer:
    """The app on uvicorn in a background thread; stop() and start() keep the port, which stays
    reserved until release() (no other process can take it between a stop and the next start)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._reservation = reserve_port()
        self.port = self._reservation.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = uvicorn.Config(create_app(self.settings), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        if not wait_until(lambda: self._server.started or not self._thread.is_alive(), timeout=60):
            raise RuntimeError("server did not start in 60 s")
        if not self._server.started:
            raise RuntimeError("server failed to start (see the log above)")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(30)
            self._server = None

    def release(self) -> None:
        self.stop()
        self._reservation.close()


@pytest.fixture
def live(corpus: Path, tmp_path: Path, redis_server):
    def make(**settings) -> ThreadedServer:
        run_file = tmp_path / "runs.yaml"
        run_file.write_text(yaml.safe_dump({"runs": [RUN_CONFIG]}))
        values = {
            "corpus": corpus, "redis_url": redis_server.url, "run_files": [run_file],
            "generation_executor": "thread", "generation_workers": 1, "drain_interval_s": 0.2, **settings,
        }
        server = ThreadedServer(Settings(**values))
        started.append(server)
        server.start()
        return server

    started: list[ThreadedServer] = []
    yield make
    for server in started:
        server.release()


def validation_post(step: int, rank: int, names: list[str]) -> LossPostBody:
    return LossPostBody(
        run=RUN, step=step, rank=rank, world_size=2, split="validation",
        losses={n: 3.0 - 0.1 * i for i, n in enumerate(names)}, tokens={n: 50 for n in names},
    )


def test_every_typed_call_against_the_real_server(live) -> None:
    server = live()
    with BirdieClient(server.url, **FAST) as client:
        assert client.healthz() and client.readyz()
        assert RUN in [r.name for r in client.runs()]
        info = client.run(RUN)
        names = [o.name for o in info.objectives]
        assert len(names) == 7 and info.eval_steps == [4, 8] and info.vocab_size <= 1024
        mixture = client.mixture(RUN)
        assert set(mixture.probabilities) == set(names) and sum(mixture.probabilities.values()) == pytest.approx(1)
        assert client.mixture_history(RUN).timeline[0][0] == 0
        assert [o.name for o in client.objectives(run=RUN)] == names
        assert len(client.objectives()) >= len(names)
        assert "model" in client.tokenizer()
        assert "birdie" in client.metrics()
        created = client.create_run({**RUN_CONFIG, "name": "second", "preset": "ntp"})
        assert created.name == "second" and client.create_run({**RUN_CONFIG, "name": "second", "preset": "ntp"}).name == "second"
        with pytest.raises(NotFoundError):
            client.mixture("no-such-run")


def test_batches_replay_identically_in_both_formats(live) -> None:
    server = live()
    with BirdieClient(server.url, **FAST) as client:
        with BatchIterator(client, RUN, rank=1, world_size=2, prefetch=3, end_step=6) as batches:
            first = list(batches)
        assert [step for step, _ in first] == list(range(6))
        for step, batch in first:
            assert (batch.header["step"], batch.header["rank"], batch.shape) == (step, 1, (2, 128))
            again = client.batch(RUN, step, rank=1, world_size=2, fmt="json")
            for name in FIELDS:
                np.testing.assert_array_equal(again[name], batch[name])
        validation = client.validation_batch(RUN, client.run(RUN).objectives[0].name)
        assert validation.shape == (2, 128) and (validation["label_ids"] != -100).any()
        decoded, examples = client.decoded_batch(RUN, 2, rank=1, world_size=2)
        np.testing.assert_array_equal(decoded["input_ids"], first[2][1]["input_ids"])
        assert examples and all(e["objective"] in decoded.objectives for e in examples)


def test_loss_posts_survive_a_server_restart_and_arrive_once(live) -> None:
    server = live()
    with BirdieClient(server.url, **FAST) as client:
        names = [o.name for o in client.run(RUN).objectives]
        client.batch(RUN, step=4)
        poster = LossPoster(client)
        poster.post(validation_post(4, 0, names))
        assert poster.flush(timeout=30)
        server.stop()
        poster.post(validation_post(4, 1, names))  # completes evaluation step 4 once delivered
        for step in range(5):
            poster.post(LossPostBody(run=RUN, step=step, losses={names[0]: 2.5}, tokens={names[0]: 100}))
        time.sleep(0.3)
        assert poster.pending == 6 and poster.delivered == 1  # queued, not sent: the server is down
        server.start()
        assert poster.flush(timeout=30)
        poster.close()
        assert (poster.delivered, poster.duplicates, poster.failed) == (7, 0, [])
        # Every post is on the server exactly once: re-sending each is a duplicate.
        again = [client.post_losses(validation_post(4, rank, names)).status for rank in (0, 1)]
        assert again == ["duplicate", "duplicate"]
        assert wait_until(lambda: client.mixture(RUN).last_losses != {}, timeout=10)
        assert client.mixture(RUN).last_losses[names[0]] == pytest.approx(3.0)


def test_loss_posts_wait_out_a_redis_outage(live, redis_server) -> None:
    server = live()
    with BirdieClient(server.url, **FAST) as client, LossPoster(client) as poster:
        names = [o.name for o in client.run(RUN).objectives]
        client.batch(RUN, step=9)
        redis_server.kill()
        assert client.readyz() is False
        with pytest.raises(TransientHTTPError) as unavailable:
            client.post_losses(LossPostBody(run=RUN, step=9, losses={names[1]: 1.5}, tokens={names[1]: 10}), retries=0)
        assert unavailable.value.status == 503 and unavailable.value.retry_after is not None
        for step in range(3):
            poster.post(LossPostBody(run=RUN, step=step, losses={names[1]: 1.5}, tokens={names[1]: 10}))
        time.sleep(0.5)
        assert poster.pending == 3 and poster.delivered == 0  # 503 + Retry-After, kept and retried
        redis_server.start()
        assert poster.flush(timeout=30)
        assert (poster.delivered, poster.duplicates, poster.failed) == (3, 0, [])
        assert client.post_losses(LossPostBody(run=RUN, step=1, losses={names[1]: 1.5}, tokens={names[1]: 10})).status == "duplicate"


def store_unavailable_answers(client: BirdieClient, route: str) -> int:
    """How many requests to `route` the server has answered 503 because its store was unreachable."""
    found = re.search(rf'^birdie_store_unavailable_total{{route="{re.escape(route)}"}} (\S+)$', client.metrics(), re.M)
    return int(float(found.group(1))) if found else 0


def test_batch_iterator_waits_out_a_redis_outage(live, redis_server) -> None:
    # A step never served before needs the state store (it moves the mixture timeline): during an
    # outage it answers 503, and the training loop must wait until Redis is back, not die.
    server = live()
    with BirdieClient(server.url, retries=2, **FAST) as client:
        assert client.batch(RUN, step=0).header["step"] == 0
        redis_server.kill()
        with BatchIterator(client, RUN, start_step=1, prefetch=1, end_step=2, patience=600) as batches:
            # Redis comes back only once step 1 has been refused more often than the client's own
            # 2 retries would allow: the iterator's patience is what keeps the fetch going.
            assert wait_until(lambda: store_unavailable_answers(client, "/batch") > 3, timeout=120)
            redis_server.start()
            step, batch = next(batches)
        assert step == 1 and batch.header["step"] == 1
        np.testing.assert_array_equal(batch["input_ids"], client.batch(RUN, step=1)["input_ids"])
        assert client.run(RUN).max_served == 1


def test_unknown_configuration_is_rejected_not_retried(live) -> None:
    server = live()
    with BirdieClient(server.url, **FAST) as client, LossPoster(client) as poster:
        poster.post(LossPostBody(run=RUN, step=0, losses={"no_such_config": 1.0}, tokens={"no_such_config": 1}))
        assert poster.flush(timeout=10)
    assert len(poster.failed) == 1 and poster.failed[0].error.status == 422
    assert "no_such_config" in str(poster.failed[0].error)


def test_cli_and_auth_against_the_real_server(live) -> None:
    server = live(api_token="tok-123")
    runner = CliRunner()
    env = {"BIRDIE_SERVER_URL": server.url, "BIRDIE_API_TOKEN": "tok-123", "COLUMNS": "200"}
    mixture = runner.invoke(birdie_cli, ["mixture", RUN, "--json"], env=env)
    assert mixture.exit_code == 0, mixture.output
    assert json.loads(mixture.output)["run"] == RUN
    decoded = runner.invoke(birdie_cli, ["batch", RUN, "--step", "9000", "--decode"], env=env)
    assert decoded.exit_code == 0, decoded.output
    assert "label tokens" in decoded.output and "objective" in decoded.output and "provisional" in decoded.output
    with BirdieClient(server.url, token="tok-123", **FAST) as client:
        assert client.run(RUN).max_served == -1  # a look: the run's timeline is untouched
        served = runner.invoke(birdie_cli, ["batch", RUN, "--step", "3", "--serve"], env=env)
        assert served.exit_code == 0 and "provisional" not in served.output, served.output
        assert client.run(RUN).max_served == 3
    denied = runner.invoke(birdie_cli, ["--token", "wrong", "runs"], env=env)
    assert denied.exit_code == 1 and "401" in denied.output
    with BirdieClient(server.url, token="wrong", **FAST) as client:
        assert client.healthz()  # liveness stays open
        with pytest.raises(AuthenticationError):
            client.runs()


def test_mixture_plot_draws_the_history_and_its_evaluations(live, tmp_path) -> None:
    server = live()
    with BirdieClient(server.url, **FAST) as client:
        names = [o.name for o in client.run(RUN).objectives]
        client.batch(RUN, step=7)  # the server takes losses only for steps the run has trained
        for step in (4, 8):
            for rank in (0, 1):
                client.post_losses(validation_post(step, rank, names))
        # The policy takes each completed evaluation (on the post that completes it or on a drain).
        assert wait_until(lambda: len(client.mixture_history(RUN).evaluations) == 2, timeout=20)
        history = client.mixture_history(RUN)
    assert [e.step for e in history.evaluations] == [4, 8]
    assert history.evaluations[0].losses == pytest.approx({n: 3.0 - 0.1 * i for i, n in enumerate(names)})
    assert history.evaluations[0].tokens == {n: 100 for n in names}  # both ranks' tokens
    assert set(history.families) == set(names)

    path = tmp_path / "mixture.png"
    result = CliRunner().invoke(birdie_cli, ["mixture", RUN, "--plot", str(path)], env={"BIRDIE_SERVER_URL": server.url})
    assert result.exit_code == 0, result.output
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 400
    # Something is drawn in both panels: the stacked mixture above, the loss lines below.
    height = image.shape[0]
    for panel in (image[: height // 2], image[height // 2 :]):
        coloured = (abs(panel[..., 0] - panel[..., 1]) + abs(panel[..., 1] - panel[..., 2])) > 0.2
        assert coloured.mean() > 0.001  # grey grid and text do not count; an empty panel has none


def test_torch_dataset_yields_the_servers_batches(live) -> None:
    import torch

    from clients.torch_data import BirdieIterableDataset

    server = live()
    dataset = BirdieIterableDataset(server.url, RUN, start_step=2, end_step=5, rank=1, world_size=2, prefetch=2, **FAST)
    items = list(dataset)
    assert [int(item["step"]) for item in items] == [2, 3, 4]
    with BirdieClient(server.url, **FAST) as client:
        for item in items:
            direct = client.batch(RUN, int(item["step"]), rank=1, world_size=2)
            assert set(item) == {*FIELDS, "step"}
            for name in FIELDS:
                tensor = item[name]
                assert tensor.dtype == torch.int32 and tuple(tensor.shape) == (2, 128), (name, tensor.shape)
                assert tensor.numpy().tobytes() == direct[name].tobytes(), name
            assert (item["label_ids"] != -100).any() and (item["attention_mask"] != 0).any()


def test_cli_objectives_runs_and_batch_json_against_the_real_server(live) -> None:
    server = live()
    runner = CliRunner()
    env = {"BIRDIE_SERVER_URL": server.url, "COLUMNS": "200"}

    def birdie(*args: str) -> str:
        result = runner.invoke(birdie_cli, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.output

    with BirdieClient(server.url, **FAST) as client:
        info = client.run(RUN)
        names = [o.name for o in info.objectives]

        # objectives: the run's configurations, as a table and as the server's JSON
        table = birdie("objectives", "--run", RUN)
        assert all(name in table for name in names), table
        listed = json.loads(birdie("objectives", "--run", RUN, "--json"))
        assert [o["name"] for o in listed] == names
        assert listed == [o.model_dump(mode="json") for o in client.objectives(run=RUN)]
        # Without --run: every preset's configurations (at the presets' own lengths, so other names),
        # the run's families among them.
        every = json.loads(birdie("objectives", "--json"))
        assert {o.family for o in info.objectives} <= {o["family"] for o in every}

        # runs RUN: the run in full
        shown = birdie("runs", RUN)
        assert RUN in shown and f"vocab {info.vocab_size}" in shown and "eval steps: 4, 8" in shown
        assert all(name in shown for name in names), shown
        assert json.loads(birdie("runs", RUN, "--json")) == info.model_dump(mode="json")

        # batch --json: the arrays and the address round-trip
        served = client.batch(RUN, step=3, rank=1, world_size=2)
        data = json.loads(birdie("batch", RUN, "--step", "3", "--rank", "1", "--world-size", "2", "--json"))
        assert (data["run"], data["split"], data["step"], data["rank"], data["world_size"]) == (RUN, "train", 3, 1, 2)
        printed = decode_json(data)
        assert printed.shape == (2, 128) and printed.objectives == served.objectives
        for name in FIELDS:
            np.testing.assert_array_equal(printed[name], served[name])
        validation = json.loads(birdie("batch", RUN, "--objective", names[0], "--json"))
        direct = client.validation_batch(RUN, names[0])
        assert validation["split"] == "validation"
        for name in FIELDS:
            np.testing.assert_array_equal(decode_json(validation)[name], direct[name])
