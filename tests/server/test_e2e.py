"""End to end: real server processes (uvicorn, 1 or 2 workers, replicas) over real HTTP, a real
redis-server that is killed and restarted from its append-only file, concurrent trainer ranks
that post duplicates and retries."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from clients.wire import decode_arrow
from objective_server.corpus.store import TokenStore
from objective_server.store import Aggregate, LossPost, RedisRunStore
from server.conftest import run_config, server_env, write_runs

POLICY_FACTORY = "policies_for_tests:app"


def names_of(server, run="small") -> list[str]:
    return [o["name"] for o in server.get("/objectives", params={"run": run}).json()]


def get_batch(server, run="small", **address) -> bytes:
    response = server.get("/batch", params={"run": run, **address})
    assert response.status_code == 200, response.text
    return response.content


def mixture(server, run="small") -> dict:
    response = server.get("/mixture", params={"run": run})
    assert response.status_code == 200, response.text
    return response.json()


def wait_ready(server, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready again"
        time.sleep(0.1)


def post_until_answered(server, body, timeout_s: float = 20.0) -> dict:
    """What a client does: retry on 503 (Redis down) until an answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = server.post("/losses", json=body)
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            return response.json()
        assert time.monotonic() < deadline
        time.sleep(0.1)


# --- exactly-once counting under concurrency -------------------------------------------------------


def test_concurrent_ranks_with_duplicates_and_retries_are_counted_exactly_once(
    redis_server, live_server, corpus_path, run_file
):
    """8 ranks x 10 steps against 2 uvicorn workers (process pools) sharing Redis: every batch is
    re-fetched identically, every post is repeated (also concurrently), and the totals are exact."""
    env = server_env(corpus_path, run_file, redis_server.url, generation_executor="process",
                     generation_workers=1, max_body_bytes=65536)
    server = live_server(env, workers=2)
    names = names_of(server)
    world, steps, eval_steps = 8, 10, (4, 8)
    expected: dict[str, dict[str, float]] = {n: {"tokens": 0, "posts": 0, "weighted": 0.0} for n in names}
    validation_expected: dict[int, dict[str, list[float]]] = {s: {} for s in eval_steps}
    accepted = []
    batch_requests = []
    lock = threading.Lock()

    def plan(rank: int, step: int) -> dict:
        picked = [names[(rank + step) % len(names)], names[(rank * 3 + step + 1) % len(names)]]
        picked = sorted(set(picked))
        # Quarter losses and small token counts: sums are exact in binary floating point, so the
        # expected totals do not depend on the order in which concurrent posts are added.
        losses = {n: 1.0 + ((rank + step + i) % 8) / 4 for i, n in enumerate(picked)}
        tokens = {n: 10 + rank + step + i for i, n in enumerate(picked)}
        return {"run": "small", "step": step, "rank": rank, "world_size": world, "split": "train",
                "losses": losses, "tokens": tokens}

    def trainer_rank(rank: int) -> None:
        rng = random.Random(rank)
        with httpx.Client(base_url=server.url, timeout=30) as client, \
                httpx.Client(base_url=server.url, timeout=30) as racer:
            for step in range(steps):
                address = {"run": "small", "rank": rank, "world_size": world, "step": step}
                first = client.get("/batch", params=address)
                assert first.status_code == 200, first.text
                header = decode_arrow(first.content).header
                assert (header["rank"], header["step"], header["world_size"]) == (rank, step, world)
                retried = rng.random() < 0.5
                if retried:  # a retry of the same address
                    assert client.get("/batch", params=address).content == first.content
                with lock:
                    batch_requests.append(1 + retried)
                body = plan(rank, step)
                # The post and a concurrent retry of it race; then 0-2 more retries.
                with ThreadPoolExecutor(2) as both:
                    answers = list(both.map(lambda c: c.post("/losses", json=body).json(), (client, racer)))
                assert sorted(a["status"] for a in answers) == ["accepted", "duplicate"], answers
                for _ in range(rng.randint(0, 2)):
                    assert client.post("/losses", json=body).json()["status"] == "duplicate"
                with lock:
                    accepted.append((rank, step))
                    for n in body["losses"]:
                        expected[n]["tokens"] += body["tokens"][n]
                        expected[n]["posts"] += 1
                        expected[n]["weighted"] += body["losses"][n] * body["tokens"][n]
                if step in eval_steps:
                    val = {**body, "split": "validation"}
                    assert client.post("/losses", json=val).json()["status"] == "accepted"
                    assert client.post("/losses", json=val).json()["status"] == "duplicate"
                    with lock:
                        for n in val["losses"]:
                            validation_expected[step].setdefault(n, []).append(
                                (val["losses"][n], val["tokens"][n]))

    with ThreadPoolExecutor(world) as pool:
        list(pool.map(trainer_rank, range(world)))
    assert len(accepted) == world * steps

    # Training totals are written by the post itself: all there once every post is answered.
    state = mixture(server)
    totals = state["meta"]["train_totals"]
    assert {n: (t["tokens"], t["posts"]) for n, t in totals.items()} == {
        n: (e["tokens"], e["posts"]) for n, e in expected.items() if e["posts"]}
    for n, t in totals.items():
        assert t["mean_loss"] == expected[n]["weighted"] / expected[n]["tokens"]
    # The fixed policy consumed each evaluation exactly once; the last one's token-weighted means:
    policy_state = state["meta"]["policy_state"]
    assert policy_state["evaluations"] == len(eval_steps) and policy_state["last_step"] == eval_steps[-1]
    last = validation_expected[eval_steps[-1]]
    assert policy_state["last_losses"] == pytest.approx(
        {n: sum(l * t for l, t in v) / sum(t for _, t in v) for n, v in last.items()}, rel=1e-12)

    # The 2 workers share the run state: the timeline saw every step.
    assert state["max_served"] == steps - 1
    # /metrics adds up both workers (Prometheus multiprocess mode).
    metrics = server.get("/metrics").text
    assert f'birdie_batches_served_total{{format="arrow",run="small",split="train"}} {float(sum(batch_requests))}' in metrics
    # Body limits hold through uvicorn, with and without a declared length.
    big = {"run": "small", "step": 0, "losses": {f"x{i}": 1.0 for i in range(10000)}, "tokens": {}}
    assert server.post("/losses", json=big).status_code == 413

    def chunks():
        for _ in range(100):
            yield b" " * 1024

    assert server.post("/losses", content=chunks(), headers={"Content-Type": "application/json"}).status_code == 413
    assert mixture(server)["meta"]["train_totals"] == totals


def test_each_training_step_updates_a_step_wise_policy_exactly_once_across_ranks_and_workers(
    redis_server, live_server, corpus_path, tmp_path
):
    """exp3 plays a round on every training step (update_every=1). 4 ranks train 6 steps against 2
    uvicorn workers sharing Redis, each post sent twice at once; the run's policy state must be
    exactly that of replaying the steps' aggregates once each, in order."""
    from objective_server.policies.exp3 import Exp3Policy
    from objective_server.runs import RunConfig

    runs = write_runs(tmp_path / "runs.yaml", run_config(policy={"name": "exp3", "options": {"update_every": 1}}))
    server = live_server(server_env(corpus_path, runs, redis_server.url), workers=2)
    names = names_of(server)
    world, steps = 4, 6
    answers: list[dict] = []
    lock = threading.Lock()

    def body(rank: int, step: int) -> dict:
        # Quarter losses and small token counts: the sums are exact whatever order the ranks add in.
        picked = sorted({names[(rank + step) % len(names)], names[(2 * rank + 3 * step + 1) % len(names)]})
        return {"run": "small", "step": step, "rank": rank, "world_size": world, "split": "train",
                "losses": {n: 1.0 + ((rank + step + i) % 12) / 4 for i, n in enumerate(picked)},
                "tokens": {n: 8 + rank + 2 * step + i for i, n in enumerate(picked)}}

    def trainer_rank(rank: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client, \
                httpx.Client(base_url=server.url, timeout=60) as racer, ThreadPoolExecutor(2) as both:
            for step in range(steps):
                batch = client.get("/batch", params={"run": "small", "rank": rank, "world_size": world, "step": step})
                assert batch.status_code == 200, batch.text
                responses = list(both.map(lambda c: c.post("/losses", json=body(rank, step)), (client, racer)))
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
                with lock:
                    answers.extend({**r.json(), "step": step} for r in responses)

    with ThreadPoolExecutor(world) as pool:
        list(pool.map(trainer_rank, range(world)))

    for step in range(steps):
        mine = [a for a in answers if a["step"] == step]
        assert sorted(a["status"] for a in mine) == ["accepted"] * world + ["duplicate"] * world
        completing = [a for a in mine if a["completed"]]
        assert len(completing) == 1 and completing[0]["policy_updated"], completing

    # What the policy must have done: each step's aggregate, once, in step order.
    config = RunConfig.model_validate(server.get("/runs/small").json()["config"])
    policy = Exp3Policy(config, update_every=1)
    expected = policy.initial_state()
    for step in range(steps):
        loss_sums: dict[str, float] = {}
        token_sums: dict[str, int] = {}
        for rank in range(world):
            b = body(rank, step)
            for n, t in b["tokens"].items():
                loss_sums[n] = loss_sums.get(n, 0.0) + b["losses"][n] * t
                token_sums[n] = token_sums.get(n, 0) + t
        expected = policy.update(expected, Aggregate.from_sums("train", step, world, loss_sums, token_sums)).state
    state = mixture(server)
    assert state["meta"]["policy_state"] == policy.describe(expected)
    assert state["meta"]["policy_state"]["history_length"] == steps and state["meta"]["policy_state"]["last_step"] == steps - 1
    assert state["probabilities"] == pytest.approx(dict(zip(names, json.loads(expected)["probabilities"])), rel=1e-12)
    assert state["version"] == steps and state["meta"]["policy_version"] == steps
    history = server.get("/mixture/history", params={"run": "small"}).json()
    assert [m["meta"].get("round") for m in history["mixtures"]] == [None, *range(1, steps + 1)]
    assert [m["created_at_step"] for m in history["mixtures"]] == [None, *range(steps)]
    metrics = server.get("/metrics").text  # both workers' counters, added up
    assert f'birdie_policy_updates_total{{run="small",split="train"}} {float(steps)}' in metrics
    assert f'birdie_mixtures_published_total{{run="small"}} {float(steps)}' in metrics


# --- replay ----------------------------------------------------------------------------------------


def test_replay_is_byte_identical_across_restarts_and_replicas(redis_server, live_server, corpus_path, tmp_path):
    runs = write_runs(tmp_path / "runs.yaml", run_config(policy={"name": "rotating"}))
    env = server_env(corpus_path, runs, redis_server.url)
    a = live_server(env, factory=POLICY_FACTORY)
    names = names_of(a)
    served: dict[tuple[int, int], bytes] = {}
    for step in range(6):
        for rank in range(2):
            served[(rank, step)] = get_batch(a, rank=rank, world_size=2, step=step)
    # Both ranks' validation losses of step 4 complete an evaluation: a new mixture, effective
    # from step 6 (the step after the highest served).
    post = {"run": "small", "step": 4, "world_size": 2, "split": "validation",
            "losses": {names[0]: 3.0}, "tokens": {names[0]: 50}}
    assert a.post("/losses", json={**post, "rank": 0}).json()["completed"] is False
    done = a.post("/losses", json={**post, "rank": 1}).json()
    assert done["completed"] and done["policy_updated"] and done["mixture_version"] == 1
    for step in range(6, 9):
        for rank in range(2):
            served[(rank, step)] = get_batch(a, rank=rank, world_size=2, step=step)
    for (rank, step), content in served.items():
        assert decode_arrow(content).header["mixture_version"] == (0 if step < 6 else 1)

    # A replica on the same Redis (with a smaller batch limit) gives the same bytes.
    b = live_server({**env, "BIRDIE_MAX_REQUEST_TOKENS": "1024"}, factory=POLICY_FACTORY)
    for (rank, step), content in served.items():
        assert get_batch(b, rank=rank, world_size=2, step=step) == content
    # ... and its metrics show the run's latest mixture, which another process published.
    gauge = f'birdie_mixture_probability{{objective="{names[1]}",run="small"}} 0.5'
    assert gauge in b.get("/metrics").text
    # A new address first served by b, then asked of a.
    fresh = get_batch(b, rank=0, world_size=2, step=9)
    assert get_batch(a, rank=0, world_size=2, step=9) == fresh
    served[(0, 9)] = fresh
    # A run a creates with bigger batches than b allows: b refuses it clearly.
    big = a.post("/runs", json=run_config("big", batch_size=16))
    assert big.status_code == 201, big.text
    refused = b.get("/batch", params={"run": "big", "step": 0})
    assert refused.status_code == 413 and "1024" in refused.json()["detail"]
    assert a.get("/runs/big").json()["max_served"] == -1  # refused before the step was marked served

    a.restart()
    for (rank, step), content in served.items():
        assert get_batch(a, rank=rank, world_size=2, step=step) == content
    history = a.get("/mixture/history", params={"run": "small"}).json()
    assert history["timeline"] == [[0, 0], [6, 1]]


def test_a_replica_on_another_corpus_refuses_the_run_instead_of_serving_other_bytes(
    redis_server, live_server, corpus_path, other_corpus_path, tmp_path
):
    runs = write_runs(tmp_path / "runs.yaml", run_config())
    a = live_server(server_env(corpus_path, runs, redis_server.url))
    served = get_batch(a, step=0)
    fingerprint = TokenStore.open(corpus_path).fingerprint
    assert a.get("/runs/small").json()["config"]["corpus"] == fingerprint

    other = live_server(server_env(other_corpus_path, None, redis_server.url))  # same Redis, other corpus
    for response in (other.get("/batch", params={"run": "small", "step": 0}),
                     other.post("/runs", json=run_config())):
        assert response.status_code == 409, response.text
        assert f"reads corpus {fingerprint}" in response.json()["detail"]
    assert get_batch(a, step=0) == served  # the run itself is untouched
    # Both list every run; the other server says why it cannot serve this one.
    listed = {r["name"]: r for r in other.get("/runs").json()["runs"]}
    assert f"reads corpus {fingerprint}" in listed["small"]["unservable"] and listed["small"]["max_served"] == 0
    assert [r["unservable"] for r in a.get("/runs").json()["runs"]] == [None]


# --- Redis failures --------------------------------------------------------------------------------


def test_redis_restarted_from_its_append_only_file_keeps_every_runs_state(
    redis_server, live_server, corpus_path, tmp_path
):
    runs = write_runs(tmp_path / "runs.yaml", run_config(policy={"name": "rotating"}))
    server = live_server(server_env(corpus_path, runs, redis_server.url), factory=POLICY_FACTORY)
    assert server.post("/runs", json=run_config("second", preset="ntp")).status_code == 201
    names = names_of(server)
    batches = {(run, step): get_batch(server, run=run, step=step) for run in ("small", "second") for step in range(5)}
    train = {"run": "small", "step": 1, "losses": {names[2]: 2.0}, "tokens": {names[2]: 8}}
    validation = {"run": "small", "step": 4, "split": "validation", "losses": {names[1]: 2.5}, "tokens": {names[1]: 4}}
    assert server.post("/losses", json=train).json()["status"] == "accepted"
    assert server.post("/losses", json=validation).json()["mixture_version"] == 1

    def snapshot():
        return [server.get(path, params=params).json() for path, params in [
            ("/mixture", {"run": "small"}), ("/mixture/history", {"run": "small"}),
            ("/mixture", {"run": "second"}), ("/runs", {}), ("/runs/small", {}), ("/runs/second", {})]]

    before = snapshot()
    redis_server.kill()  # SIGKILL: only the append-only file survives
    redis_server.start()
    wait_ready(server)
    assert snapshot() == before
    for (run, step), content in batches.items():
        assert get_batch(server, run=run, step=step) == content
    assert server.post("/losses", json=train).json()["status"] == "duplicate"
    assert server.post("/losses", json=validation).json()["status"] == "duplicate"
    assert server.post("/losses", json={**train, "step": 2}).json()["status"] == "accepted"


def test_with_redis_down_known_addresses_serve_and_loss_posts_wait(redis_server, live_server, corpus_path, run_file):
    """Known addresses are regenerated from the cached timeline (a one-batch cache, no prefetch);
    newer ones and loss posts get 503 + Retry-After; after Redis returns, retried posts count once."""
    env = server_env(corpus_path, run_file, redis_server.url, cache_size=1, prefetch_depth=0, api_token="tok")
    server = live_server(env, token="tok")
    assert httpx.get(server.url + "/batch", params={"run": "small", "step": 0}).status_code == 401
    assert httpx.get(server.url + "/healthz").status_code == 200
    names = names_of(server)
    served = {step: get_batch(server, step=step) for step in range(5)}
    post = {"run": "small", "step": 0, "losses": {names[0]: 1.5}, "tokens": {names[0]: 20}}
    assert server.post("/losses", json=post).json()["status"] == "accepted"

    redis_server.kill()
    assert server.get("/healthz").status_code == 200
    assert server.get("/readyz").status_code == 503
    for step in (3, 0, 4, 1, 2):
        assert get_batch(server, step=step) == served[step]
    newer = server.get("/batch", params={"run": "small", "step": 5})
    assert newer.status_code == 503 and newer.headers["retry-after"] == "1"
    for body in ({**post, "step": 1}, {**post, "step": 4, "split": "validation"}, post):
        refused = server.post("/losses", json=body)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text

    redis_server.start()
    wait_ready(server)
    # Accepted now, so nothing of the refused posts was applied; duplicates after that.
    assert post_until_answered(server, {**post, "step": 1})["status"] == "accepted"
    assert post_until_answered(server, {**post, "step": 1})["status"] == "duplicate"
    assert post_until_answered(server, post)["status"] == "duplicate"
    answer = post_until_answered(server, {**post, "step": 4, "split": "validation"})
    assert answer["status"] == "accepted" and answer["policy_updated"]
    state = mixture(server)
    assert state["meta"]["train_totals"] == {names[0]: {"tokens": 40, "posts": 2, "mean_loss": 1.5}}
    assert state["meta"]["policy_state"]["evaluations"] == 1
    assert get_batch(server, step=5)
    assert get_batch(server, step=2) == served[2]


def test_with_redis_down_a_replica_serves_every_address_of_its_cached_timeline(
    redis_server, live_server, corpus_path, tmp_path
):
    """Another replica published the mixtures; this one used only the latest before Redis went
    down, and still serves steps that use the earlier ones."""
    runs = write_runs(tmp_path / "runs.yaml", run_config(policy={"name": "rotating"}))
    env = server_env(corpus_path, runs, redis_server.url)
    a = live_server(env, factory=POLICY_FACTORY)
    names = names_of(a)
    expected = {step: get_batch(a, step=step) for step in range(4)}  # mixture 0
    post = {"run": "small", "step": 4, "split": "validation", "losses": {names[0]: 3.0}, "tokens": {names[0]: 5}}
    assert a.post("/losses", json=post).json()["mixture_version"] == 1  # effective from step 4
    b = live_server({**env, "BIRDIE_CACHE_SIZE": "1", "BIRDIE_PREFETCH_DEPTH": "0"}, factory=POLICY_FACTORY)
    expected[4] = get_batch(b, step=4)  # b learns the timeline up to step 4 (and uses mixture 1 only)
    redis_server.kill()
    for step in (0, 2, 4, 1):
        assert get_batch(b, step=step) == expected[step]


def test_the_server_starts_while_redis_is_down_and_gets_ready_when_it_returns(
    redis_server, live_server, corpus_path, run_file
):
    """An orchestrator must see a live process that is not ready yet, not a crash loop."""
    redis_server.kill()
    server = live_server(server_env(corpus_path, run_file, redis_server.url))  # waits for /healthz
    assert server.get("/readyz").status_code == 503
    refused = server.get("/batch", params={"run": "small", "step": 0})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "registering the runs in the background" in server.log()

    redis_server.start()
    wait_ready(server)  # the configured runs were registered in the background
    assert server.get("/runs/small").json()["config"]["seq_len"] == run_config()["seq_len"]
    assert decode_arrow(get_batch(server, step=0)).header["step"] == 0


# --- policy updates --------------------------------------------------------------------------------


def test_each_evaluation_updates_the_policy_exactly_once_across_concurrent_ranks_and_replicas(
    redis_server, live_server, corpus_path, tmp_path
):
    """6 ranks post every evaluation at once (each post twice, concurrently) to 2 replicas; the
    slow policy (0.3 s per update) widens every race window; each evaluation is applied once."""
    runs = write_runs(tmp_path / "runs.yaml",
                      run_config(policy={"name": "rotating", "options": {"delay_s": 0.3}}))
    env = server_env(corpus_path, runs, redis_server.url)
    replicas = [live_server(env, factory=POLICY_FACTORY) for _ in range(2)]
    names = names_of(replicas[0])
    world, evaluations = 6, (4, 8, 12)
    get_batch(replicas[0], step=max(evaluations) - 1)  # losses are only taken for trained steps
    answers = []

    def post(args):
        rank, step, copy = args
        body = {"run": "small", "step": step, "rank": rank, "world_size": world, "split": "validation",
                "losses": {n: 1.0 + rank / 8 + i / 16 for i, n in enumerate(names)},
                "tokens": {n: 5 + rank for n in names}}
        with httpx.Client(base_url=replicas[(rank + copy) % 2].url, timeout=60) as client:
            response = client.post("/losses", json=body)
        assert response.status_code == 200, response.text
        return step, response.json()

    with ThreadPoolExecutor(world * 2) as pool:
        for step in evaluations:
            answers += pool.map(post, [(rank, step, copy) for rank in range(world) for copy in range(2)])
    for step in evaluations:
        mine = [a for s, a in answers if s == step]
        assert sorted(a["status"] for a in mine) == ["accepted"] * world + ["duplicate"] * world
        assert sum(a["completed"] for a in mine) == 1
        assert [a["policy_updated"] for a in mine if a["completed"]] == [True]
    state = mixture(replicas[1])
    assert state["meta"]["policy_state"]["observed"] == [["validation", s] for s in evaluations]
    assert state["version"] == len(evaluations)
    history = replicas[0].get("/mixture/history", params={"run": "small"}).json()
    assert [m["meta"].get("observations") for m in history["mixtures"]] == [None, 1, 2, 3]


def test_an_aggregate_left_pending_by_a_crash_is_drained_by_the_next_server_or_request(
    redis_server, live_server, corpus_path, tmp_path
):
    """A server that dies between completing an evaluation and committing the policy update leaves
    the aggregate pending in Redis; the next server start, or a later request, applies it once."""
    runs = write_runs(tmp_path / "runs.yaml", run_config(policy={"name": "rotating"}))
    env = server_env(corpus_path, runs, redis_server.url)
    server = live_server(env, factory=POLICY_FACTORY)
    names = names_of(server)
    server.kill()

    async def complete_without_draining(step: int) -> None:
        store = RedisRunStore.from_url(redis_server.url)
        try:
            for rank in range(2):
                await store.post_losses("small", LossPost(step, rank, 2, "validation", {names[0]: 2.0}, {names[0]: 9}))
            assert [a.key for a in await store.pending("small")] == [("validation", step)]
        finally:
            await store.close()

    asyncio.run(complete_without_draining(4))
    server.start()  # registering the run drains what is pending
    assert mixture(server)["meta"]["policy_state"]["observed"] == [["validation", 4]]

    asyncio.run(complete_without_draining(8))
    time.sleep(0.3)  # past the drain interval
    name = names[1]
    get_batch(server, step=0)
    answer = server.post("/losses", json={"run": "small", "step": 0, "losses": {name: 1.0}, "tokens": {name: 1}})
    assert answer.json()["status"] == "accepted"
    state = mixture(server)
    assert state["meta"]["policy_state"]["observed"] == [["validation", 4], ["validation", 8]]
    assert state["version"] == 2
